"""kvmtrace's own cost: BPF run-time statistics through a fake bpf() layer (no root), and on
this host for real (root): the run count of the unmap tracepoint program equals the unmap
operations kvmtrace counted in its maps, and the workload's ground truth bounds both."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import errno
import os
import json
import subprocess
import sys
import time

import pytest

from kvmtrace.snapshot import SelfCost, Snapshot
from kvmtrace.tracer import selfcost as C


class FakeBpf:
    """bpf(2) as the kernel answers it: ENABLE_STATS gives an fd (or an errno), GET_INFO writes
    run_time_ns/run_cnt into the caller's struct bpf_prog_info at the documented offsets."""

    def __init__(self, enable_errno=0):
        self.enable_errno = enable_errno
        self.stats = {}  # prog fd -> [run_time_ns, run_cnt]
        self.closed = []
        self.calls = []

    def call(self, cmd, attr):
        raw = bytes(attr)
        self.calls.append(cmd)
        if cmd == C.BPF_ENABLE_STATS:
            assert int.from_bytes(raw[0:4], "little") == C.BPF_STATS_RUN_TIME
            if self.enable_errno:
                raise OSError(self.enable_errno, "fake")
            return 77
        assert cmd == C.BPF_OBJ_GET_INFO_BY_FD
        fd = int.from_bytes(raw[0:4], "little")
        assert int.from_bytes(raw[4:8], "little") == C.PROG_INFO_SIZE
        addr = int.from_bytes(raw[8:16], "little")
        if fd not in self.stats:
            raise OSError(errno.EBADF, "bad fd")
        ns, cnt = self.stats[fd]
        ct.memmove(addr + C.OFF_RUN_TIME_NS, (ct.c_uint64 * 2)(ns, cnt), 16)
        return 0

    def close(self, fd):
        self.closed.append(fd)


class Clock:
    def __init__(self):
        self.t = 10.0

    def __call__(self):
        return self.t


def test_run_figures_per_program_summed_and_stats_fd_closed():
    bpf, cpu = FakeBpf(), Clock()
    m = C.CostMeter(sys=bpf, cpu=cpu, mode="full").start()
    assert m.state == "enabled"
    m.watch({"tp_unmap": 3, "tp_sys_enter": 4})
    bpf.stats[3] = [500 * 40, 500]
    bpf.stats[4] = [30 * 2000, 2000]
    cpu.t = 10.25
    c = m.read()
    assert c.bpf_stats == "enabled"
    assert dict((n, (ns, k)) for n, ns, k in c.per_prog) == {"tp_unmap": (20000, 500), "tp_sys_enter": (60000, 2000)}
    assert (c.bpf_run_ns, c.bpf_run_cnt) == (80000, 2500)
    assert c.user_cpu_s == pytest.approx(0.25)
    m.close()
    assert bpf.closed == [77]


@pytest.mark.parametrize("err, why", [
    (errno.EINVAL, "unavailable: the kernel has no BPF_ENABLE_STATS (Linux 5.8+)"),
    (errno.EPERM, "unavailable: BPF_ENABLE_STATS needs CAP_SYS_ADMIN"),
])
def test_unavailable_says_why_and_reports_zero_bpf_figures(tmp_path, err, why):
    off = tmp_path / "sysctl"
    off.write_text("0\n")
    bpf = FakeBpf(enable_errno=err)
    bpf.stats = {3: [5, 5]}
    m = C.CostMeter(sys=bpf, sysctl=str(off), cpu=Clock()).start()
    m.watch({"p": 3})
    c = m.read()
    assert c.bpf_stats == why and (c.bpf_run_ns, c.bpf_run_cnt, c.per_prog) == (0, 0, ())
    assert C.BPF_OBJ_GET_INFO_BY_FD not in bpf.calls


