"""The live view as a pure function of snapshots, and its script-friendly outputs. No root:
synthetic snapshots, fixed width (COLUMNS=100), exact expected lines computed by hand."""

from __future__ import annotations

import csv
import datetime
import io

import pytest

from kvmtrace.dashboard import live as live_mod
from kvmtrace.fmt import fmt_duration, fmt_ns, fmt_rate
from kvmtrace.dashboard.live import make_options, run_live
from kvmtrace.dashboard.model import ViewOptions, build_view, cycle_selected
from kvmtrace.dashboard.plain import CsvSink, LogFormatter, csv_columns, plain_table
from .synthetic_top import SyntheticSession, snapshot_at, tracepoint_plan
from kvmtrace.dashboard.view import hist_lines, render_text
from kvmtrace.errors import DataFileError, UsageError
from kvmtrace.tracer.plan import OpPlan, ProbePlan
from kvmtrace.snapshot import HvaStats, Log2Hist, MemslotStats, Snapshot, VmInfo

WIDTH = 100
META = {"host": "h1", "kernel": "6.18.0"}


# the help overlay's lines, as `?` shows them (tests/test_dashboard_tmux.py reads them too)
HELP_SCREEN = [
    "keys (kvm_stat's where they fit)",
    "  ? h    show the keys (any key closes the list)",
    "  < >    sort by the previous / next key: ops, latency, slots, pid",
    "  o      reverse the sort order",
    "  p      filter by pid: type pids (e.g. 4242,4343), Enter",
    "  g      filter by guest: part of its name or command, Enter",
    "  f      show only the ops matching a regular expression",
    "  c      clear the filters (pid, guest, op)",
    "  s      set the update interval (seconds, 0.1 to 3600)",
    "  r      reset: zero the figures shown since start",
    "  v      choose the VM of the histogram panel",
    "  space  pause / resume the display (tracing goes on)",
    "  q      quit (Ctrl-C too) with a summary since start",
    "  in a prompt: Enter applies, Esc cancels, an empty line clears that filter",
]


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("LINES", "40")


# Two VMs over one 2 s interval (mono 1 s -> 3 s):
#  web (pid 100): 400 unmaps in the interval; 200 took 1000 ns (bucket 512-1023), 200 took
#    3000 ns (bucket 2048-4095); 2 slots visited each.  -> unmap 400/2 s = 200/s.
#    p50: rank 0.5*400 = 200 ends bucket 512-1023 exactly -> 1024 ns = "1.0µs".
#    p99: rank 396 -> bucket 2048-4095, (396-200)/200 = 0.98 -> 2048 + 0.98*2048 = 4055 ns.
#  pid 200 (no guest name: comm shown): 6 age calls (no latency in tracepoint mode), 1 slot
#    each -> 3.0/s; 2 memslot deletes -> 1.0/s; memslot count partial -> "~5".
#  totals: slots mean (400*2 + 6*1) / 406 = 1.985 -> "2.0"; memslots 10+5 (partial) -> "~15".
#  header: lost events 3-2 = 1 (total 3); unattributed 15-5 = 10 -> 5.0/s;
#    kvmtrace CPU (0.05-0.01)/2 s = 2.0 %.
A = VmInfo("pid:100", 100, comm="qemu-system-x86", name="web", vcpus=4, memslots=10)
B = VmInfo("pid:200", 200, comm="qemu-system-x86", vcpus=None, memslots=5, partial=True)
PREV = Snapshot(1, 1000.0, 1_000_000_000, 1.0, vms=(A, B), lost_events=2, unattributed=5, self_cpu_s=0.01)
HA = HvaStats(
    "pid:100", 100, "unmap", count=400,
    lat_hist=Log2Hist.from_values([1000] * 200 + [3000] * 200), lat_count=400, lat_provenance="syscall",
    slots_hist=Log2Hist.from_values([2] * 400), slots_count=400, slots_sum=800, slots_max=2,
    slots_provenance="derived",
)  # fmt: skip
HB = HvaStats(
    "pid:200", 200, "age", count=6,
    slots_hist=Log2Hist.from_values([1] * 6), slots_count=6, slots_sum=6, slots_max=1, slots_provenance="derived",
)  # fmt: skip
MB = MemslotStats("pid:200", 200, "delete", count=2, lat_provenance="syscall")
CUR = Snapshot(
    2, 1002.0, 3_000_000_000, 3.0, vms=(A, B), hva=(HA, HB), memslot=(MB,),
    lost_events=3, unattributed=15, self_cpu_s=0.05,
)  # fmt: skip
PLAN = tracepoint_plan()

