"""The exporter against a real Prometheus server (root, real VMs): Debian's prometheus scrapes
the exporter every second while the built-in workload runs, with deploy/prometheus's rules
loaded; Prometheus' HTTP API must then give the workload's ground truth exactly, every query of
the Grafana dashboard (deploy/grafana) must return series, and the recording rules must record
with their identity labels. Also the command itself: run with exactly the systemd units'
capability set, stopped by SIGTERM, nothing left attached."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmtrace.tracer import session as S

pytestmark = pytest.mark.root

WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)

from tests.test_exporter import need_tool, promtool  # noqa: E402
from tests.test_exporter_deploy import (RULES, UNITS, Prom, check_dashboard, check_recording_rules,  # noqa: E402
                                        free_port, get, unit_capabilities, wait_for)
from tests.test_tracer_e2e import run_workload  # noqa: E402  (the workload with its ground truth)

ROOT = Path(__file__).resolve().parent.parent
KVMTRACE = Path(sys.executable).parent / "kvmtrace"


def recorder_class():
    try:
        from kvmtrace.analysis.recorder import Recorder
    except ImportError:
        from kvmtrace.analysis.recording import Recorder
    return Recorder


def test_prometheus_scrapes_the_workloads_ground_truth(tmp_path):
    """Exporter in this process (so the very snapshots it serves are also recorded for
    `kvmtrace report`), Prometheus in a subprocess scraping it every second."""
    from kvmtrace.commands.exporter import memslots_limit
    from kvmtrace.exporter.collector import Exporter, VmGate, plan_rows
    from kvmtrace.exporter.server import bind, serve

    ex = Exporter(VmGate())
    ex.memslots_limit, ex.memslots_limit_why = memslots_limit()  # as the command does
    server = bind("127.0.0.1", 0, ex)
    port = server.server_address[1]
    stop = threading.Event()
    errors = []
    rec_dir = tmp_path / "rec"
    prom = None
    with S.TraceSession(interval=0.5) as session:
        ex.plan_ops = tuple(plan_rows(session.plan))
        rec = recorder_class()(str(rec_dir), fmt="parquet", meta={"label": "exporter-e2e"}, events=False,
                               plan=session.plan)
        prev = [None]

        def record(snap):
            rec.write(snap.delta(prev[0]), ())
            prev[0] = snap

        def loop():
            try:
                serve(session, ex, server, stop.is_set, on_snapshot=record)
            except BaseException as e:  # surfaced below
                errors.append(e)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            prom = Prom(tmp_path, f"127.0.0.1:{port}", rules=RULES)
            wait_for(prom.target_up, 30, "Prometheus to scrape the exporter")
            scrapes = []
            sampler = threading.Thread(target=sample_scrapes, args=(f"http://127.0.0.1:{port}/metrics", scrapes, stop),
                                       daemon=True)
            sampler.start()
            # --duration: traffic over several scrapes, so rates and quantiles see it rise (a series
            # first scraped with its final value has no increase in Prometheus' eyes)
            truth = run_workload(tmp_path, "--slots", "16", "--scenario", "mixed", "--duration", "8")
            pid = truth["pid"]
            want_unmap = truth["hva_ops"]["unmap"]
            want_ms = {k: v for k, v in truth["memslot_updates"].items() if v}
            # the VM's labels: its id and name, found from its pid through kvmtrace_vm_info
            (info, _), = wait_for(lambda: prom.query(f'kvmtrace_vm_info{{job="kvmtrace",pid="{pid}"}}'), 30,
                                  f"kvmtrace_vm_info of pid {pid}")
            vm_id, vm_name = info["vm_id"], info["vm"]
            sel = f'job="kvmtrace",vm_id="{vm_id}"'

            def unmap_count():
                r = prom.query(f'kvmtrace_hva_operations_total{{{sel},op="unmap"}}')
                return r and r[0][1] == want_unmap and r

            # the VM exited; its last figures stay exported for --vm-grace, so the counter settles
            wait_for(unmap_count, 30, f"the unmap counter of pid {pid} to reach {want_unmap}")
            # a VM created while traced starts at 0: its counter is its increase over the run
            # (increase() itself extrapolates to the window's edges, so it is not an exact count)
            (m, v), = prom.query(f'max_over_time(kvmtrace_hva_operations_total{{{sel},op="unmap"}}[10m])')
            assert v == want_unmap and set(m) == {"job", "instance", "vm_id", "vm", "op"}, m
            (_, first), = prom.query(f'min_over_time(kvmtrace_hva_operations_total{{{sel},op="unmap"}}[10m])')
            assert 0 <= first <= want_unmap

            def memslot_updates():
                got = {m["change"]: v for m, v in prom.query(f"kvmtrace_memslot_updates_total{{{sel}}}")}
                return got == want_ms and got

            wait_for(memslot_updates, 30, f"memslot updates by change type to reach {want_ms}")

            q = prom.query(f'histogram_quantile(0.5, kvmtrace_hva_latency_seconds_bucket{{{sel},op="unmap"}})')
            assert len(q) == 1
            q_ns = q[0][1] * 1e9
            # a counter and its histogram divide as they are: same labels, no ignoring()
            (m, share), = prom.query(f'kvmtrace_hva_latency_seconds_count{{{sel},op="unmap"}}'
                                     f' / kvmtrace_hva_operations_total{{{sel},op="unmap"}}')
            print(f"unmap operations with a latency figure: {share:.6f}")
            assert 0 < share <= 1
            check_dashboard(prom, f"127.0.0.1:{port}", vm_name, set(want_ms))
            check_recording_rules(prom, vm_id)
            live = get(f"http://127.0.0.1:{port}/metrics")
        finally:
            stop.set()
            t.join(timeout=30)
            if prom is not None:
                prom.stop()
        rec.close(status="complete", stopped_by="stop")
    assert not errors, errors
    # every scrape was one snapshot: no operation has a latency figure before it is counted
    pairs = [p for s in scrapes for p in s.values() if p[0] is not None and p[1] is not None]
    ahead = [p for p in pairs if p[1] > p[0]]
    print(f"{len(scrapes)} scrapes, {len(pairs)} (VM, op) pairs; histogram _count short of the counter in "
          f"{sum(1 for c, n in pairs if n < c)} (operations whose system call had not returned)")
    assert len(scrapes) >= 5 and pairs and not ahead, ahead[:5]
    # report's p50 of the same snapshots
    # --accept-warnings: other VMs on a shared host may predate the trace ("underived")
    p = subprocess.run([str(KVMTRACE), "report", str(rec_dir), "--json", "--accept-warnings"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [r for r in json.loads(p.stdout)["hva_ops"] if r["pid"] == pid and r["op"] == "unmap"]
    assert len(rows) == 1 and rows[0]["count"] == want_unmap
    p50 = rows[0]["latency_ns"]["p50"]
    # Prometheus' bucket: le = 2**i - 1 ns, so the quantile lies in (2**(i-1) - 1, 2**i - 1];
    # report interpolates inside the kernel bucket [2**(i-1), 2**i): the same bucket i
    i = next(i for i in range(1, 64) if q_ns <= (1 << i) - 1 + 1e-3)
    print(f"unmap {want_unmap} memslot {want_ms} prometheus p50 {q_ns:.0f} ns report p50 {p50:.0f} ns bucket {i}")
    assert (1 << (i - 1)) <= p50 <= (1 << i), (q_ns, p50, i)
    # and the live exposition passes promtool's lint
    lint = subprocess.run([promtool(), "check", "metrics"], input=live, capture_output=True, timeout=60)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def sample_scrapes(url: str, out: list, stop: threading.Event):
    """Scrape the exporter every 0.5 s: per (vm_id, op) (operations_total, latency _count) of
    each scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    while not stop.is_set():
        try:
            text = get(url, 5).decode()
        except OSError:
            stop.wait(0.5)
            continue
        pairs = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                k = (smp.labels.get("vm_id"), smp.labels.get("op"))
                if smp.name == "kvmtrace_hva_operations_total":
                    pairs[k] = (smp.value, pairs.get(k, (None, None))[1])
                elif smp.name == "kvmtrace_hva_latency_seconds_count":
                    pairs[k] = (pairs.get(k, (None, None))[0], smp.value)
        out.append(pairs)
        stop.wait(0.5)


