"""Recorder and readers: round trip, crash tolerance, rejection of bad inputs (no root)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from kvmtrace.analysis import tables as T
from kvmtrace.analysis.recorder import Recorder
from kvmtrace.analysis.recording import META_FILE, escape_cell, read_inputs, read_recording, unescape_cell
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.errors import DataFileError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")


def run(intervals=3, events=True):
    vm = SynthVm("ffff1", 100, comm="qemu", memslots=12)
    ops = [SynthOp("ffff1", op="unmap", per_interval=10, slots=2), SynthOp("ffff1", change="create", per_interval=1)]
    return simulate([vm], ops, intervals=intervals, events=events)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_counts_equal_snapshot_totals(tmp_path, fmt):
    snaps, evs = run()
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, fmt=fmt)
    r = read_recording(p)
    last = snaps[-1]
    assert int(r["hva"]["count"].sum()) == last.hva[0].count == 30
    assert int(r["hva"]["lat_sum_ns"].sum()) == last.hva[0].lat_sum_ns
    assert r["hva"][T.LAT_B].to_numpy().sum(axis=0).tolist() == list(last.hva[0].lat_hist.counts)
    assert int(r["memslot"]["count"].sum()) == 3
    assert len(r["hva_events"]) == 30 and len(r["memslot_events"]) == 3
    assert r["intervals"]["interval"].tolist() == [0, 1, 2]
    assert r.meta["status"] == "complete" and r.meta["format_version"] == 1 and r.meta["intervals"] == 3
    assert r.warnings == []


def test_fixture_csv_and_parquet_identical():
    a, b = read_recording(os.path.join(FIX, "basic")), read_recording(os.path.join(FIX, "basic-csv"))
    for t in ("hva", "memslot", "intervals", "vms"):
        assert a[t].astype(str).values.tolist() == b[t].astype(str).values.tolist(), t
    assert set(a["hva"]["comm"]) == {"=HYPERLINK(1)", "qemu-system-x86"}  # unescaped on read


def test_csv_recording_cells_are_escaped_on_disk():
    with open(os.path.join(FIX, "basic-csv", "hva.csv")) as f:
        text = f.read()
    assert "'=HYPERLINK(1)" in text and ",=HYPERLINK" not in text


def test_escape_is_reversible():
    for s in ["=1+1", "+x", "-2", "@a", "\tq", "\rz", "'=x", "'plain", "plain", ""]:
        assert unescape_cell(escape_cell(s)) == s
    assert escape_cell("=1+1") == "'=1+1" and escape_cell("qemu") == "qemu"


def test_crash_loses_at_most_the_torn_interval(tmp_path):
    snaps, evs = run(intervals=3)
    p = str(tmp_path / "r")
    rec = Recorder(p, meta={"host": "h"}, events=True, fsync=False, compact_every=2)
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    # simulate a crash while interval 3 was being written: no close(), and the hva journal
    # holds half of a record batch beyond what the metadata committed
    j = os.path.join(p, "hva", "journal-000001.arrows")
    import pyarrow as pa

    with pa.ipc.open_stream(pa.memory_map(j)) as rd:
        msg = rd.read_next_batch().serialize().to_pybytes()
    with open(j, "ab") as f:
        f.write(msg[: len(msg) // 2])
    r = read_recording(p)
    # intervals 0-1 are compacted into part-000000; interval 2 is in the journal, committed
    assert r["intervals"]["interval"].tolist() == [0, 1, 2]
    assert sorted(set(r["hva"]["interval"])) == [0, 1, 2]
    assert int(r["hva"]["count"].sum()) == 30
    assert any("torn" in w for w in r.warnings)
    assert any("did not finish" in w for w in r.warnings)
    assert not any("DAMAGED" in w for w in r.warnings)


def test_part_and_journal_of_same_number_prefer_part(tmp_path):
    snaps, evs = run(intervals=2)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs)
    part = os.path.join(p, "hva", "part-000000.parquet")
    # crash between rename and unlink: a stale journal with the same number is ignored
    with open(os.path.join(p, "hva", "journal-000000.arrows"), "wb") as f:
        f.write(b"garbage")
    assert os.path.exists(part)
    assert int(read_recording(p)["hva"]["count"].sum()) == 20


def test_reject_wrong_version(tmp_path):
    d = tmp_path / "r"
    shutil.copytree(os.path.join(FIX, "basic"), d)
    m = json.loads((d / META_FILE).read_text())
    m["format_version"] = 99
    (d / META_FILE).write_text(json.dumps(m))
    with pytest.raises(DataFileError) as e:
        read_recording(str(d))
    assert str(e.value).startswith(f"{d}: recording format version 99, this kvmtrace (0.1.0) reads version 1")


def test_reject_empty_foreign_truncated(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileError, match="an empty directory, not a kvmtrace recording"):
        read_recording(str(empty))
    f = tmp_path / "zero.parquet"
    f.write_bytes(b"")
    with pytest.raises(DataFileError, match="an empty file, not a kvmtrace recording"):
        read_recording(str(f))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataFileError, match="not a kvmtrace recording"):
        read_recording(str(foreign))
    badjson = tmp_path / "badjson"
    shutil.copytree(os.path.join(FIX, "basic"), badjson)
    (badjson / META_FILE).write_text('{"format": "kvmtrace-rec')
    with pytest.raises(DataFileError, match="truncated or invalid JSON"):
        read_recording(str(badjson))
    trunc = tmp_path / "trunc"
    shutil.copytree(os.path.join(FIX, "basic"), trunc)
    part = trunc / "hva" / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(DataFileError, match="truncated or corrupt Parquet part"):
        read_recording(str(trunc))
    none = tmp_path / "none"
    Recorder(str(none), fsync=False).close()
    with pytest.raises(DataFileError, match="holds no complete interval"):
        read_recording(str(none))


def test_recorder_refuses_existing_path(tmp_path):
    from kvmtrace.errors import UsageError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(UsageError, match="already exists"):
        Recorder(str(tmp_path / "x"))


def test_read_inputs_bench_dir_and_unique_sources():
    recs = read_inputs([os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after")])
    runs = ["unmap/10", "unmap/509", "move-inactive/10", "move-inactive/509"]
    assert [r.source for r in recs] == runs + [f"{r}#2" for r in runs]
    assert recs[1].bench["slots"] == 509 and recs[1].bench["workload"]["iterations"] == 3


def test_bounded_memory_compaction(tmp_path):
    snaps, evs = run(intervals=7)
    p = str(tmp_path / "r")
    with Recorder(p, events=True, fsync=False, compact_every=3) as rec:
        prev = None
        for i, s in enumerate(snaps):
            rec.write(s.delta(prev), evs[i])
            prev = s
    files = sorted(os.listdir(os.path.join(p, "hva_events")))
    assert files == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert len(read_recording(p)["hva_events"]) == 70