EXPECTED_SCREEN = """\
kvmtrace top · host h1 · kernel 6.18.0 · interval 2.0s · up 3s
attach: unmap tracepoint (lat syscall, slots derived) · age,test_age tracepoint (lat none, slots
derived) · memslot tracepoint (lat syscall, change derived) · not traced: change_pte
lost events 1 (total 3) · map full 0 · unattributed ops 10 (5.0/s) · kvmtrace CPU 2.0%
VMs 2 running · sort ops

                      mem      ops/s                lat       slots      upd/s
PID VM              slots vCPU unmap age test_age   p50   p99  mean max create delete move flags
100 web                10    4   200   0        0 1.0µs 4.1µs   2.0   2      0      0    0     0
200 qemu-system-x86    ~5    -     0 3.0        0     -     -   1.0   1      0    1.0    0     0
    total (2 VMs)     ~15    4   200 3.0        0 1.0µs 4.1µs   2.0   2      0    1.0    0     0
latency p50/p99 of the interval, estimated from log2 histogram (syscall) · slots visited (derived),
max since start · ~ memslot count incomplete (slots predate the trace)

VM 100 web · since start: 400 ops (unmap,age,test_age)
latency ns (syscall)              slots visited (derived)
 512-1023 200 ████████████████    2-3 400 ████████████████
1024-2047   0
2048-4095 200 ████████████████"""


def screen(cum=CUR, delta=None, opts=None, width=WIDTH, plan=PLAN, base=None):
    if delta is None and cum is CUR:
        delta = CUR.delta(PREV)
    return render_text(cum, delta, META, plan, opts or ViewOptions(interval=2.0), width, base=base)


# ---------------------------------------------------------------------------- formatting


def test_number_formats():
    assert [fmt_rate(v) for v in (None, 0, 0.5, 12.4, 999, 1234, 12345, 2.5e6)] == [
        "-", "0", "0.5", "12", "999", "1.2k", "12k", "2.5M",
    ]  # fmt: skip
    assert [fmt_ns(v) for v in (None, 870, 1024, 4055.04, 12_000, 1_500_000, 2e9)] == [
        "-", "870ns", "1.0µs", "4.1µs", "12µs", "1.5ms", "2.0s",
    ]  # fmt: skip
    assert [fmt_duration(s) for s in (3, 65, 3720)] == ["3s", "1m05s", "1h02m"]


def test_hist_lines_fold_and_bars():
    h = Log2Hist.from_values([1] * 4 + [2] * 2 + [5])  # buckets 1, 2-3, 4-7
    assert hist_lines(h, lambda lo, hi: f"{lo}", ascii_bars=True) == [
        "1 4 ################",
        "2 2 ########",
        "4 1 ####",
    ]
    # 20 buckets, one value each, except 50 values of 1024 (bucket 1024-2047)
    wide = Log2Hist.from_values([2**i for i in range(20)] + [1024] * 50)
    lines = hist_lines(wide, lambda lo, hi: f"{lo}-{hi - 1}", ascii_bars=True, max_rows=3)
    # the 3-bucket window with most values is 512..4095 (1+51+1); tails folded into its ends
    assert [line.split()[:2] for line in lines] == [["<1024", "10"], ["1024-2047", "51"], [">=2048", "9"]]


# ---------------------------------------------------------------------------- the screen


def test_screen_exact_lines():
    assert screen() == EXPECTED_SCREEN


def test_screen_is_pure_and_width_bound():
    assert screen() == screen()
    narrow = screen(width=60)
    assert all(len(line) <= 60 for line in narrow.splitlines())
    assert "100 web" in narrow.replace("  ", " ")


def test_no_vms_running():
    empty = Snapshot(1, 1000.0, 1_000_000_000, 1.0)
    text = screen(cum=empty, delta=empty.delta(None))
    assert text.splitlines()[-1] == "no VMs running"
    assert "PID" not in text


def test_waiting_before_first_interval():
    assert screen(cum=None, delta=None, opts=ViewOptions(interval=2.0)) == (
        "kvmtrace top · waiting for the first interval (2.0s)…"
    )


def test_filter_that_matches_nothing():
    text = screen(opts=ViewOptions(interval=2.0, pids=(999,)))
    assert "filter pid=999 (2 hidden)" in text
    assert text.splitlines()[-1] == "no VMs match pid=999 (2 running)"


def test_filters_pid_vm_op():
    text = screen(opts=ViewOptions(interval=2.0, pids=(200,)))
    rows = [line for line in text.splitlines() if line.startswith("200 ")]
    assert len(rows) == 1 and "100 web" not in text and "total (" not in text
    assert "VM 200 qemu-system-x86" in text  # panel follows the only VM

    by_name = screen(opts=ViewOptions(interval=2.0, vms=("WE",)))  # case-insensitive substring
    assert "100 web" in by_name and "\n200 " not in by_name
    by_id = screen(opts=ViewOptions(interval=2.0, vms=("pid:200",)))
    assert "\n200 " in by_id and "100 web" not in by_id

    only_unmap = screen(opts=ViewOptions(interval=2.0, ops=("unmap",)))
    header = [line for line in only_unmap.splitlines() if line.startswith("PID")][0]
    assert header.split() == ["PID", "VM", "slots", "vCPU", "unmap", "p50", "p99", "mean", "max",
                              "create", "delete", "move", "flags"]  # fmt: skip
    # pid 200 only had age calls: with --op unmap its slots figures are gone
    row200 = [line for line in only_unmap.splitlines() if line.startswith("200 ")][0]
    assert row200.split()[3:9] == ["-", "0", "-", "-", "-", "-"]