def kprobe_leftovers(pid: int):
    out = []
    for f in ("/sys/kernel/tracing/kprobe_events", "/sys/kernel/tracing/uprobe_events"):
        try:
            out += [l for l in Path(f).read_text().splitlines() if f"bcc_{pid}" in l]
        except OSError:
            pass
    return out


def test_exporter_runs_with_the_units_capabilities_only(tmp_path):
    """`kvmtrace exporter` under exactly the units' capability bounding set and no new
    privileges: traces the workload's VM exactly, then SIGTERM detaches and exits 0."""
    setpriv = need_tool("setpriv", "util-linux")
    caps = unit_capabilities(UNITS[0])
    bounding = "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    port = free_port()
    err = open(tmp_path / "exporter.err", "w+")
    proc = subprocess.Popen([setpriv, "--bounding-set", bounding, "--no-new-privs", str(KVMTRACE), "exporter",
                             "--listen", f"127.0.0.1:{port}", "--interval", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: proc.poll() is None and b"kvmtrace_tracer_up 1.0" in get(url, 2), 120,
                 "the exporter to serve its first snapshot")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        bnd = int(re.search(r"CapBnd:\s*(\w+)", status).group(1), 16)
        assert bin(bnd).count("1") == len(caps)
        truth = run_workload(tmp_path, "--slots", "8", "--scenario", "unmap", "--pages", "300", "--iterations", "1")
        line = f'op="unmap",vm="'
        vm = f'[{truth["pid"]}]#'

        def count():
            for l in get(url, 2).decode().splitlines():
                if l.startswith("kvmtrace_hva_operations_total{") and line in l and vm in l:
                    return float(l.rsplit(" ", 1)[1])
            return None

        wait_for(lambda: count() == truth["hva_ops"]["unmap"], 30, "the exporter to count the workload's unmaps")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    err.seek(0)
    log = err.read()
    assert rc == 0, log
    assert "probes detached" in log and "Traceback" not in log
    assert kprobe_leftovers(proc.pid) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
