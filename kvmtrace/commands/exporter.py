"""kvmtrace exporter: Prometheus metrics from the tracer's snapshots."""

from __future__ import annotations

import threading

import click

from . import INTERVAL, Number, modes_option, parse_modes, self_cost_option
from ..exporter.collector import DEFAULT_GRACE_S, DEFAULT_MAX_VMS, DEFAULT_PORT


@click.command(
    context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100),
    epilog=f"""\b
Examples:
  kvmtrace exporter                                  # http://127.0.0.1:{DEFAULT_PORT}/metrics
  kvmtrace exporter --listen :{DEFAULT_PORT} --web.config.file /etc/kvmtrace/web-config.yml
                                                     # every IPv4 interface, TLS + basic auth
  kvmtrace exporter --listen 10.0.0.5:{DEFAULT_PORT} --max-vms 200 --vm-grace 600
  kvmtrace exporter --pid 4242 --interval 5          # one VMM, snapshot every 5 s
  curl -s 127.0.0.1:{DEFAULT_PORT}/metrics | promtool check metrics
  curl -s --cacert ca.crt -u prometheus https://kvm-host-1:{DEFAULT_PORT}/metrics
\b
Beyond loopback without TLS and authentication the exporter says so on stderr (one line).
Web config (TLS, basic auth; the Prometheus exporter-toolkit's format): deploy/web-config.yml.
As a service: deploy/systemd/kvmtrace-exporter.service; alert and recording rules:
deploy/prometheus/ (docs/exporter.md describes every metric and the security promises).
""",
)
@click.option("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", show_default=True, metavar="HOST:PORT",
              help="address to serve /metrics on ([::1]:PORT for IPv6, :PORT for every IPv4 interface, [::]:PORT for every interface)")
@click.option("--web.config.file", "web_config", default=None, metavar="FILE",
              help="YAML web configuration for TLS and basic authentication, in the Prometheus "
                   "exporter-toolkit's format (tls_server_config: cert_file, key_file, client_auth_type, "
                   "client_ca_file; basic_auth_users: user -> bcrypt hash); reread when it changes")
@click.option("--interval", type=INTERVAL, default=1.0, show_default=True,
              help="seconds between tracer snapshots, 0.1 to 3600 (scrapes read the latest one)")
@click.option("--max-vms", type=Number(1, 100_000, name="N", integer=True), default=DEFAULT_MAX_VMS,
              show_default=True,
              help="VMs given series at most, 1 to 100000; VMs beyond are counted in kvmtrace_exporter_vms_dropped_total")
@click.option("--vm-grace", type=Number(0, 366 * 86400.0), default=DEFAULT_GRACE_S, show_default=True,
              metavar="SECONDS", help="keep an exited VM's series this long (0 to 1 year), then drop them; sooner when a live VM needs its --max-vms place")
@click.option("--pid", type=Number(1, 2 ** 22, name="PID", integer=True), default=None,
              help="trace only this VMM process")
@modes_option
@self_cost_option
def exporter(listen, web_config, interval, max_vms, vm_grace, pid, modes, self_cost):
    """Serve Prometheus metrics of KVM hva operations and memslot updates, per VM.

    \b
    The tracer aggregates in the kernel and takes a cumulative snapshot every --interval; a
    scrape formats the latest snapshot (no per-event work). Per VM (labels vm_id: stable id,
    vm: name) and op: operations, latency and memslots-visited histograms (the kernel's log2
    buckets), memslots scanned; per change type: memslot updates and their latency; memslot
    count per VM; kvmtrace_vm_info (pid, guest, comm); and kvmtrace's own health: lost events,
    full maps, unattributed operations, its CPU and BPF cost, build and attach-mode info
    (kvmtrace_attach_info: how each figure is obtained, exact / syscall / derived). Binds
    127.0.0.1 only unless told otherwise; TLS and basic authentication with --web.config.file.
    Connections are served by a fixed set of threads, each with a deadline (idle or
    half-written requests are dropped after 5 s).
    SIGINT or SIGTERM detach every probe and exit 0."""
    from ..errors import KvmtraceError
    from ..exporter.collector import Exporter, VmGate, plan_rows
    from ..exporter.server import bind, exposure_warning, parse_listen, serve
    from .record import stop_on_signals

    host, port = parse_listen(listen)
    try:
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise KvmtraceError(f"prometheus_client is not importable ({e})",
                            "reinstall kvmtrace with its dependencies: make setup (or pip install prometheus_client)")
    web = None
    if web_config is not None:
        from ..exporter.webconfig import Watched, load

        web = Watched(web_config, load(web_config), log=lambda line: click.echo(line, err=True))
    ex = Exporter(VmGate(max_vms=max_vms, grace_s=vm_grace))
    server = bind(host, port, ex, web)  # before loading BPF: a taken port or a bad file costs nothing
    warning = exposure_warning(server)
    if warning:
        click.echo(warning, err=True)
    try:
        from ..tracer.session import TraceSession, bcc_version

        limit, why = memslots_limit()
        flag = threading.Event()
        with stop_on_signals(flag):
            with TraceSession(pid=pid, interval=interval, modes=parse_modes(modes), self_cost=self_cost) as s:
                ex.plan_ops = tuple(plan_rows(s.plan))
                ex.memslots_limit, ex.memslots_limit_why = limit, why
                ex.build = {"bcc": bcc_version(), "kernel": s.meta.get("kernel", "")}
                shown = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
                scheme = "https" if web is not None and web.cfg.tls else "http"
                click.echo(f"kvmtrace exporter: serving {scheme}://{shown}/metrics (Ctrl-C or SIGTERM stops)", err=True)
                n = serve(s, ex, server, stop=flag.is_set)
    finally:
        server.server_close()
    click.echo(f"kvmtrace exporter: stopped after {n} snapshots; probes detached", err=True)


def memslots_limit():
    """(KVM_CAP_NR_MEMSLOTS, "") or (None, why not)."""
    from ..errors import KvmtraceError
    from .bench import kernel_max_memslots

    try:
        return kernel_max_memslots(), ""
    except (KvmtraceError, OSError) as e:
        return None, str(e).splitlines()[0]