def test_sort_keys():
    def order(sort):
        v = build_view(CUR, CUR.delta(PREV), PLAN, ViewOptions(sort=sort))
        return [r.pid for r in v.rows]

    assert order("ops") == [100, 200]  # 200/s before 3/s
    assert order("latency") == [100, 200]  # 200 has no latency figure
    assert order("slots") == [100, 200]  # mean 2.0 before 1.0
    assert order("pid") == [100, 200]
    opts = ViewOptions()
    seen = [opts.sort]
    for _ in range(4):
        opts = opts.next_sort()
        seen.append(opts.sort)
    assert seen == ["ops", "latency", "slots", "pid", "ops"]


def test_panel_selection_cycles():
    v = build_view(CUR, CUR.delta(PREV), PLAN, ViewOptions())
    assert v.panel_vm == "pid:100"  # busiest
    sel = cycle_selected(v, None)
    assert sel == "pid:200"
    text = screen(opts=ViewOptions(interval=2.0, selected=sel))
    assert "VM 200 qemu-system-x86 · since start: 6 ops (unmap,age,test_age)" in text
    assert "latency ns (none)" in text and "(no data)" in text
    assert cycle_selected(v, sel) == "pid:100"


def test_paused_and_keys_in_header():
    text = screen(opts=ViewOptions(interval=2.0, paused=True, keys=True, sort="pid"))
    lines = text.splitlines()
    assert lines[0].endswith("· up 3s · PAUSED")
    assert lines[4] == "VMs 2 running · sort pid · keys: ? help, q quit"


def test_mixed_provenance_is_marked():
    ha_exact = HvaStats("pid:100", 100, "age", count=2, lat_hist=Log2Hist.from_values([100, 100]),
                        lat_count=2, lat_provenance="exact")  # fmt: skip
    cum = Snapshot(2, 1002.0, 3_000_000_000, 3.0, vms=(A,), hva=(HA, ha_exact))
    text = screen(cum=cum, delta=cum.delta(None))
    assert "estimated from log2 histogram (mixed)" in text
    assert "mixed provenance: use --op to separate ops" in text.replace("\n", " ")


def test_linear_scan_shows_scanned_column():
    plan = ProbePlan(ops=(OpPlan("unmap", "hva", "kprobe", "kvm_mmu_notifier_invalidate_range_start",
                                 "exact", "exact", scanned="exact"),), linear_scan=True)  # fmt: skip
    h = HvaStats("pid:100", 100, "unmap", count=10, slots_hist=Log2Hist.from_values([1] * 10), slots_count=10,
                 slots_sum=10, slots_max=1, slots_provenance="exact", scanned_sum=5090)  # fmt: skip
    cum = Snapshot(1, 1001.0, 2_000_000_000, 2.0, vms=(A,), hva=(h,))
    text = screen(cum=cum, delta=cum.delta(None), plan=plan)
    head = [line for line in text.splitlines() if line.startswith("PID")][0].split()
    assert "mean" in head and head.count("mean") == 2  # slots mean and scan mean
    row = [line for line in text.splitlines() if line.startswith("100 ")][0].split()
    assert row[row.index("1.0") + 2] == "509"  # 5090 scanned / 10 ops
    assert "attach: unmap kprobe (lat exact, slots exact)" in text


# ---------------------------------------------------------------------------- VMs come and go


def test_vms_appearing_and_exiting():
    # synthetic: guest-a always; pid 4343 appears at seq 3, exits after seq 5
    def rows(seq):
        cum = snapshot_at(seq)
        v = build_view(cum, cum.delta(snapshot_at(seq - 1)), tracepoint_plan(), ViewOptions())
        return [(r.pid, r.alive, r.total_ops) for r in v.rows]

    assert rows(2) == [(4242, True, 1010)]
    assert rows(3) == [(4242, True, 1010), (4343, True, 200)]
    assert rows(5) == [(4242, True, 1010), (4343, True, 200)]
    assert rows(6) == [(4242, True, 1010)]  # exited, no activity: row gone
    # exited but still active in its last interval: shown, marked
    last = snapshot_at(6)
    dead = Snapshot(**{**last.__dict__, "vms": tuple(v if v.pid != 4343 else
                       VmInfo(**{**v.__dict__, "alive": False}) for v in snapshot_at(5).vms)})  # fmt: skip
    dead_delta = snapshot_at(5).delta(snapshot_at(4))
    dead_delta = Snapshot(**{**dead_delta.__dict__, "vms": dead.vms})
    text = render_text(dead, dead_delta, META, PLAN, ViewOptions(), WIDTH)
    assert "4343 python3 (exited)" in text
    # the summary keeps every VM seen, exited ones included
    summary = plain_table(snapshot_at(6), None, META, PLAN, ViewOptions(), summary=True)
    assert "python3(exited)" in summary
    # a VM that vanished from the snapshot altogether is simply not shown
    gone = Snapshot(7, 1007.0, 7_000_000_000, 7.0)
    assert render_text(gone, gone.delta(snapshot_at(6)), META, PLAN, ViewOptions(), WIDTH).endswith(
        "no VMs running"
    )