def test_statistics_already_on_by_sysctl_are_used(tmp_path):
    on = tmp_path / "sysctl"
    on.write_text("1\n")
    bpf = FakeBpf(enable_errno=errno.EINVAL)
    m = C.CostMeter(sys=bpf, sysctl=str(on), cpu=Clock()).start()
    m.watch({"p": 3})
    bpf.stats[3] = [400, 4]
    c = m.read()
    assert c.bpf_stats == "enabled (kernel.bpf_stats_enabled)" and (c.bpf_run_ns, c.bpf_run_cnt) == (400, 4)


def sampled_meter(tmp_path):
    """A sampled CostMeter on a fake bpf() and a fake clock, the sysctl reading 0; the period is
    long enough that its thread never toggles during a test (tests call toggle() themselves)."""
    ctl = tmp_path / "sysctl"
    ctl.write_text("0\n")
    bpf, clk = FakeBpf(), Clock()
    m = C.CostMeter(sys=bpf, sysctl=str(ctl), cpu=Clock(), clock=clk, period=1000.0).start()
    return ctl, bpf, clk, m


def test_sampled_statistics_are_on_in_windows_and_the_time_on_is_counted(tmp_path):
    """Default mode: the statistics fd is open for a window, closed for the rest of the period;
    stats_s is the time they were on, and the share of a CPU is run time over it."""
    off = tmp_path / "sysctl"
    off.write_text("0\n")
    bpf, clk = FakeBpf(), Clock()
    m = C.CostMeter(sys=bpf, sysctl=str(off), cpu=Clock(), clock=clk, period=1000.0, duty=0.1).start()
    try:
        assert m.state == "sampled: on 100000 ms of every 1000 s (10% of the time)"
        m.watch({"p": 3})
        bpf.stats[3] = [2_000_000, 10_000]  # runs inside the windows only
        clk.t += 0.1
        assert m.toggle() and bpf.closed == [77] and m.fd is None
        clk.t += 0.9
        assert m.toggle() and m.fd == 77 and bpf.calls.count(C.BPF_ENABLE_STATS) == 2
        clk.t += 0.1
        c = m.read()
        assert c.sampled and c.measured and c.stats_s == pytest.approx(0.2)
        assert c.ns_per_run() == pytest.approx(200.0)
        assert c.cpu_share(elapsed_s=1.1) == pytest.approx(0.002 / 0.2)  # over the 0.2 s on, not 1.1 s
    finally:
        m.close()
    assert bpf.closed == [77, 77] and m.read().stats_s == pytest.approx(0.2)


def test_sampling_stops_when_another_process_holds_the_statistics_on(tmp_path):
    """Another process's BPF_ENABLE_STATS fd keeps the statistics on while kvmtrace's is closed
    (the sysctl does not show it): kvmtrace's run counts move in the gap. Seen before the next
    window: the gap counts as on, and the meter holds them on itself (full)."""
    ctl, bpf, clk, m = sampled_meter(tmp_path)
    try:
        m.watch({"p": 3})
        bpf.stats[3] = [1000, 10]
        clk.t += 0.1
        assert m.toggle() and m.fd is None  # window closed after 0.1 s
        bpf.stats[3] = [1000 + os.cpu_count() * 100, 10 + os.cpu_count()]  # runs in flight at the close
        clk.t += 0.9
        assert m.toggle() and m.fd == 77 and m.state.startswith("sampled")
        clk.t += 0.1
        assert m.toggle() and m.fd is None
        bpf.stats[3] = [900_000, 5000]  # moved while kvmtrace's fd was closed
        clk.t += 0.9
        assert not m.toggle()
        assert m.state.startswith("enabled (held on by another process") and m.fd == 77
        clk.t += 5.0
        assert m.read().stats_s == pytest.approx(0.1 + 0.1 + 0.9 + 5.0)  # the gap counts as on
    finally:
        m.close()


def test_programs_watched_during_a_gap_are_not_taken_for_another_holder(tmp_path):
    """The session loads its programs after the meter starts: programs given to watch() in a gap
    already have runs (from earlier windows); that is the gap's baseline, not movement."""
    ctl, bpf, clk, m = sampled_meter(tmp_path)
    try:
        clk.t += 0.1
        assert m.toggle() and m.fd is None
        bpf.stats[3] = [500_000, 4000]
        m.watch({"p": 3})
        clk.t += 0.9
        assert m.toggle() and m.state.startswith("sampled")
    finally:
        m.close()


