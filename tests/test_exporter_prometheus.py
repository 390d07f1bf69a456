"""The exporter against a real Prometheus server (root, real VMs): Debian's prometheus scrapes
the exporter every second while the built-in workload runs; Prometheus' HTTP API must then give
the workload's ground truth exactly. Also the command itself: run with exactly the systemd
units' capability set, stopped by SIGTERM, nothing left attached."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from kvmtrace.tracer import session as S

pytestmark = pytest.mark.root

WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)

from tests.test_exporter import need_tool, promtool  # noqa: E402
from tests.test_exporter_deploy import UNITS, unit_capabilities  # noqa: E402
from tests.test_tracer_e2e import run_workload  # noqa: E402  (the workload with its ground truth)

ROOT = Path(__file__).resolve().parent.parent
KVMTRACE = Path(sys.executable).parent / "kvmtrace"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout=10) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Prom:
    """A Prometheus server on a loopback port scraping one target every second."""

    def __init__(self, d: Path, target: str):
        self.port = free_port()
        cfg = d / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: kvmtrace\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = open(d / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [need_tool("prometheus", "prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={d / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None and get(f"http://127.0.0.1:{self.port}/-/ready", 2), 60,
                 "Prometheus to be ready")

    def query(self, expr: str):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        doc = json.loads(get(url))
        assert doc["status"] == "success", doc
        return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]

    def target_up(self) -> bool:
        return any(v == 1 for _, v in self.query('up{job="kvmtrace"}'))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def recorder_class():
    try:
        from kvmtrace.analysis.recorder import Recorder
    except ImportError:
        from kvmtrace.analysis.recording import Recorder
    return Recorder


def test_prometheus_scrapes_the_workloads_ground_truth(tmp_path):
    """Exporter in this process (so the very snapshots it serves are also recorded for
    `kvmtrace report`), Prometheus in a subprocess scraping it every second."""
    from kvmtrace.exporter.collector import Exporter, VmGate, plan_rows
    from kvmtrace.exporter.server import bind, serve

    ex = Exporter(VmGate())
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
            prom = Prom(tmp_path, f"127.0.0.1:{port}")
            wait_for(prom.target_up, 30, "Prometheus to scrape the exporter")
            truth = run_workload(tmp_path, "--slots", "16", "--scenario", "mixed", "--iterations", "2")
            pid = truth["pid"]
            want_unmap = truth["hva_ops"]["unmap"]
            want_ms = {k: v for k, v in truth["memslot_updates"].items() if v}
            sel = f'job="kvmtrace",pid="{pid}"'

            def unmap_count():
                r = prom.query(f'kvmtrace_hva_operations_total{{{sel},op="unmap"}}')
                return r and r[0][1] == want_unmap and r

            # the VM exited; its last figures stay exported for --vm-grace, so the counter settles
            wait_for(unmap_count, 30, f"the unmap counter of pid {pid} to reach {want_unmap}")
            # a VM created while traced starts at 0: its counter is its increase over the run
            # (increase() itself extrapolates to the window's edges, so it is not an exact count)
            (m, v), = prom.query(f'max_over_time(kvmtrace_hva_operations_total{{{sel},op="unmap"}}[10m])')
            assert v == want_unmap and m["provenance"] == "exact"
            (_, first), = prom.query(f'min_over_time(kvmtrace_hva_operations_total{{{sel},op="unmap"}}[10m])')
            assert 0 <= first <= want_unmap

            def memslot_updates():
                got = {m["change"]: v for m, v in prom.query(f"kvmtrace_memslot_updates_total{{{sel}}}")}
                return got == want_ms and got

            wait_for(memslot_updates, 30, f"memslot updates by change type to reach {want_ms}")

            q = prom.query(f'histogram_quantile(0.5, kvmtrace_hva_latency_seconds_bucket{{{sel},op="unmap"}})')
            assert len(q) == 1
            q_ns = q[0][1] * 1e9
            live = get(f"http://127.0.0.1:{port}/metrics")
        finally:
            stop.set()
            t.join(timeout=30)
            if prom is not None:
                prom.stop()
        rec.close(status="complete", stopped_by="stop")
    assert not errors, errors
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
        line = f'op="unmap",pid="{truth["pid"]}"'

        def count():
            for l in get(url, 2).decode().splitlines():
                if l.startswith("kvmtrace_hva_operations_total{") and line in l:
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