def test_stats_without_vm_info_get_a_row():
    h = HvaStats("ffff8881deadbeef", 777, "unmap", count=5)
    cum = Snapshot(1, 1001.0, 1_000_000_000, 1.0, hva=(h,))
    text = screen(cum=cum, delta=cum.delta(None))
    row = [line for line in text.splitlines() if line.startswith("777 ")][0]
    assert row.split()[:6] == ["777", "?", "-", "-", "5.0", "0"]


# ---------------------------------------------------------------------------- --once / --log / --csv


def test_plain_table_exact():
    assert plain_table(CUR, CUR.delta(PREV), META, PLAN, ViewOptions()).splitlines() == [
        "# kvmtrace top interval: host h1 kernel 6.18.0 interval_s 2.000 elapsed_s 3.000",
        "# attach: unmap tracepoint (lat syscall, slots derived) · age,test_age tracepoint (lat none, slots derived)"
        " · memslot tracepoint (lat syscall, change derived) · not traced: change_pte",
        "# lost_events 1 map_full 0 unattributed 10 kvmtrace_cpu 2.0%",
        "  pid  vm               memslots  vcpus  unmap/s  age/s  test_age/s  p50_ns  p99_ns  lat_prov  slots_mean"
        "  slots_max  slots_prov  create/s  delete/s  move/s  flags_only/s",
        "  100  web                    10      4    200.0    0.0         0.0    1024    4055   syscall         2.0"
        "          2     derived       0.0       0.0     0.0           0.0",
        "  200  qemu-system-x86        ~5      -      0.0    3.0         0.0       -       -      none         1.0"
        "          1     derived       0.0       1.0     0.0           0.0",
        "total  all_VMs               ~15      4    200.0    3.0         0.0    1024    4055   syscall         2.0"
        "          2     derived       0.0       1.0     0.0           0.0",
    ]


def test_log_lines_exact():
    logf = LogFormatter(("unmap", "age", "test_age"))
    lines = logf.lines_for(CUR, CUR.delta(PREV), PLAN, ViewOptions())
    t = datetime.datetime.fromtimestamp(1002.0).strftime("%H:%M:%S")
    assert lines == [
        "    time      vms  unmap/s    age/s test_age/s   p50_ns   p99_ns slots_mean slots_max create/s delete/s"
        "   move/s flags_only/s     lost map_full unattr/s     cpu% bpf_ns/ev bpf_cpu%",
        f"{t:>8}        2    200.0      3.0        0.0     1024     4055        2.0         2      0.0      1.0"
        "      0.0          0.0        1        0      5.0      2.0         -        -",  # fakes: no cost measured
    ]
    # the next interval: no header again (not a terminal); the summary line is labelled total
    assert len(logf.lines_for(CUR, CUR.delta(PREV), PLAN, ViewOptions())) == 1
    total = logf.lines_for(CUR, None, PLAN, ViewOptions(), summary=True)
    # since start: 400 unmaps / 3 s = 133.3/s, 6 ages / 3 s = 2.0/s, CPU 0.05 s / 3 s = 1.7 %
    assert total[0].split() == ["total", "2", "133.3", "2.0", "0.0", "1024", "4055", "2.0", "2",
                                "0.0", "0.7", "0.0", "0.0", "3", "0", "5.0", "1.7", "-", "-"]  # fmt: skip


def test_csv_rows_header_once_and_append(tmp_path):
    path = tmp_path / "top.csv"
    with CsvSink(str(path)) as sink:
        assert sink.write(CUR, CUR.delta(PREV), PLAN, ViewOptions()) == 2
    with CsvSink(str(path)) as sink:  # a second run appends, no second header
        assert sink.write(CUR, CUR.delta(PREV), PLAN, ViewOptions(pids=(100,))) == 1
    rows = list(csv.reader(path.open()))
    assert rows[0] == csv_columns()
    assert len(rows) == 4 and rows.count(csv_columns()) == 1
    rec = [dict(zip(rows[0], r)) for r in rows[1:]]
    web = rec[0]
    assert (web["vm_id"], web["pid"], web["name"], web["unmap_count"], web["unmap_per_s"]) == (
        "pid:100", "100", "web", "400", "200",
    )  # fmt: skip
    assert (web["lat_p50_ns"], web["lat_p99_ns"], web["lat_provenance"]) == ("1024", "4055", "syscall")
    assert (web["slots_mean"], web["slots_max"], web["interval_s"]) == ("2", "2", "2")
    other = rec[1]
    assert (other["name"], other["memslots"], other["memslots_partial"], other["vcpus"]) == (
        "qemu-system-x86", "5", "1", "",
    )  # fmt: skip
    assert (other["age_per_s"], other["delete_count"], other["delete_per_s"]) == ("3", "2", "1")
    assert (other["lost_events"], other["unattributed"], other["kvmtrace_cpu_s"]) == ("1", "10", "0.04")
    assert rec[2]["pid"] == "100"