def test_sysctl_switched_on_while_sampling_stops_the_sampling(tmp_path):
    ctl, bpf, clk, m = sampled_meter(tmp_path)
    try:
        clk.t += 0.1
        assert m.toggle()
        ctl.write_text("1\n")
        clk.t += 0.9
        assert not m.toggle() and m.state.startswith("enabled (held on by another process")
    finally:
        m.close()


def test_self_cost_off_never_enables_the_statistics():
    bpf = FakeBpf()
    m = C.CostMeter(sys=bpf, cpu=Clock(), mode="off").start()
    m.watch({"p": 3})
    c = m.read()
    assert c.bpf_stats == "off (--self-cost off)" and not c.measured and c.cpu_share(1.0) is None
    assert bpf.calls == []
    m.close()


def test_sampled_interval_without_a_window_has_no_share_rather_than_zero():
    from kvmtrace.dashboard.view import cost_text

    state = "sampled: on 100 ms of every 1 s (10% of the time)"
    a = Snapshot(seq=1, wall_time=0, mono_ns=0, elapsed_s=1, cost=SelfCost(state, 100, 10, 0.5, (), 0.1))
    b = Snapshot(seq=2, wall_time=0, mono_ns=5 * 10**8, elapsed_s=1.5, cost=SelfCost(state, 100, 10, 0.6, (), 0.1))
    d = b.delta(a)
    assert d.cost.stats_s == 0 and d.cost.cpu_share(d.elapsed_s) is None
    assert cost_text(d) == "in kernel - ns/event, - CPU (sampled)"
    c = Snapshot(seq=3, wall_time=0, mono_ns=15 * 10**8, elapsed_s=2.5, cost=SelfCost(state, 5100, 60, 0.7, (), 0.2))
    assert cost_text(c.delta(b)) == "in kernel 100 ns/event, 0.01% CPU (sampled)"  # 5 us over 0.1 s on


def test_log_lines_carry_the_in_kernel_cost_and_say_sampled_once():
    from kvmtrace.dashboard.model import ViewOptions
    from kvmtrace.dashboard.plain import SAMPLED_NOTE, LogFormatter

    state = "sampled: on 100 ms of every 1 s (10% of the time)"
    a = Snapshot(seq=1, wall_time=0, mono_ns=0, elapsed_s=1, cost=SelfCost(state, 100, 10, 0.5, (), 0.1))
    b = Snapshot(seq=2, wall_time=1, mono_ns=5 * 10**8, elapsed_s=1.5, cost=SelfCost(state, 100, 10, 0.6, (), 0.1))
    c = Snapshot(seq=3, wall_time=2, mono_ns=15 * 10**8, elapsed_s=2.5, cost=SelfCost(state, 5100, 60, 0.7, (), 0.2))
    logf = LogFormatter(("unmap",))
    first = logf.lines_for(b, b.delta(a), None, ViewOptions())
    assert first[1] == SAMPLED_NOTE and first[2].split()[-2:] == ["-", "-"]  # no window in this interval
    assert logf.lines_for(c, c.delta(b), None, ViewOptions())[0].split()[-2:] == ["100", "0.01"]
    every_run = dataclasses.replace(c.delta(b), cost=SelfCost("enabled", 5000, 50, 0.1))
    full = LogFormatter(("unmap",)).lines_for(c, every_run, None, ViewOptions())
    assert len(full) == 2 and full[1].split()[-2:] == ["100", "0.00"]  # every run counted: no note


