"""`kvmtrace export --perfetto`: the trace decoded with the Perfetto protos the `perfetto` package
ships (perfetto_trace_pb2), its slices per VM and op, their durations and its counters checked
against `report`'s figures for the same recording; recordings without raw events, damaged and
missing recordings, existing outputs and hostile VM names. Optional: SQL counts through a
trace_processor_shell named by KVMTRACE_TRACE_PROCESSOR (the perfetto package would download
one, which these machines cannot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest

from kvmtrace.analysis.recording import read_inputs
from kvmtrace.analysis.report import build_report
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.cli import main
from kvmtrace.snapshot import VmInfo

pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2",
                         reason="the perfetto Python package is not installed (pip install perfetto)")

HOSTILE = "web\x1b[31m1\n\u202e\x9b"  # ESC, newline, bidi override, C1 CSI


def make(path, events=True, intervals=4, fmt="parquet"):
    vms = [SynthVm("vm:4242:1", 4242, comm="qemu", name=HOSTILE, memslots=12),
           SynthVm("vm:4243:1", 4243, comm="qemu\x07", memslots=40)]
    ops = [
        # 2 ms latencies at 300 per interval on one thread: slices overlap, lanes are needed
        SynthOp("vm:4242:1", op="unmap", per_interval=300, slots=2, lat_median_ns=2e6),
        SynthOp("vm:4242:1", op="age", per_interval=40, slots=1),
        SynthOp("vm:4243:1", op="unmap", per_interval=90, slots=3, scanned=40),
        SynthOp("vm:4243:1", op="test_age", per_interval=20, slots=1, lat_provenance="syscall",
                slots_provenance="derived"),
        SynthOp("vm:4242:1", change="create", per_interval=2),
        SynthOp("vm:4243:1", change="delete", per_interval=1, lat_median_ns=5e4),
    ]
    snaps, evs = simulate(vms, ops, intervals=intervals, events=events, seed=7)
    return record_synthetic(str(path), snaps, evs if events else None, fmt=fmt)


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    o = capsys.readouterr()
    return e.value.code, o.out, o.err


def decode(path):
    t = pb.Trace()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return t


class Decoded:
    """Tracks, slices (with durations) and counter values of a decoded trace."""

    def __init__(self, trace):
        self.tracks = {}
        self.slices = []  # (vm track name, lane track uuid, name, ts, dur or None, annotations)
        self.counters = defaultdict(list)  # (parent name, counter name) -> [(ts, value)]
        self.ts = []
        open_ = {}
        for p in trace.packet:
            assert p.trusted_packet_sequence_id, "every packet names its sequence"
            if p.HasField("track_descriptor"):
                d = p.track_descriptor
                assert d.uuid not in self.tracks, "a track is described once"
                self.tracks[d.uuid] = d
                continue
            if not p.HasField("track_event"):
                continue
            e = p.track_event
            assert e.track_uuid in self.tracks, "a track is described before its first event"
            self.ts.append(p.timestamp)
            d = self.tracks[e.track_uuid]
            parent = self.tracks[d.parent_uuid].name if d.parent_uuid else ""
            if e.type == e.TYPE_COUNTER:
                v = e.double_counter_value if e.HasField("double_counter_value") else e.counter_value
                self.counters[(parent, d.name)].append((p.timestamp, v))
            elif e.type == e.TYPE_SLICE_BEGIN:
                assert e.track_uuid not in open_, "slices on one track never overlap (lanes)"
                ann = {a.name: self._value(a) for a in e.debug_annotations}
                open_[e.track_uuid] = len(self.slices)
                self.slices.append([parent, e.track_uuid, e.name, p.timestamp, None, ann, list(e.categories)])
            elif e.type == e.TYPE_SLICE_END:
                i = open_.pop(e.track_uuid)
                self.slices[i][4] = p.timestamp - self.slices[i][3]
            elif e.type == e.TYPE_INSTANT:
                ann = {a.name: self._value(a) for a in e.debug_annotations}
                self.slices.append([parent, e.track_uuid, e.name, p.timestamp, None, ann, list(e.categories)])
        assert not open_, "every slice ends"

    @staticmethod
    def _value(a):
        return getattr(a, a.WhichOneof("value"))

    def by_vm_and_name(self):
        out = defaultdict(list)
        for vm, _uuid, name, _ts, dur, _ann, _cat in self.slices:
            out[(vm, name)].append(dur)
        return out


@pytest.fixture(scope="module")
def rec_events(tmp_path_factory):
    return make(tmp_path_factory.mktemp("pf") / "run1")


@pytest.fixture(scope="module")
def exported(rec_events, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "run1.perfetto-trace"
    with pytest.raises(SystemExit) as e:
        main(["export", "--perfetto", rec_events, "-o", str(out)])
    assert e.value.code == 0
    return out


def test_slices_per_vm_and_op_and_their_durations_equal_the_report(rec_events, exported):
    rep = build_report(read_inputs([rec_events]))
    got = Decoded(decode(exported)).by_vm_and_name()
    hva = rep["hva_ops"]
    assert len(hva) == 4 and set(hva["latency_source"]) == {"raw events"}  # exact figures to compare with
    for _, r in hva.iterrows():
        durs = got.pop((r["vm_label"], r["op"]))
        assert len(durs) == r["count"]
        known = np.array([d for d in durs if d is not None], dtype=np.int64)
        assert len(known) == r["lat_n"]
        assert list(np.percentile(known, [50, 90, 99])) == [r["lat_p50_ns"], r["lat_p90_ns"], r["lat_p99_ns"]]
        assert float(known.max()) == r["lat_max_ns"]
        assert int(known.sum()) / len(known) == r["lat_mean_ns"]
    mem = rep["memslot_updates"]
    assert len(mem) == 2 and set(mem["latency_source"]) == {"raw events"}
    for _, r in mem.iterrows():
        durs = np.array(got.pop((r["vm_label"], f"memslot {r['change']}")), dtype=np.int64)
        assert len(durs) == r["count"]
        assert list(np.percentile(durs, [50, 90, 99])) == [r["lat_p50_ns"], r["lat_p90_ns"], r["lat_p99_ns"]]
        assert float(durs.max()) == r["lat_max_ns"]
    assert not got, f"slices the report does not know: {sorted(got)}"


def test_counters_are_the_rates_per_interval_and_average_to_the_report(rec_events, exported):
    recs = read_inputs([rec_events])
    rep = build_report(recs)
    iv = recs[0]["intervals"].sort_values("interval")
    elapsed = iv["elapsed_s"].to_numpy()
    d = Decoded(decode(exported))
    for _, r in rep["hva_ops"].iterrows():
        vals = d.counters.pop((r["vm_label"], f"{r['op']}/s"))
        assert len(vals) == len(iv)
        rates = np.array([v for _, v in vals])
        assert float(np.dot(rates, elapsed)) == pytest.approx(r["count"], rel=1e-12)
        assert float(np.dot(rates, elapsed) / elapsed.sum()) == pytest.approx(r["rate_per_s"], rel=1e-12)
        # one value per interval, at the interval's start: consecutive values one interval apart
        ts = np.array([t for t, _ in vals])
        assert list(np.diff(ts)) == [round(e * 1e9) for e in elapsed[:-1]]
    for _, r in rep["memslot_updates"].iterrows():
        vals = d.counters.pop((r["vm_label"], f"memslot {r['change']}/s"))
        assert float(np.dot([v for _, v in vals], elapsed)) == pytest.approx(r["count"], rel=1e-12)
    lost = d.counters.pop((f"kvmtrace {recs[0].source}", "lost events"))
    assert sum(v for _, v in lost) == rep["sources"]["lost_events"].sum()
    assert not d.counters


def test_trace_is_in_time_order_on_the_events_clock(rec_events, exported):
    d = Decoded(decode(exported))
    assert d.ts == sorted(d.ts)
    recs = read_inputs([rec_events])
    ev = recs[0].tables["hva_events"]
    # the raw events' own timestamps, and the intervals placed on the same clock around them
    assert sorted(s[3] for s in d.slices if "hva" in s[6]) == sorted(ev["ts_ns"].tolist())
    first = min(t for vals in d.counters.values() for t, _ in vals)
    assert first <= int(ev["ts_ns"].min())
    assert max(t for vals in d.counters.values() for t, _ in vals) <= int(ev["ts_ns"].max())


def test_slices_carry_op_range_slots_and_provenance(rec_events, exported):
    d = Decoded(decode(exported))
    ev = read_inputs([rec_events])[0].tables["hva_events"]
    by_ts = {(int(t), int(s)): row for t, s, row in zip(ev["ts_ns"], ev["start"], ev.itertuples(index=False))}
    hva = [s for s in d.slices if "hva" in s[6]]
    assert len(hva) == len(ev)
    for _vm, _uuid, name, ts, dur, ann, _cat in hva:
        row = by_ts[(ts, ann["start"])]
        assert ann["op"] == name == row.op
        assert (ann["start"], ann["end"], ann["range_bytes"]) == (row.start, row.end, row.end - row.start)
        assert ann["slots_visited"] == row.slots
        assert ann["slots_scanned"] == (row.scanned if row.scanned >= 0 else "not measured")
        assert ann["memslots"] == row.memslots
        assert (ann["lat_provenance"], ann["slots_provenance"]) == (row.lat_provenance, row.slots_provenance)
        assert ann["latency_ns"] == dur == row.latency_ns
        assert ann["tid"] == row.tid
    mem = [s for s in d.slices if "memslot" in s[6]]
    assert mem and all({"change", "slot", "as_id", "gpa", "size", "hva", "flags", "result", "change_provenance",
                        "lat_provenance"} <= set(s[5]) for s in mem)


def test_overlapping_operations_spread_over_lanes_of_one_name(exported):
    d = Decoded(decode(exported))
    vm_tracks = {u: t for u, t in d.tracks.items() if not t.parent_uuid and not t.name.startswith("kvmtrace ")}
    assert len(vm_tracks) == 2  # one track per VM
    lanes = defaultdict(set)
    for vm, uuid, *_ in d.slices:
        lanes[vm].add(d.tracks[uuid].name)
    assert all(names <= {"hva ops", "memslot updates"} for names in lanes.values())
    busy = VmInfo(vm_id="", pid=4242, comm="qemu", name=HOSTILE, ordinal=1).label
    used = {u for vm, u, name, *_ in d.slices if vm == busy and name == "unmap"}
    assert len(used) > 1, "overlapping 2 ms unmaps need more than one lane"


def test_hostile_vm_names_are_printable_track_names(exported):
    d = Decoded(decode(exported))
    names = [t.name for t in d.tracks.values()] + [t.description for t in d.tracks.values()]
    assert all(n.isprintable() for n in names), [n for n in names if not n.isprintable()]
    label = VmInfo(vm_id="", pid=4242, comm="qemu", name=HOSTILE, ordinal=1).label
    assert label in names and "\\x1b[31m1\\n\\u202e\\x9b" in label
    assert any("comm qemu\\x07" in n for n in names)


def test_without_raw_events_the_trace_has_counters_and_says_slices_need_events(tmp_path, capsys):
    rec = make(tmp_path / "noev", events=False)
    out = tmp_path / "t.pftrace"
    code, stdout, err = cli(["export", "--perfetto", rec, "-o", str(out)], capsys)
    assert code == 0, err
    lines = [x for x in err.splitlines() if x]
    assert len(lines) == 1 and "no raw events" in lines[0] and "record --events" in lines[0]
    d = Decoded(decode(out))
    assert d.slices == []
    rep = build_report(read_inputs([rec]))
    for _, r in rep["hva_ops"].iterrows():
        assert sum(v for _, v in d.counters[(r["vm_label"], f"{r['op']}/s")]) == pytest.approx(r["count"])


def test_recording_without_clock_pair_estimates_the_offset(tmp_path, capsys):
    rec = make(tmp_path / "old", intervals=3)
    meta_path = os.path.join(rec, "kvmtrace-recording.json")
    with open(meta_path) as f:
        meta = json.load(f)
    true_offset = meta["clock"]["monotonic_ns"] - round(meta["clock"]["realtime_s"] * 1e9)
    del meta["clock"]  # as recordings made before the pair was stored
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    out = tmp_path / "t.pftrace"
    code, stdout, err = cli(["export", "--perfetto", rec, "-o", str(out)], capsys)
    assert code == 0, err
    assert "clock: estimated from raw events" in stdout
    d = Decoded(decode(out))
    iv = read_inputs([rec])[0]["intervals"]
    first = min(t for vals in d.counters.values() for t, _ in vals)
    estimated = first - round(float(iv["t_start"].min()) * 1e9)
    # a lower bound of the true offset (events precede their interval's snapshot), within one interval
    assert true_offset - 1e9 < estimated <= true_offset


def test_unknown_latency_is_an_instant_and_events_held_in_memory_export(rec_events):
    import io

    from kvmtrace.analysis.perfetto import export_perfetto

    rec = read_inputs([rec_events])[0]
    ev = rec.tables["hva_events"].copy()
    ev["latency_ns"] = ev["latency_ns"].where(ev.index % 3 != 0, -1)
    ev["lat_provenance"] = ev["lat_provenance"].astype(str).where(ev.index % 3 != 0, "none")
    rec.tables["hva_events"] = ev
    rec.tables["memslot_events"] = rec.tables["memslot_events"]
    rec.events = {}  # tables held in memory, as a rotated recording's
    buf = io.BytesIO()
    s = export_perfetto(rec, buf)
    t = pb.Trace()
    t.ParseFromString(buf.getvalue())
    d = Decoded(t)
    hva = [x for x in d.slices if "hva" in x[6]]
    assert s.hva_slices == len(hva) == len(ev)
    instants = [x for x in hva if x[4] is None]
    assert len(instants) == int((ev["latency_ns"] < 0).sum())
    assert all(x[5]["latency_ns"] == "unknown" and x[5]["lat_provenance"] == "none" for x in instants)


def test_csv_recording_exports_the_same_slices(tmp_path, capsys):
    rec = make(tmp_path / "csvrec", fmt="csv", intervals=2)
    out = tmp_path / "t.pftrace"
    code, _, err = cli(["export", "--perfetto", rec, "-o", str(out)], capsys)
    assert code == 0, err
    rep = build_report(read_inputs([rec]))
    got = Decoded(decode(out)).by_vm_and_name()
    for _, r in rep["hva_ops"].iterrows():
        assert len(got[(r["vm_label"], r["op"])]) == r["count"]


@pytest.mark.parametrize("damage", ["missing", "file", "meta", "part"])
def test_missing_or_damaged_recording_is_one_line_and_writes_nothing(damage, tmp_path, capsys):
    rec = tmp_path / "r"
    if damage == "missing":
        pass
    elif damage == "file":
        rec.write_text("not a recording")
    else:
        make(rec, intervals=2)
        if damage == "meta":
            (rec / "kvmtrace-recording.json").write_text('{"format": "kvmtrace-recording", "format_ver')
        else:
            part = sorted((rec / "hva_events").glob("part-*.parquet"))[0]
            data = bytearray(part.read_bytes())
            data[len(data) // 2] ^= 0xFF
            part.write_bytes(bytes(data))
    out = tmp_path / "t.pftrace"
    code, stdout, err = cli(["export", "--perfetto", str(rec), "-o", str(out)], capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[0].startswith("kvmtrace: ") and "Traceback" not in err and len(lines) <= 2
    assert not out.exists() and not list(tmp_path.glob("t.pftrace*"))


def test_existing_output_is_never_overwritten_without_force(rec_events, tmp_path, capsys):
    out = tmp_path / "t.pftrace"
    out.write_bytes(b"keep me")
    code, _, err = cli(["export", "--perfetto", rec_events, "-o", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    # a link there is refused too, and with --force replaced by the new file, never written through
    target = tmp_path / "victim"
    target.write_bytes(b"victim")
    link = tmp_path / "link.pftrace"
    link.symlink_to(target)
    code, _, err = cli(["export", "--perfetto", rec_events, "-o", str(link)], capsys)
    assert code == 2 and target.read_bytes() == b"victim"
    code, _, err = cli(["export", "--perfetto", rec_events, "-o", str(link), "--force"], capsys)
    assert code == 0, err
    assert target.read_bytes() == b"victim" and not link.is_symlink()
    assert len(decode(link).packet) > 0
    code, _, err = cli(["export", "--perfetto", rec_events, "-o", str(out), "--force"], capsys)
    assert code == 0 and out.read_bytes() != b"keep me"


def test_default_output_name_and_a_format_is_required(rec_events, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["export", rec_events], capsys)
    assert code == 2 and "--perfetto" in err and len(err.splitlines()) == 2
    code, out, err = cli(["export", "--perfetto", rec_events], capsys)
    assert code == 0, err
    assert (tmp_path / "run1.perfetto-trace").exists() and "wrote run1.perfetto-trace" in out


def test_large_export_reports_progress_on_stderr(tmp_path, capsys, monkeypatch):
    from kvmtrace.analysis import perfetto as P

    rec = make(tmp_path / "r", intervals=2)
    clock = iter(range(0, 10**6, 2))  # every reading of the clock is 2 s later
    monkeypatch.setattr(P, "_now", lambda: float(next(clock)))
    monkeypatch.setattr(P, "_STREAM_ROWS", 256)
    code, _, err = cli(["export", "--perfetto", rec, "-o", str(tmp_path / "t.pftrace")], capsys)
    assert code == 0, err
    prog = [x for x in err.splitlines() if x.startswith("kvmtrace: export: ")]
    assert len(prog) >= 2 and prog[-1].startswith("kvmtrace: export: ") and "raw events" in prog[-1]


# ------------------------------------------------------------------- trace_processor (optional)

TP = os.environ.get("KVMTRACE_TRACE_PROCESSOR", "")


@pytest.mark.skipif(not TP, reason="no trace_processor_shell: set KVMTRACE_TRACE_PROCESSOR=/path/to/"
                                   "trace_processor_shell (the perfetto package downloads one, which this "
                                   "machine cannot)")
def test_trace_processor_counts_equal_the_report(rec_events, exported):
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    rep = build_report(read_inputs([rec_events]))
    tp = TraceProcessor(trace=str(exported), config=TraceProcessorConfig(bin_path=TP))
    try:
        rows = tp.query("""SELECT p.name AS vm, s.name AS op, count(*) AS n, sum(s.dur) AS dur
                           FROM slice s JOIN track t ON s.track_id = t.id
                           JOIN track p ON p.id = t.parent_id GROUP BY 1, 2""").as_pandas_dataframe()
        stats = tp.query("SELECT name, value FROM stats WHERE severity IN ('error', 'data_loss') AND value > 0"
                         ).as_pandas_dataframe()
    finally:
        tp.close()
    assert stats.empty, stats.to_dict("records")
    got = {(r.vm, r.op): (int(r.n), int(r.dur)) for r in rows.itertuples()}
    for _, r in rep["hva_ops"].iterrows():
        n, dur = got[(r["vm_label"], r["op"])]
        assert n == r["count"] and dur == pytest.approx(r["lat_mean_ns"] * r["lat_n"])


# ------------------------------------------------------------------- a real VM (root)


@pytest.mark.root
def test_real_vm_recording_exports_its_operations(tmp_path):
    from kvmtrace.tracer import session as S

    why = S.tracing_unavailable()
    if why:
        pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {why}")
    kt = [sys.executable, "-m", "kvmtrace.cli"]
    rec = tmp_path / "rec"
    p = subprocess.Popen(kt + ["record", "-o", str(rec), "--interval", "0.5", "--events", "--modes", "tracepoint"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert line.startswith("kvmtrace: attached"), line + p.stderr.read()
    truth_file = tmp_path / "truth.json"
    w = subprocess.run([sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(truth_file),
                        "--slots", "8", "--scenario", "churn", "--iterations", "1"],
                       capture_output=True, text=True, timeout=120)
    assert w.returncode == 0, w.stderr
    time.sleep(1.0)
    import signal

    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    truth = json.loads(truth_file.read_text())
    out = tmp_path / "t.pftrace"
    r = subprocess.run(kt + ["export", "--perfetto", str(rec), "-o", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rep = build_report(read_inputs([str(rec)]))
    got = Decoded(decode(out)).by_vm_and_name()
    mine = rep["memslot_updates"][rep["memslot_updates"]["pid"] == truth["pid"]]
    assert not mine.empty
    for _, m in mine.iterrows():
        assert len(got[(m["vm_label"], f"memslot {m['change']}")]) == m["count"] == truth["memslot_updates"][m["change"]]
    for _, h in rep["hva_ops"][rep["hva_ops"]["pid"] == truth["pid"]].iterrows():
        assert len(got[(h["vm_label"], h["op"])]) == h["count"]


def test_a_directory_of_several_recordings_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "fleet").mkdir()
    make(tmp_path / "fleet" / "a", intervals=1)
    make(tmp_path / "fleet" / "b", intervals=1)
    out = tmp_path / "t.pftrace"
    code, _, err = cli(["export", "--perfetto", str(tmp_path / "fleet"), "-o", str(out)], capsys)
    assert code == 2 and "holds 2 recordings; export takes one" in err and "Traceback" not in err
    assert not out.exists()