def test_csv_refuses_foreign_file(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataFileError, match="not a kvmtrace top CSV"):
        CsvSink(str(path))
    with pytest.raises(DataFileError, match="cannot write"):
        CsvSink(str(tmp_path / "no" / "such" / "dir.csv"))


# ---------------------------------------------------------------------------- run_live


def test_run_live_once_reads_one_interval():
    s = SyntheticSession(sleep=False)
    out = io.StringIO()
    final = run_live(s, once=True, out=out)
    assert s.reads == 1 and final.seq == 1
    text = out.getvalue()
    assert "\x1b" not in text  # no colour or cursor codes off a terminal
    lines = text.splitlines()
    assert lines[0].startswith("# kvmtrace top interval: host testhost kernel 6.18.0-test interval_s 1.000")
    assert lines[4].split()[:6] == ["4242", "guest-a", "37", "2", "1000.0", "10.0"]
    assert lines[-1].startswith("total")


def test_run_live_log_mode_and_csv(tmp_path):
    s = SyntheticSession(sleep=False, count=6)
    out = io.StringIO()
    path = tmp_path / "top.csv"
    final = run_live(s, log=True, csv_path=str(path), out=out)
    assert final.seq == 6 and s.reads == 6  # maps read once per interval
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["time", "vms", "unmap/s"]
    assert [line.split()[1] for line in lines[1:7]] == ["1", "1", "2", "2", "2", "1"]  # VMs shown per interval
    assert lines[7].split()[0] == "total" and len(lines) == 8
    rows = list(csv.reader(path.open()))
    assert len(rows) == 1 + 6 + 3  # header, guest-a every interval, 4343 in intervals 3..5


def test_run_live_batch_mode_when_stdout_not_a_tty():
    s = SyntheticSession(sleep=False, count=2)
    out = io.StringIO()
    run_live(s, out=out)
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.count("# kvmtrace top interval:") == 2
    assert text.count("# kvmtrace top summary since start:") == 1


def test_run_live_ctrl_c_prints_summary():
    class Interrupted(SyntheticSession):
        def snapshots(self, duration=None, stop=None):
            for i, snap in enumerate(super().snapshots(duration, stop)):
                if i == 3:
                    raise KeyboardInterrupt
                yield snap

    out = io.StringIO()
    final = run_live(Interrupted(sleep=False), out=out)
    assert final.seq == 3
    tail = out.getvalue().split("# kvmtrace top summary since start:")[1].splitlines()
    assert tail[0].strip().endswith("elapsed_s 3.000")
    # since start: guest-a 3000 unmaps / 3 s; 4343: 200 unmaps in its one interval / 3 s = 66.7/s
    body = {line.split()[0]: line.split() for line in tail[3:]}
    assert body["4242"][4] == "1000.0" and body["4343"][4] == "66.7"


def test_run_live_nothing_collected():
    class Empty(SyntheticSession):
        def snapshots(self, duration=None, stop=None):
            raise KeyboardInterrupt
            yield

    out = io.StringIO()
    assert run_live(Empty(sleep=False), out=out) is None
    assert out.getvalue() == "kvmtrace top: stopped before the first interval completed\n"


def test_options_validation():
    with pytest.raises(UsageError, match="unknown sort key"):
        make_options(sort="cpu")
    with pytest.raises(UsageError, match="unknown op"):
        make_options(ops=("unmapp",))
    with pytest.raises(UsageError, match="interval must be positive"):
        make_options(interval=0)
    with pytest.raises(UsageError, match="exclude each other"):
        run_live(SyntheticSession(sleep=False), once=True, log=True, out=io.StringIO())
    assert make_options(ops=("age", "unmap")).ops == ("unmap", "age")  # consts.Op order


def test_meta_fallbacks():
    m = live_mod.merged_meta(snapshot_at(1), {"kernel": "k2", "plan": object()})
    assert m["host"] == "testhost" and m["kernel"] == "k2" and "plan" not in m
    assert live_mod.merged_meta(None, None)["host"]  # platform.node()