def test_cost_delta_is_per_interval():
    a = Snapshot(seq=1, wall_time=0, mono_ns=0, elapsed_s=1, cost=SelfCost("enabled", 100, 10, 0.5, (("p", 100, 10),)))
    b = Snapshot(seq=2, wall_time=0, mono_ns=2 * 10**9, elapsed_s=3,
                 cost=SelfCost("enabled", 400, 40, 0.75, (("p", 400, 40),)))
    d = b.delta(a).cost
    assert (d.bpf_run_ns, d.bpf_run_cnt, d.per_prog) == (300, 30, (("p", 300, 30),))
    assert d.user_cpu_s == pytest.approx(0.25)


# ------------------------------------------------------------------------ real kernel (root)
def _root_why():
    from kvmtrace.tracer.session import tracing_unavailable

    return tracing_unavailable()


def unmaps_in_maps(s) -> int:
    """Every unmap kvmtrace's maps counted, whatever its tgid (VMM or not); tracepoint mode keeps
    them per VM in its own map, and the decoder the operations of VMs retired from it."""
    maps = s.read_maps()
    n = sum(a.count for (_vm, op, _o), a in maps.aggs.items() if op == 0)
    if maps.tp is not None:
        n += s.decoding.tp.retired_ops.get(0, 0)
        n += sum(a.agg.count for (_g, op, _t), a in maps.tp.aggs.items() if op == 0)
    return n


