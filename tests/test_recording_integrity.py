"""Recordings verify themselves: the manifest in the metadata, and what the reader does with a
deleted part, an emptied or half-zeroed journal, duplicated CSV rows, negative counts and
damaged metadata (no root)."""

from __future__ import annotations

import json
import os

import pytest

from kvmtrace.analysis.recorder import Recorder
from kvmtrace.analysis.recording import META_FILE, read_recording
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.errors import DataFileError


def run(intervals=6, events=True):
    vm = SynthVm("ffff1", 100, comm="qemu", memslots=12)
    ops = [SynthOp("ffff1", op="unmap", per_interval=10, slots=2), SynthOp("ffff1", change="create", per_interval=1)]
    return simulate([vm], ops, intervals=intervals, events=events)


def unfinished(p, intervals=6, compact_every=4, fmt="parquet"):
    """A recording whose recorder stopped without close (journals still open)."""
    snaps, evs = run(intervals)
    rec = Recorder(p, fmt=fmt, events=True, fsync=False, compact_every=compact_every)
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    return rec


def meta(p):
    with open(os.path.join(p, META_FILE)) as f:
        return json.load(f)


def test_manifest_lists_every_file_with_rows_and_checksum(tmp_path):
    snaps, evs = run(6)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, compact_every=4)
    m = meta(p)
    files = m["files"]
    on_disk = sorted(os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs if f != META_FILE)
    assert sorted(files) == on_disk
    assert files["hva/part-000000.parquet"]["rows"] == 4 and files["hva/part-000000.parquet"]["intervals"] == [0, 3]
    assert files["hva/part-000001.parquet"]["rows"] == 2 and files["hva/part-000001.parquet"]["intervals"] == [4, 5]
    assert files["hva_events/part-000000.parquet"]["rows"] == 40
    assert all(len(e["sha256"]) == 64 for e in files.values())
    assert m["status"] == "complete" and m["totals"]["hva_ops"] == 60


def test_deleted_part_is_reported_with_the_exact_loss(tmp_path):
    snaps, evs = run(6)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, compact_every=4)
    os.unlink(os.path.join(p, "hva", "part-000001.parquet"))
    r = read_recording(p)
    assert r["intervals"]["interval"].tolist() == [0, 1, 2, 3]
    assert int(r["hva"]["count"].sum()) == 40 and len(r["hva_events"]) == 40
    (w,) = [w for w in r.warnings if "DAMAGED" in w]
    assert "hva/part-000001.parquet is missing (2 rows)" in w
    assert "intervals 4..5 of 6" in w and "20 of 60 hva ops" in w and "2 of 6 memslot updates" in w


def test_deleted_first_part_is_refused(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs)
    os.unlink(os.path.join(p, "hva", "part-000000.parquet"))
    with pytest.raises(DataFileError, match=r"damaged recording: hva/part-000000.parquet is missing \(3 rows\)"):
        read_recording(p)