def test_narrow_terminal_hides_columns_instead_of_cutting_numbers():
    cum = snapshot_at(4)
    text = render_text(cum, cum.delta(snapshot_at(3)), META, PLAN, ViewOptions(), 50)
    lines = text.splitlines()
    assert all(len(line) <= 50 for line in lines)
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("PID"))
    assert lines[head].split() == ["PID", "VM", "unmap", "age", "test_age", "p50", "p99", "mean"]
    # 1000 unmaps at 900/1500 ns in the interval; 200 unmaps at 3000 ns for pid 4343
    assert lines[head + 1].split() == ["4242", "guest-a", "1.0k", "10", "0", "1.0µs", "2.0µs", "1.0"]
    assert lines[head + 2].split() == ["4343", "python3", "200", "0", "0", "3.1µs", "4.1µs", "2.0"]
    assert lines[head + 3].split()[:2] == ["total", "(…"]
    assert lines[head + 4] == "(7 columns hidden: terminal too narrow)"


# ---------------------------------------------------------------------------- the command


def test_command_once_with_a_fake_session(monkeypatch):
    """`kvmtrace top --once` end to end through click, the tracer replaced by the synthetic
    session (the command imports kvmtrace.tracer.session lazily)."""
    import types

    from click.testing import CliRunner

    from kvmtrace.commands.top import top

    made = {}

    class FakeSession(SyntheticSession):
        def __init__(self, pid=None, interval=1.0, modes=None, self_cost="sampled"):
            super().__init__(interval=interval, sleep=False)
            made.update(pid=pid, interval=interval)

    fake = types.ModuleType("kvmtrace.tracer.session")
    fake.TraceSession = FakeSession
    monkeypatch.setitem(__import__("sys").modules, "kvmtrace.tracer.session", fake)
    r = CliRunner().invoke(top, ["--once", "--interval", "0.5", "--pid", "4242", "--op", "unmap"])
    assert r.exit_code == 0, r.output
    assert made == {"pid": 4242, "interval": 0.5}
    lines = r.output.splitlines()
    assert lines[3].split()[:5] == ["pid", "vm", "memslots", "vcpus", "unmap/s"]
    # 1000 unmaps in a 0.5 s interval
    assert lines[4].split()[:5] == ["4242", "guest-a", "37", "2", "2000.0"]

    r = CliRunner().invoke(top, ["--once", "--log"])
    assert r.exit_code != 0 and "exclude each other" in r.output
    r = CliRunner().invoke(top, ["--sort", "cpu"])
    assert r.exit_code != 0 and "cpu" in r.output


# ---------------------------------------------------------------------------- keys (issue 26 #4)


def press(controls, *keys):
    acts = [controls.press(k) for k in keys]
    return acts[-1]


def typed(controls, key, text):
    """Open the prompt of ``key``, type ``text`` and Enter."""
    return press(controls, key, *text, "\r")


def test_keys_help_overlay_exact_lines():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0, keys=True))
    assert press(c, "?").redraw and c.opts.help
    lines = screen(opts=c.opts).splitlines()
    assert lines[4] == "VMs 2 running · sort ops · keys: ? help, q quit"
    assert lines[5:] == [""] + HELP_SCREEN
    # any key closes it and does nothing else; h opens it too; q closes it and quits
    act = press(c, "o")
    assert not c.opts.help and not c.opts.reverse and act.redraw and not act.quit
    press(c, "h")
    assert c.opts.help
    assert press(c, "q").quit


def test_keys_kvm_stat_moves_sort_and_pause():
    """kvm_stat's s (interval) and p (pid filter) replaced kvmtrace's old sort and pause keys:
    sort is < >, pause is the space bar."""
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions())
    seen = [c.opts.sort]
    for _ in range(4):
        press(c, ">")
        seen.append(c.opts.sort)
    assert seen == ["ops", "latency", "slots", "pid", "ops"]
    press(c, "<")
    assert c.opts.sort == "pid"
    act = press(c, " ")
    assert c.opts.paused and not act.unpause
    act = press(c, " ")
    assert not c.opts.paused and act.unpause
    press(c, "s")
    assert c.opts.prompt == "update interval in seconds (0.1 to 3600): " and c.opts.sort == "pid"
    press(c, "\x1b")
    assert c.opts.prompt is None
    press(c, "p")
    assert c.opts.prompt == "filter by pid (e.g. 4242,4343): " and not c.opts.paused


def test_keys_reverse_sort_on_the_screen():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0))
    press(c, "o")
    lines = screen(opts=c.opts).splitlines()
    assert lines[4] == "VMs 2 running · sort ops reversed"
    rows = [line.split()[0] for line in lines[8:11]]
    assert rows == ["200", "100", "total"]  # 3.0/s before 200/s
    press(c, "o")
    assert [line.split()[0] for line in screen(opts=c.opts).splitlines()[8:10]] == ["100", "200"]


