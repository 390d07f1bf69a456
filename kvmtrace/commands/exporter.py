"""kvmtrace exporter: Prometheus metrics from the tracer's snapshots."""

from __future__ import annotations

import threading

import click

from . import modes_option, parse_modes, self_cost_option
from ..exporter.collector import DEFAULT_GRACE_S, DEFAULT_MAX_VMS, DEFAULT_PORT


@click.command(
    context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100),
    epilog=f"""\b
Examples:
  kvmtrace exporter                                  # http://127.0.0.1:{DEFAULT_PORT}/metrics
  kvmtrace exporter --listen :{DEFAULT_PORT}                   # every IPv4 interface (firewall it)
  kvmtrace exporter --listen 10.0.0.5:{DEFAULT_PORT} --max-vms 200 --vm-grace 600
  kvmtrace exporter --pid 4242 --interval 5          # one VMM, snapshot every 5 s
  curl -s 127.0.0.1:{DEFAULT_PORT}/metrics | promtool check metrics
\b
As a service: deploy/systemd/kvmtrace-exporter.service; alert and recording rules:
deploy/prometheus/ (docs/exporter.md describes every metric).
""",
)
@click.option("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", show_default=True, metavar="HOST:PORT",
              help="address to serve /metrics on ([::1]:PORT for IPv6, :PORT for every IPv4 interface, [::]:PORT for every interface)")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="seconds between tracer snapshots (scrapes read the latest one)")
@click.option("--max-vms", type=click.IntRange(1, None), default=DEFAULT_MAX_VMS, show_default=True,
              help="VMs given series at most; VMs beyond are counted in kvmtrace_exporter_vms_dropped_total")
@click.option("--vm-grace", type=click.FloatRange(0, None), default=DEFAULT_GRACE_S, show_default=True,
              metavar="SECONDS", help="keep an exited VM's series this long, then drop them")
@click.option("--pid", type=int, default=None, help="trace only this VMM process")
@modes_option
@self_cost_option
def exporter(listen, interval, max_vms, vm_grace, pid, modes, self_cost):
    """Serve Prometheus metrics of KVM hva operations and memslot updates, per VM.

    \b
    The tracer aggregates in the kernel and takes a cumulative snapshot every --interval; a
    scrape formats the latest snapshot (no per-event work). Per VM (labels vm, vm_id, pid,
    guest) and op: operations, latency and memslots-visited histograms (the kernel's log2
    buckets), memslots scanned; per change type: memslot updates and their latency; memslot
    count per VM; and kvmtrace's own health: lost events, full maps, unattributed operations,
    its CPU and BPF cost, build and attach-mode info. The provenance label says how each figure
    was obtained (exact / syscall / derived). Binds 127.0.0.1 only unless told otherwise.
    SIGINT or SIGTERM detach every probe and exit 0."""
    from ..errors import KvmtraceError, UsageError
    from ..exporter.collector import Exporter, VmGate, plan_rows
    from ..exporter.server import bind, parse_listen, serve
    from .record import stop_on_signals

    if interval <= 0:
        raise UsageError(f"--interval must be positive, not {interval}")
    host, port = parse_listen(listen)
    try:
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise KvmtraceError(f"prometheus_client is not importable ({e})",
                            "reinstall kvmtrace with its dependencies: make setup (or pip install prometheus_client)")
    ex = Exporter(VmGate(max_vms=max_vms, grace_s=vm_grace))
    server = bind(host, port, ex)  # before loading BPF: a taken port costs nothing
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
                click.echo(f"kvmtrace exporter: serving http://{shown}/metrics (Ctrl-C or SIGTERM stops)", err=True)
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
