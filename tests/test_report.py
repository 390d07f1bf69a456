"""report: exact values from the committed synthetic fixtures; JSON schema; CSV safety; HTML."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
import pytest

from kvmtrace.analysis.recording import read_inputs, read_recording
from kvmtrace.analysis.report import (EVENT_SOURCE, HIST_SOURCE, MEMSLOTS_EVENTS, MEMSLOTS_INTERVAL_END, MEMSLOTS_KERNEL,
                                      build_report, to_json)
from kvmtrace.cli import main

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, FIX)
from make_fixtures import EXPECTED, MULTI_INTERVALS, MULTI_VM  # noqa: E402


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_counts_equal_snapshot_totals_and_events_are_exact():
    rep = build_report(read_inputs([os.path.join(FIX, "basic")]))
    h = rep["hva_ops"]
    got = {(r.op, r.pid): r.count for r in h.itertuples()}
    assert got == {(op, pid): n for op, d in EXPECTED.items() if op in ("unmap", "age") for pid, n in d.items()}
    assert set(h["latency_source"]) == {EVENT_SOURCE}
    # raw events: exact percentiles equal numpy over the events themselves
    ev = read_recording(os.path.join(FIX, "basic"))["hva_events"]
    v = ev[(ev.op == "unmap") & (ev.pid == 4242)]["latency_ns"].to_numpy()
    row = h[(h.op == "unmap") & (h.pid == 4242)].iloc[0]
    assert row["lat_p50_ns"] == np.percentile(v, 50) and row["lat_p99_ns"] == np.percentile(v, 99)
    assert row["lat_max_ns"] == v.max() and row["lat_mean_ns"] == pytest.approx(v.mean())
    assert row["rate_per_s"] == 160 / 4.0 and row["comm"] == "=HYPERLINK(1)" and row["memslots"] == 37
    m = rep["memslot_updates"]
    assert {r.change: r.count for r in m.itertuples()} == {"create": 8, "move": 4}
    tot = rep["hva_ops_total"]
    assert {r.op: r.count for r in tot.itertuples()} == {"unmap": 260, "age": 28}
    assert rep.lost_events == 0


def test_histogram_percentiles_say_so_and_scanned():
    rep = build_report(read_inputs([os.path.join(FIX, "hist-only")]))
    r = rep["hva_ops"].iloc[0]
    assert r["latency_source"] == HIST_SOURCE == "log2 histogram, linear interpolation within bucket"
    assert r["count"] == 900 and r["scanned_mean"] == 509.0 and r["slots_mean"] == 1.0
    assert r["scanned_max"] == 509  # the in-kernel maximum, no raw events needed
    b = rep["by_memslots"].iloc[0]
    assert b["memslots_bucket"] == "256-511" and b["memslots_source"] == MEMSLOTS_KERNEL
    assert b["memslots_max"] == 509 and b["scanned_mean"] == 509.0 and b["count"] == 900


def test_older_recording_falls_back_to_interval_end_counts_and_says_so():
    # legacy-v1: written before the vm ordinal / memslots_max / scanned_max / underived columns
    # and the in-kernel by_memslots table existed; it still reads, and the fallback is labelled
    rep = build_report(read_inputs([os.path.join(FIX, "legacy-v1")]))
    r = rep["hva_ops"].iloc[0]
    assert r["count"] == 900 and r["vm_label"] == "qemu-system-x86[5151]#?" and r["memslots_max"] == 509
    assert math.isnan(r["scanned_max"]) and r["underived"] == 0
    b = rep["by_memslots"].iloc[0]
    assert b["memslots_source"] == MEMSLOTS_INTERVAL_END == "VM memslot count at interval end (recording without in-kernel memslot-count buckets)"
    assert b["memslots_bucket"] == "256-511" and b["scanned_mean"] == 509.0


def test_every_vm_its_own_row_named_apart_with_memslots_at_event_time():
    rep = build_report(read_inputs([os.path.join(FIX, "multi-vm")]))
    h = rep["hva_ops"]
    n = MULTI_INTERVALS
    got = {r.vm_label: (r.vm_id, r.count, r.memslots_max, r.memslots, r.scanned_max) for r in h.itertuples()}
    assert got == {
        ("web1[901]#1" if name == "web1" else "web2[901]#2" if name == "web2" else f"{comm}[{pid}]#{o}"):
        (vm_id, per * n, at_op, final, at_op)
        for vm_id, pid, comm, name, o, at_op, final, per in MULTI_VM
    }
    m = rep["memslot_updates"]
    assert sorted(m["vm_label"]) == sorted(got) and set(m["count"]) == {n}
    b = rep["by_memslots"]
    # numeric order, every label a range or a single count, counts at the operation (not 0 after teardown)
    assert list(b["memslots_bucket"]) == ["1", "2-3", "8-15", "32-63", "256-511"]
    assert list(b["memslots_max"]) == [1, 3, 12, 40, 509] and list(b["scanned_mean"]) == [1, 3, 12, 40, 509]
    assert list(b["count"]) == [7 * n, 10 * n, 5 * n, 20 * n, 30 * n]
    assert set(b["memslots_source"]) == {MEMSLOTS_KERNEL}


def test_bucket_labels():
    from kvmtrace.analysis.report import memslot_bucket_label

    assert [memslot_bucket_label(i) for i in range(5)] == ["0", "1", "2-3", "4-7", "8-15"]
    assert memslot_bucket_label(9) == "256-511"


def test_merge_keeps_sources_and_provenance_apart():
    rep = build_report(read_inputs([os.path.join(FIX, "basic"), os.path.join(FIX, "hist-only")]))
    assert list(rep["sources"]["source"]) == ["basic", "hist-only"]
    assert rep["hva_ops"]["count"].sum() == 260 + 28 + 900
    # same op, different provenance within one recording -> two rows, never merged
    from kvmtrace.analysis.report import hva_ops

    r = read_recording(os.path.join(FIX, "basic"))
    hva = r["hva"].copy()
    hva.loc[hva.index[:2], "lat_provenance"] = "syscall"
    out = hva_ops(hva, 4.0)
    assert len(out[(out.op == "unmap") & (out.pid == 4242)]) == 2


def test_incomplete_events_fall_back_to_histogram():
    r = read_recording(os.path.join(FIX, "basic"))
    from kvmtrace.analysis.report import hva_ops

    ev = r["hva_events"].iloc[5:]  # 5 events "lost"
    out = hva_ops(r["hva"], 4.0, ev)
    row = out[(out.op == "unmap") & (out.pid == 4242)].iloc[0]
    assert row["latency_source"] == HIST_SOURCE + " (raw events incomplete: 155 of 160)"


def report_json(fixture, capsys) -> dict:
    """`report FIXTURE --json`, validated against docs/report.schema.json."""
    jsonschema = pytest.importorskip("jsonschema")
    code, out, err = run_cli(["report", os.path.join(FIX, fixture), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    with open(os.path.join(ROOT, "docs", "report.schema.json")) as f:
        jsonschema.validate(doc, json.load(f))
    return doc


def test_json_schema_and_required_fields(capsys):
    doc = report_json("basic", capsys)
    u = [x for x in doc["hva_ops"] if x["op"] == "unmap" and x["pid"] == 4242][0]
    assert u["count"] == 160 and u["vm"] == "ffff8881000a0000" and u["latency_ns"]["source"] == "raw events"
    assert u["latency_ns"]["provenance"] == "exact" and u["slots_visited"]["mean"] == 1.0
    assert u["slots_scanned"]["mean"] is None
    assert doc["lost_events"] == 0
    assert {(x["change"], x["count"]) for x in doc["memslot_updates"]} == {("create", 8), ("move", 4)}


def test_json_names_every_vm_and_carries_the_stable_id(capsys):
    doc = report_json("multi-vm", capsys)
    rows = {(x["vm"], x["vm_label"], x["ordinal"], x["memslots_max"], x["memslots"], x["count"],
             x["slots_scanned"]["max"]) for x in doc["hva_ops"]}
    assert rows == {(vm_id, (name or comm) + f"[{pid}]#{o}", o, at_op, final, per * MULTI_INTERVALS, at_op)
                    for vm_id, pid, comm, name, o, at_op, final, per in MULTI_VM}
    assert [x["memslots_bucket"] for x in doc["by_memslots"]] == ["1", "2-3", "8-15", "32-63", "256-511"]
    assert {x["vm_label"] for x in doc["memslot_updates"]} == {r[1] for r in rows}


@pytest.mark.parametrize("fixture", ["legacy-v1", "hist-only", "bench-before"])
def test_json_schema_holds_for_every_kind_of_input(fixture, capsys):
    assert report_json(fixture, capsys)["hva_ops"]


def test_csv_export_is_spreadsheet_safe(tmp_path, capsys):
    code, out, err = run_cli(["report", os.path.join(FIX, "basic"), "--csv", str(tmp_path / "csv")], capsys)
    assert code == 0, err
    names = sorted(os.listdir(tmp_path / "csv"))
    assert names == ["by_memslots.csv", "hva_ops.csv", "hva_ops_hosts.csv", "hva_ops_total.csv", "memslot_updates.csv",
                     "sources.csv", "warnings.csv"]
    with open(tmp_path / "csv" / "hva_ops.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    comms = {r["comm"] for r in rows}
    assert comms == {"'=HYPERLINK(1)", "qemu-system-x86"}
    for r in rows:
        for v in r.values():
            assert not v or v[0] not in "=+@\t\r", v
    assert {r["count"] for r in rows if r["op"] == "unmap"} == {"160", "100"}


def test_html_is_self_contained(tmp_path, capsys):
    p = tmp_path / "r.html"
    code, out, err = run_cli(["report", os.path.join(FIX, "bench-before"), os.path.join(FIX, "basic"), "--html", str(p)], capsys)
    assert code == 0, err
    text = p.read_text()
    # timelines of age and unmap, latency CDFs and histograms, slots visited, against the memslot count
    assert text.startswith("<!DOCTYPE html>") and text.count("data:image/png;base64,") == 6
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "=HYPERLINK(1)" in text and "log2 histogram, linear interpolation within the bucket" in text


def test_terminal_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(["report", os.path.join(FIX, "basic")], capsys)
    assert code == 0, err
    assert "hva operations per VM" in out and "memslot updates" in out and "256-511" in out


def test_bad_input_is_one_message(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    code, out, err = run_cli(["report", str(tmp_path / "e")], capsys)
    assert code == 2
    assert err.startswith(f"kvmtrace: {tmp_path / 'e'}: an empty directory, not a kvmtrace recording") and "Traceback" not in err


def test_older_csv_recording_reads_with_added_columns_filled(tmp_path):
    # a CSV recording as written before the added columns / by_memslots table: same figures
    import shutil

    from kvmtrace.analysis import tables as T

    old = tmp_path / "old"
    shutil.copytree(os.path.join(FIX, "basic-csv"), old)
    meta = json.loads((old / "kvmtrace-recording.json").read_text())
    for name, added in T.ADDED_COLUMNS.items():
        with open(old / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))
        keep = [i for i, c in enumerate(rows[0]) if c not in added]
        with open(old / f"{name}.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([[r[i] for i in keep] for r in rows])
        meta["tables"][name] = T.legacy_names(name)
    (old / "by_memslots.csv").unlink()
    del meta["tables"]["by_memslots"]
    (old / "kvmtrace-recording.json").write_text(json.dumps(meta))
    new, older = build_report(read_inputs([os.path.join(FIX, "basic-csv")])), build_report(read_inputs([str(old)]))
    cols = ["vm_id", "op", "count", "lat_p50_ns", "lat_p99_ns", "slots_mean"]
    assert older["hva_ops"][cols].equals(new["hva_ops"][cols])
    assert set(older["hva_ops"]["ordinal"]) == {0} and set(new["hva_ops"]["ordinal"]) == {1}
    assert list(older["by_memslots"]["memslots_source"].unique()) == [MEMSLOTS_EVENTS]  # raw events still win


def test_by_memslots_prefers_events_only_when_they_know_every_count():
    from kvmtrace.analysis.report import by_memslots

    r = read_recording(os.path.join(FIX, "basic"))
    hva, ev, kern = r["hva"], r["hva_events"], r["by_memslots"]
    assert set(by_memslots(hva, ev, kern)["memslots_source"]) == {MEMSLOTS_EVENTS}
    ev = ev.copy()
    ev.loc[ev.index[:3], "memslots"] = -1  # three events without the count
    got = by_memslots(hva, ev, kern)
    assert set(got["memslots_source"]) == {MEMSLOTS_KERNEL} and got["count"].sum() == 260 + 28
    assert set(by_memslots(hva, ev.iloc[1:], kern)["memslots_source"]) == {MEMSLOTS_KERNEL}  # incomplete events