def test_keys_pid_filter_typed_with_errors_kept_in_the_prompt():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0))
    press(c, "p", "2", "0", "x")
    assert c.opts.prompt == "filter by pid (e.g. 4242,4343): 20x"
    act = press(c, "\r")  # refused: the prompt stays, with the reason
    assert act.redraw and c.opts.pids == ()
    lines = screen(opts=c.opts).splitlines()
    assert lines[5:7] == ["filter by pid (e.g. 4242,4343): 20x_", "not a pid: 20x (type pids such as 4242,4343)"]
    press(c, "\x7f", "0", "\r")
    assert c.opts.pids == (200,) and c.opts.prompt is None and c.opts.message == ""
    lines = screen(opts=c.opts).splitlines()
    assert lines[4] == "VMs 2 running · filter pid=200 (1 hidden) · sort ops"
    assert [line.split()[0] for line in lines[6:] if line[:1].isdigit()] == ["200"]
    # the prompt starts empty (the filter in force is in the header); an empty line clears it
    press(c, "p")
    assert c.opts.prompt.endswith("4343): ")
    press(c, "\r")
    assert c.opts.pids == ()
    # several pids, spaces or commas; a pid too large for Linux is refused
    typed(c, "p", "100, 200 100")
    assert c.opts.pids == (100, 200)
    typed(c, "p", "99999999")
    assert c.opts.message.startswith("not a pid: 99999999") and c.opts.pids == (100, 200)
    press(c, "\x1b")
    assert c.opts.prompt is None and c.opts.message == "" and c.opts.pids == (100, 200)


def test_keys_guest_and_op_filters_and_clear():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0))
    typed(c, "g", "WE")  # a case-insensitive part of the name, as --vm
    assert c.opts.vms == ("WE",)
    text = screen(opts=c.opts)
    assert "filter vm=WE (1 hidden)" in text and "100 web" in text and "\n200 " not in text
    typed(c, "f", "^(unmap|age)$")
    assert c.opts.ops == ("unmap", "age")
    head = next(line for line in screen(opts=c.opts).splitlines() if line.startswith("PID"))
    assert head.split()[4:6] == ["unmap", "age"] and "test_age" not in head
    typed(c, "f", "(")
    assert c.opts.message.startswith("not a regular expression: ( (") and c.opts.ops == ("unmap", "age")
    press(c, "\x1b")
    typed(c, "f", "nothing")
    assert c.opts.message == "no op matches nothing (ops: unmap, age, test_age, change_pte)"
    press(c, "\x1b")
    typed(c, "p", "100")
    assert press(c, "c").redraw
    assert (c.opts.pids, c.opts.vms, c.opts.ops) == ((), (), ())


def test_keys_interval_change():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0))
    act = typed(c, "s", "0.5")
    assert act.interval == 0.5 and c.opts.interval == 0.5
    assert screen(opts=c.opts).splitlines()[0].startswith("kvmtrace top · host h1 · kernel 6.18.0 · interval 0.5s")
    for bad in ("0.05", "nan", "inf", "7200", "1e", "-1"):
        act = typed(c, "s", bad)
        assert act.interval is None and c.opts.interval == 0.5
        assert c.opts.message == f"the interval is a number of seconds from 0.1 to 3600, not {bad}"
        press(c, "\x1b")
    assert typed(c, "s", "").interval is None and c.opts.prompt is None  # nothing typed: unchanged
    fixed = Controls(ViewOptions(interval=2.0), can_set_interval=False)
    press(fixed, "s")
    assert fixed.opts.prompt is None and fixed.opts.message == "this source's interval cannot be changed"


def test_keys_reset_zeroes_the_figures_since_start():
    from kvmtrace.dashboard.keys import Controls

    c = Controls(ViewOptions(interval=2.0))
    assert press(c, "r").reset
    # the driver keeps the snapshot on screen as the base: right after the reset nothing is
    # counted since it; the interval's rates stay
    lines = screen(opts=c.opts, base=CUR).splitlines()
    assert lines[0] == "kvmtrace top · host h1 · kernel 6.18.0 · interval 2.0s · up 3s · reset 0s ago"
    assert lines[3].startswith("lost events 1 (since reset 0) · map full 0")
    assert lines[8].split()[:5] == ["100", "web", "10", "4", "200"]
    assert lines[-3:] == ["VM 100 web · since reset: 0 ops (unmap,age,test_age)",
                          "latency ns (syscall)    slots visited (derived)",
                          "(no data)               (no data)"]
    # reset one interval earlier: the panel counts the interval's 400 ops
    text = screen(opts=c.opts, base=PREV)
    assert "· reset 2s ago" in text and "VM 100 web · since reset: 400 ops" in text


def test_keys_ignore_escape_sequences_and_control_characters():
    from kvmtrace.dashboard.keys import Controls
    from kvmtrace.dashboard.terminal import split_keys

    assert split_keys("o\x1b[A\x1bOP\x1b\r\x7fé") == ["o", "\x1b[A", "\x1bOP", "\x1b", "\r", "\x7f", "é"]
    c = Controls(ViewOptions())
    before = c.opts
    for k in ("\x1b[A", "\x1bOP", "\x1b", "x", "\x07"):
        assert not press(c, k).redraw
    assert c.opts == before
    press(c, "g", "\x1b[A", "a", "\x07", "\x1b[B", "b")
    assert c.opts.prompt.endswith(": ab")