@pytest.mark.root
def test_unmap_program_run_count_equals_an_independent_count(tmp_path):
    """kvmtrace's unmap program runs once per kvm_unmap_hva_range hit: its run count grows
    exactly as a separate count-only program's on the same tracepoint (read at two quiet
    moments around a workload), and as kvmtrace's own unmap counts in its maps."""
    why = _root_why()
    if why:
        pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {why}")
    from kvmtrace.tracer.session import TraceSession, import_bcc

    BPF = import_bcc()
    counter = BPF(text=b"BPF_ARRAY(c, u64, 1); TRACEPOINT_PROBE(kvm, kvm_unmap_hva_range) "
                       b"{ int k = 0; u64 *v = c.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }")
    tbl = counter["c"]
    prog = "raw_tracepoint__kvm_unmap_hva_range"  # kvmtrace attaches raw tracepoints
    out = tmp_path / "truth.json"
    try:
        with TraceSession(interval=0.5, self_cost="full") as s:  # every run counted
            def quiet():
                """(independent count, run count, unmaps in kvmtrace's maps) once two readings agree
                (other VMs on the host may unmap at any time)."""
                prev = None
                for _ in range(60):
                    cur = (int(tbl[tbl.Key(0)].value), dict((n, k) for n, _ns, k in s.snapshot().cost.per_prog)[prog],
                           unmaps_in_maps(s))
                    if cur == prev:
                        return cur
                    prev = cur
                    time.sleep(0.25)
                pytest.skip("the host never went quiet (other VMs unmapping)")

            a = quiet()
            p = subprocess.run([sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(out),
                                "--slots", "8", "--scenario", "unmap", "--pages", "3000", "--iterations", "1"],
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr
            b = quiet()
            snap = s.snapshot()
    finally:
        counter.cleanup()
    if snap.cost.bpf_stats != "enabled":
        pytest.skip(f"BPF statistics: {snap.cost.bpf_stats}")
    truth = json.loads(out.read_text())
    indep, runs, in_maps = (y - x for x, y in zip(a, b))
    assert runs == indep == in_maps >= truth["hva_ops"]["unmap"] >= 3000
    assert snap.map_full == 0 and snap.cost.bpf_run_ns > 0 and snap.cost.user_cpu_s > 0


@pytest.mark.root
def test_sampled_statistics_count_only_the_runs_inside_their_windows(tmp_path):
    """The default (sampled) mode on the real kernel: the statistics were on for about a tenth
    of the time, the unmap program's counted runs are fewer than the unmaps kvmtrace counted in
    its maps (every one), and ns per run is measured from the runs inside the windows."""
    why = _root_why()
    if why:
        pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {why}")
    from kvmtrace.tracer.session import TraceSession

    out = tmp_path / "truth.json"
    prog = "raw_tracepoint__kvm_unmap_hva_range"  # kvmtrace attaches raw tracepoints
    with TraceSession(interval=0.5) as s:
        s0 = s.snapshot()
        p = subprocess.run([sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(out),
                            "--slots", "8", "--scenario", "unmap", "--pages", "3000", "--duration", "3.5"],
                           capture_output=True, text=True, timeout=300)  # several 1 s periods: 30
        # iterations took 0.3 s and could fall between two 100 ms windows (CI saw 0 runs counted)
        assert p.returncode == 0, p.stderr
        time.sleep(1.0)
        d = s.snapshot().delta(s0)
        in_maps = unmaps_in_maps(s)
    c = d.cost
    if not c.measured:
        pytest.skip(f"BPF statistics: {c.bpf_stats}")
    if not c.sampled:
        pytest.skip(f"not sampled here: {c.bpf_stats}")
    truth = json.loads(out.read_text())["hva_ops"]["unmap"]
    runs = dict((n, k) for n, _ns, k in c.per_prog)[prog]
    assert in_maps >= truth >= 90000
    assert 0 < runs < truth  # only the runs inside the windows
    assert 0.02 * d.elapsed_s < c.stats_s < 0.3 * d.elapsed_s  # ~10 % of the time
    assert c.ns_per_run() > 0 and c.cpu_share(d.elapsed_s) > 0


# ------------------------------------------------------------------------ recording and report
class CostSession:
    """A session whose snapshots carry kvmtrace's cost (the documented TraceSession API)."""

    plan = None
    meta = {"host": "h", "kernel": "6.18-fake"}
    interrupted = False
    events = False

    def snapshots(self, duration=None, stop=None):
        from dataclasses import replace

        for i in range(1, 4):
            s = Snapshot(i, 1000.0 + i, i * 10**9, float(i), self_cpu_s=0.02 * i,
                         cost=SelfCost("enabled", 150_000 * i, 1000 * i, 0.02 * i, (("p", 150_000 * i, 1000 * i),)))
            yield replace(s, late_s=0.4) if i == 2 else s

    def take_events(self):
        return []


def test_cost_recorded_in_metadata_and_printed_by_report(tmp_path):
    from kvmtrace.analysis.recording import Recorder, read_inputs
    from kvmtrace.analysis.render import report_renderables
    from kvmtrace.analysis.report import build_report, to_json
    from kvmtrace.commands.record import run_recording

    path = str(tmp_path / "rec")
    with Recorder(path) as r:
        run_recording(CostSession(), r)
    iv = read_inputs([path])[0]["intervals"]
    assert iv["bpf_run_ns"].tolist() == [150_000] * 3 and iv["bpf_run_cnt"].tolist() == [1000] * 3
    assert iv["late_s"].tolist() == [0.0, 0.4, 0.0]
    rep = build_report(read_inputs([path]))
    src = to_json(rep)["sources"][0]
    # 450 us of BPF run time over 3000 runs in 3 s: 150 ns per event, 0.015 % of a CPU;
    # 0.06 s of kvmtrace CPU in 3 s: 2 %
    assert src["bpf_stats"] == "enabled" and src["bpf_ns_per_event"] == pytest.approx(150.0)
    assert src["bpf_cpu_share"] == pytest.approx(0.00015) and src["user_cpu_share"] == pytest.approx(0.02)
    assert src["late_intervals"] == 1
    from rich.console import Console

    c = Console(record=True, width=200, file=open(os.devnull, "w"))
    for x in report_renderables(rep):
        c.print(x)
    text = c.export_text()
    assert "kvmtrace's own cost (rec): in kernel 150 ns/event, 0.015% of a CPU; user space 2% of a CPU; " \
           "1 late intervals" in text


def test_recordings_made_before_cost_columns_still_read():
    from kvmtrace.analysis.recording import read_recording

    here = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")
    for name in ("basic", "basic-csv", "hist-only"):
        iv = read_recording(os.path.join(here, name))["intervals"]
        assert len(iv) and iv["bpf_run_ns"].isna().all() and (iv["late_s"] == 0).all()