@pytest.mark.parametrize("how", ["empty", "half-zeroed"])
def test_damaged_journal_is_never_read_as_fewer_ops(tmp_path, how):
    p = str(tmp_path / "r")
    unfinished(p, intervals=6, compact_every=4)  # intervals 4, 5 in journal-000001
    j = os.path.join(p, "hva", "journal-000001.arrows")
    size = os.path.getsize(j)
    with open(j, "r+b") as f:
        if how == "empty":
            f.truncate(0)
        else:
            f.seek(size // 2)
            f.write(b"\0" * (size - size // 2))
    r = read_recording(p)
    assert r["intervals"]["interval"].tolist() == [0, 1, 2, 3]
    (w,) = [w for w in r.warnings if "DAMAGED" in w]
    assert "hva/journal-000001.arrows" in w and "20 of 60 hva ops" in w


def test_duplicated_csv_rows_are_not_counted_twice(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, fmt="csv")
    hp = os.path.join(p, "hva.csv")
    with open(hp) as f:
        lines = f.read().splitlines(True)
    with open(hp, "w") as f:
        f.writelines(lines[:2] + lines[1:])  # interval 0's row twice
    with pytest.raises(DataFileError, match="damaged recording"):
        read_recording(p)


def test_duplicated_rows_in_a_recording_without_manifest_cut_the_prefix(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, fmt="csv")
    m = meta(p)
    del m["files"]  # as written before the manifest existed: table checks only
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m, f)
    hp = os.path.join(p, "hva.csv")
    with open(hp) as f:
        lines = f.read().splitlines(True)
    with open(hp, "w") as f:
        f.writelines(lines + lines[-1:])  # the last interval's row twice
    r = read_recording(p)
    assert int(r["hva"]["count"].sum()) == 20 and r["intervals"]["interval"].tolist() == [0, 1]
    (w,) = [w for w in r.warnings if "DAMAGED" in w]
    assert "hva: interval 2 holds sum of count 20, the intervals table says 10" in w


def test_negative_counts_are_refused(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, fmt="csv")
    m = meta(p)
    del m["files"]
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m, f)
    hp = os.path.join(p, "memslot.csv")
    with open(hp) as f:
        text = f.read()
    hdr = text.splitlines()[0].split(",")
    rows = [line.split(",") for line in text.splitlines()[1:]]
    rows[1][hdr.index("count")] = "-5"
    with open(hp, "w") as f:
        f.write("\n".join([",".join(hdr)] + [",".join(r) for r in rows]) + "\n")
    r = read_recording(p)
    assert r["intervals"]["interval"].tolist() == [0]
    assert any("memslot: negative count in interval 1" in w for w in r.warnings)


def test_edited_part_fails_its_checksum(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs)
    import pyarrow.parquet as pq

    part = os.path.join(p, "hva", "part-000000.parquet")
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("lat_sum_ns"), "lat_sum_ns", t.column("lat_sum_ns").cast("int64"))
    pq.write_table(t.slice(0, 3), part, compression="snappy")  # same rows, different bytes
    with pytest.raises(DataFileError, match="does not match its checksum|longer than written|shorter than written"):
        read_recording(p)


@pytest.mark.parametrize("field,value", [
    ("intervals", "3"), ("intervals", -1), ("totals", [1]), ("label", 5), ("files", {"../../etc/passwd": {}}),
    ("start", "yesterday"), ("lost_events", 1.5),
])
def test_wrong_types_in_metadata_give_one_error(tmp_path, field, value):
    snaps, evs = run(2)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs)
    m = meta(p)
    m[field] = value
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m, f)
    with pytest.raises(DataFileError, match="metadata|manifest"):
        read_recording(p)


def test_metadata_totals_must_equal_the_tables(tmp_path):
    snaps, evs = run(3)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs)
    m = meta(p)
    m["totals"]["hva_ops"] = 1_431_101
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m, f)
    with pytest.raises(DataFileError, match="metadata totals say 1,431,101"):
        read_recording(p)


def test_crash_between_compaction_and_metadata_reads_the_part(tmp_path):
    """The part replaced the journal but the metadata still lists the journal."""
    p = str(tmp_path / "r")
    rec = unfinished(p, intervals=3, compact_every=100)
    m_before = meta(p)
    rec.close()
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m_before, f)  # as if killed after the rename, before the metadata update
    r = read_recording(p)
    assert int(r["hva"]["count"].sum()) == 30 and not any("DAMAGED" in w for w in r.warnings)


def test_a_part_copied_into_a_recording_is_refused(tmp_path):
    """An extra file the manifest does not list would have its rows counted by the readers."""
    import shutil

    snaps, evs = run(6)
    p = record_synthetic(str(tmp_path / "r"), snaps, evs, compact_every=4)
    shutil.copy(os.path.join(p, "hva_events", "part-000000.parquet"), os.path.join(p, "hva_events", "part-000007.parquet"))
    with pytest.raises(DataFileError, match=r"hva_events/part-000007.parquet not written by this recording's recorder"):
        read_recording(p)


def test_the_journal_of_the_interval_being_written_is_not_a_stray(tmp_path):
    p = str(tmp_path / "r")
    rec = unfinished(p, intervals=4, compact_every=4)  # intervals 0..3 compacted into part-000000
    m = meta(p)
    snaps, evs = run(5)
    rec.write(snaps[4].delta(snaps[3]), evs[4])  # opens journal-000001 ...
    with open(os.path.join(p, META_FILE), "w") as f:
        json.dump(m, f)  # ... but the crash came before the metadata listed it
    assert os.path.exists(os.path.join(p, "hva", "journal-000001.arrows"))
    r = read_recording(p)
    assert r["intervals"]["interval"].tolist() == [0, 1, 2, 3]
    assert not any("DAMAGED" in w for w in r.warnings)