def test_keys_typed_and_vmm_names_stay_escaped():
    """A guest filter typed by the user and the names a VMM chose are shown as data:
    control characters as visible escapes, rich markup as text."""
    from kvmtrace.dashboard.keys import Controls

    evil = VmInfo("pid:300", 300, comm="x", name="[red]ev\x1b]0;pwn\x07il", vcpus=1, memslots=1)
    h = HvaStats("pid:300", 300, "unmap", count=4)
    cum = Snapshot(2, 1002.0, 3_000_000_000, 3.0, vms=(A, evil), hva=(HA, h))
    c = Controls(ViewOptions(interval=2.0))
    press(c, "g", *"[red]ev")
    text = screen(cum=cum, delta=cum.delta(None), opts=c.opts)
    assert "filter by guest name or command: [red]ev_" in text
    press(c, "\r")
    text = screen(cum=cum, delta=cum.delta(None), opts=c.opts)
    assert "\x1b" not in text and "\x07" not in text
    assert "filter vm=[red]ev (1 hidden)" in text
    assert "300 [red]ev\\x1b]0;p" in text  # escaped, cut to the column
    assert "VM 300 [red]ev\\x1b]0;pwn\\x07il" in text


def test_keys_table_is_the_one_in_docs_and_help():
    """docs/top.md's key table, the help overlay and `top --help` list the same keys."""
    import pathlib

    from click.testing import CliRunner

    from kvmtrace.commands.top import top
    from kvmtrace.dashboard.keys import KEYS

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "top.md").read_text()
    section = doc.split("## Keys (on a terminal)", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    documented = [" ".join(k.strip().replace("`", "").split(", ")) for k, _ in rows]
    assert documented == [k for k, _ in KEYS]
    helptext = CliRunner().invoke(top, ["--help"]).output
    for k, what in KEYS:
        assert f"{k:<5}  {what}" in helptext


def test_plain_table_total_row_wording():
    """issue 26 #4: the totals row read `total  1_VM`."""
    cum = snapshot_at(1)
    lines = plain_table(cum, cum.delta(None), META, PLAN, ViewOptions()).splitlines()
    assert lines[-1].split()[:2] == ["total", "all_VMs"]


def test_workload_vcpu_count_as_top_sees_it_matches_the_ground_truth():
    """issue 26 #4: `top` showed `vCPU 0` for the built-in workload's VM although its vCPU ran.
    top counts a VM's vCPUs by its VMM's anon_inode:kvm-vcpu:N descriptors
    (tracer.host.proc_info, what the tracer's decoder calls for every snapshot); the workload
    closed its vCPU descriptor right after the run. Needs root and /dev/kvm."""
    import os

    from kvmtrace.tracer.host import dev_kvm, proc_info
    from kvmtrace.workload import Workload

    kvm = dev_kvm()
    if os.geteuid() != 0 or not kvm.accessible:
        pytest.skip(f"needs root and /dev/kvm: {kvm.detail}")
    with Workload(slots=8, slot_size=64 << 10, scenario="unmap", iterations=1, handle_signals=False) as wl:
        during_setup = proc_info(os.getpid()).vcpus
        wl.run()
        after_run = proc_info(os.getpid()).vcpus
    truth = wl.ground_truth()
    if truth["vcpu"].startswith("not tried"):
        pytest.skip(f"the workload's vCPU: {truth['vcpu']}")
    assert truth["vcpu"] == "ran" and truth["vcpus"] == 1
    assert during_setup == after_run == truth["vcpus"]
    assert proc_info(os.getpid()).vcpus == 0  # released with the VM


def test_trace_session_applies_an_interval_change_to_the_interval_under_way():
    """Key s sets ``session.interval``; TraceSession.snapshots waits for the new length from
    the interval under way (a 1 h interval changed to 0.5 s must not wait the hour). No BPF:
    the snapshot read is replaced."""
    import threading
    import time

    from kvmtrace.tracer.session import TraceSession

    s = TraceSession.__new__(TraceSession)
    s.interval, s.interrupted = 30.0, False
    s.snapshot = lambda drain_wait=-1: Snapshot(1, time.time(), time.monotonic_ns(), 0.0)
    gen = s.snapshots(duration=10.0)
    t0 = time.monotonic()
    threading.Timer(0.2, lambda: setattr(s, "interval", 0.5)).start()
    next(gen)
    first = time.monotonic() - t0
    next(gen)
    second = time.monotonic() - t0 - first
    gen.close()
    assert 0.45 <= first < 2.0  # 0.5 s from the start, not 30 s (nor the 10 s duration)
    assert 0.3 <= second < 2.0
