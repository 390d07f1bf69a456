"""Every warning an input carries reaches every report output (text, JSON, CSV, HTML) and the
exit status (4 unless --accept-warnings); the empty recording is a warning, not a clean report;
report CSVs are exact (parsed back, equal to the JSON and the Parquet values). No root:
recordings written through the real Recorder from synthetic snapshots (analysis/synth.py)."""

from __future__ import annotations

import calendar
import csv
import dataclasses
import json
import math
import os
import re
import time

import pytest

from kvmtrace.analysis.input_warnings import CODES, code_of
from kvmtrace.analysis.recorder import Recorder
from kvmtrace.analysis.recording import read_inputs, read_recording
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.cli import main

from .synthetic_top import tracepoint_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "recordings")
START = 1_796_670_000.1234567  # a start time %.6g would print as 1.79667e+09


def _run(intervals=6, **kw):
    vm = SynthVm("ffff1", 100, comm="qemu", memslots=12)
    ops = [SynthOp("ffff1", op="unmap", per_interval=10, slots=2, lat_median_ns=3_000_000, lat_sigma=1.0),
           SynthOp("ffff1", change="create", per_interval=1)]
    return simulate([vm], ops, intervals=intervals, start_wall=START, **kw)


def _cum(snaps, **per_interval):
    """The snapshots with cumulative counters (map_full, unattributed) growing per interval."""
    return [dataclasses.replace(s, **{k: v * (i + 1) for k, v in per_interval.items()}) for i, s in enumerate(snaps)]


def make_clean(p):
    snaps, evs = _run()
    return record_synthetic(p, snaps, evs, meta={"start": START})


def make_damaged(p):
    snaps, evs = _run()
    record_synthetic(p, snaps, evs, compact_every=4)
    os.unlink(os.path.join(p, "hva", "part-000001.parquet"))
    return p


def _unclosed(p):
    """A recorder that wrote every interval and was never closed."""
    snaps, evs = _run()
    rec = Recorder(p, events=True, fsync=False, meta={"host": "synthetic", "kernel": "0.0.0-synthetic"})
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    return rec


def make_crashed(p):
    _unclosed(p)
    return p  # never closed: status "recording"


def make_incomplete(p):
    _unclosed(p).close(status="incomplete", error="writing: disk full")
    return p


def make_lost(p):
    snaps, evs = _run(lost_per_interval=3)
    return record_synthetic(p, snaps, evs)


def make_map_full(p):
    snaps, evs = _run()
    return record_synthetic(p, _cum(snaps, map_full=7, unattributed=5), evs)


def make_underived(p):
    snaps, evs = _run()
    snaps = [dataclasses.replace(s, hva=tuple(dataclasses.replace(h, underived=4 * (i + 1)) for h in s.hva))
             for i, s in enumerate(snaps)]
    return record_synthetic(p, snaps, evs)


def make_empty(p):
    snaps, evs = simulate([SynthVm("ffff1", 100, comm="qemu", memslots=12)], [], intervals=3)
    return record_synthetic(p, _cum(snaps, unattributed=2), evs)


KINDS = {
    "damaged": (make_damaged, "DAMAGED recording"),
    "crashed": (make_crashed, "recorder did not finish"),
    "incomplete": (make_incomplete, "recording stopped early (writing: disk full)"),
    "lost_events": (make_lost, "raw events lost: 18 (kernel buffer full)"),
    "map_full": (make_map_full, "in-kernel map full 42 times"),
    "underived": (make_underived, "slots visited not derivable for 24 of 60 hva operations"),
    "empty": (make_empty, "no KVM activity seen: no hva operation and no memslot update of any VM in 3 intervals "
                          "(1 VM seen, 6 hva operations of non-VM tasks)"),
}


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    d = tmp_path_factory.mktemp("recs")
    out = {"clean": make_clean(str(d / "clean"))}
    for kind, (make, _) in KINDS.items():
        out[kind] = make(str(d / kind))
    return out


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    o = capsys.readouterr()
    return e.value.code, o.out, o.err


def schema():
    with open(os.path.join(ROOT, "docs", "report.schema.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- each kind, every output


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_warning_reaches_every_output_and_exits_4(kind, recs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    jsonschema = pytest.importorskip("jsonschema")
    p = recs[kind]
    want = KINDS[kind][1]
    # text: listed before the tables, then exit 4 with one line naming the flag
    code, out, err = cli(["report", p], capsys)
    assert code == 4, err
    first = out.splitlines()[:4]
    assert first[0].startswith("WARNING: the inputs carry") and any(f"[{kind}]" in ln and want in ln for ln in first), out
    assert out.index(want) < out.index("Recordings")
    codes = re.search(r"carry \d+ warnings? \(([^)]*)\)", err).group(1).split(", ")
    assert kind in codes and "--accept-warnings" in err and "Traceback" not in err
    # JSON: valid, the warning with its code, also in its source's list
    code, out, err = cli(["report", p, "--json"], capsys)
    assert code == 4, err
    doc = json.loads(out)
    jsonschema.validate(doc, schema())
    assert [(w["code"], want in w["text"]) for w in doc["warnings"] if w["code"] == kind] == [(kind, True)]
    assert any(want in w for w in doc["sources"][0]["warnings"])
    # CSV: warnings.csv, one row per warning; sources.csv carries the text too
    code, out, err = cli(["report", p, "--csv", str(tmp_path / "csv")], capsys)
    assert code == 4, err
    with open(tmp_path / "csv" / "warnings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["code"] for r in rows if want in r["warning"]] == [kind]
    assert all(r["source"] == kind for r in rows)
    with open(tmp_path / "csv" / "sources.csv", newline="") as f:
        (src,) = list(csv.DictReader(f))
    assert want in src["warnings"]
    # HTML: a box at the top, before the first table
    code, out, err = cli(["report", p, "--html", str(tmp_path / "r.html")], capsys)
    assert code == 4, err
    page = (tmp_path / "r.html").read_text()
    box = page.index('<div class="warnings"')
    assert box < page.index("<table") and page.index(want.replace("`", "`")) > box
    assert f"[{kind}]" in page[box: page.index("</div>", box)]
    # accepted: the same output, exit 0
    code, out, err = cli(["report", p, "--json", "--accept-warnings"], capsys)
    assert code == 0, err
    assert json.loads(out)["warnings"] == doc["warnings"]


def test_codes_classify_every_kind_and_are_documented():
    assert set(KINDS) <= set(CODES)
    doc_enum = schema()["properties"]["warnings"]["items"]["properties"]["code"]["enum"]
    assert sorted(doc_enum) == sorted(CODES)
    for kind, (_, text) in KINDS.items():
        assert code_of(text) == kind
    assert code_of("something new") == "other"


def test_clean_recording_exits_0_with_no_warnings(recs, tmp_path, capsys):
    code, out, err = cli(["report", recs["clean"], "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["warnings"] == [] and doc["sources"][0]["warnings"] == []  # not [""]
    code, out, err = cli(["report", recs["clean"], "--csv", str(tmp_path / "c"), "--html", str(tmp_path / "c.html")],
                         capsys)
    assert code == 0, err
    with open(tmp_path / "c" / "warnings.csv", newline="") as f:
        assert list(csv.reader(f)) == [["source", "code", "warning"]]
    assert 'class="warnings"' not in (tmp_path / "c.html").read_text()


def test_one_warned_input_among_several_exits_4_and_names_it(recs, capsys):
    code, out, err = cli(["report", recs["clean"], recs["lost_events"], "--json"], capsys)
    assert code == 4
    doc = json.loads(out)
    assert [(w["source"], w["code"]) for w in doc["warnings"]] == [("lost_events", "lost_events")]
    assert {s["source"]: len(s["warnings"]) for s in doc["sources"]} == {"clean": 0, "lost_events": 1}


def test_empty_recording_is_not_clean(recs, capsys):
    (r,) = read_inputs([recs["empty"]])
    assert [code_of(w) for w in r.warnings] == ["empty"]
    code, out, err = cli(["report", recs["empty"], "--json"], capsys)
    doc = json.loads(out)
    assert code == 4 and doc["sources"][0]["status"] == "complete" and doc["hva_ops"] == []


def test_map_full_and_unattributed_counts_in_text_and_html(recs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = cli(["report", recs["map_full"], "--accept-warnings", "--html", str(tmp_path / "m.html")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    head = next(ln for ln in lines if "map full" in ln and "unattributed" in ln and "source" in ln)
    row = lines[lines.index(head) + 2]
    cells = dict(zip(re.split(r"\s{2,}", head.strip()), re.split(r"\s{2,}", row.strip())))
    assert (cells["map full"], cells["unattributed"]) == ("42", "30")
    page = (tmp_path / "m.html").read_text()
    assert "<th>map full</th><th>unattributed</th>" in page and "<td>42</td><td>30</td>" in page


# ----------------------------------------------------------------------------- exact CSV


def _iso_ns(s: str) -> int:
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z", s)
    assert m, s
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) * 10**9 + int(m.group(2))


def _same(json_value, cell: str) -> bool:
    """A CSV cell equals a JSON value exactly: integers as integers, floats to the last bit,
    empty where JSON has null (or the -1 "unknown")."""
    if json_value is None or (isinstance(json_value, int) and not isinstance(json_value, bool) and json_value == -1
                              and cell == ""):
        return cell == ""
    if isinstance(json_value, bool):
        return cell == ("1" if json_value else "0")
    if isinstance(json_value, int):
        return re.fullmatch(r"-?\d+", cell) is not None and int(cell) == json_value
    if isinstance(json_value, float):
        return float(cell) == json_value and "e+" not in cell.lower()
    return cell == json_value


def _csv(tmp_path, capsys, *paths):
    d = tmp_path / "csv"
    code, out, err = cli(["report", *paths, "--csv", str(d), "--json", "--accept-warnings"], capsys)
    assert code == 0, err
    tables = {}
    for f in os.listdir(d):
        with open(d / f, newline="") as fh:
            tables[f[:-4]] = list(csv.DictReader(fh))
    return json.loads(out), tables


def test_report_csv_reads_back_exactly_as_the_json(recs, tmp_path, capsys):
    doc, t = _csv(tmp_path, capsys, recs["clean"], recs["map_full"])
    # sources: every field JSON has, the times as ISO 8601 with nanoseconds
    for js, row in zip(doc["sources"], t["sources"]):
        for k, v in js.items():
            if k in ("start", "end"):
                assert _iso_ns(row[k]) / 1e9 == v, (k, v, row[k])
            elif k == "warnings":
                assert row[k] == "; ".join(v)
            else:
                assert _same(v, row[k]), (k, v, row[k])
    assert t["sources"][0]["bench_slots"] == "" and doc["sources"][0]["bench_slots"] == -1
    assert _iso_ns(t["sources"][0]["start"]) / 1e9 == START == doc["sources"][0]["start"]
    # hva_ops: counts, latency figures (large and fractional), slots, memslots
    flat = {"count": ("count",), "lat_p50_ns": ("latency_ns", "p50"), "lat_p99_ns": ("latency_ns", "p99"),
            "lat_max_ns": ("latency_ns", "max"), "lat_mean_ns": ("latency_ns", "mean"), "lat_n": ("latency_ns", "n"),
            "rate_per_s": ("rate_per_s",), "slots_mean": ("slots_visited", "mean"),
            "scanned_mean": ("slots_scanned", "mean"), "memslots": ("memslots",), "memslots_max": ("memslots_max",),
            "pid": ("pid",), "underived": ("underived",)}
    assert len(doc["hva_ops"]) == len(t["hva_ops"]) == 2
    for js, row in zip(doc["hva_ops"], t["hva_ops"]):
        for col, path in flat.items():
            v = js
            for k in path:
                v = v[k]
            assert _same(v, row[col]), (col, v, row[col])
        assert float(row["lat_max_ns"]) > 1e6 and re.fullmatch(r"\d+", row["lat_max_ns"])  # not 1.02554e+07
        assert not float(row["lat_mean_ns"]).is_integer()  # a fraction, every digit kept
    for js, row in zip(doc["memslot_updates"], t["memslot_updates"]):
        assert _same(js["count"], row["count"]) and _same(js["latency_ns"]["mean"], row["lat_mean_ns"])


def test_report_csv_equals_the_parquet_values(recs, tmp_path, capsys):
    _, t = _csv(tmp_path, capsys, recs["clean"])
    r = read_recording(recs["clean"])
    hva = r["hva"]
    (row,) = t["hva_ops"]
    assert int(row["count"]) == int(hva["count"].sum())
    assert int(row["lat_max_ns"]) == int(hva["lat_max_ns"].max())
    assert float(row["lat_mean_ns"]) == int(hva["lat_sum_ns"].sum()) / int(hva["lat_count"].sum())
    ev = r["hva_events"]["latency_ns"]
    import numpy as np

    assert float(row["lat_p50_ns"]) == float(np.percentile(ev.to_numpy(), 50))
    assert float(row["lat_p99_ns"]) == float(np.percentile(ev.to_numpy(), 99))
    iv = r["intervals"]
    (src,) = t["sources"]
    assert float(src["duration_s"]) == float(iv["elapsed_s"].sum())


def test_no_csv_cell_is_a_sentinel_or_rounded(recs, tmp_path, capsys):
    _, t = _csv(tmp_path, capsys, recs["clean"], os.path.join(FIX, "legacy-v1"))
    for name, rows in t.items():
        for row in rows:
            for k, v in row.items():
                assert v != "-1", (name, k)
                assert not re.fullmatch(r"-?\d(\.\d+)?e[+-]\d+", v) or abs(float(v)) < 1e-4, (name, k, v)
                assert v not in ("True", "False", "nan", "None"), (name, k, v)


def test_compare_and_demo_csv_use_the_same_exact_cells(recs, tmp_path):
    """compare --csv and demo --csv write through export.write_csv: the same policy."""
    from kvmtrace.analysis import export

    snaps, _ = _run()
    df = export.snapshot_frame(snaps[-1])
    p = export.write_csv(df, str(tmp_path / "demo.csv"))
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    hva = [r for r in rows if r["table"] == "hva"]
    assert len(hva) == 1 and int(hva[0]["lat_max_ns"]) == snaps[-1].hva[0].lat_max_ns
    assert _iso_ns(hva[0]["t_end"]) / 1e9 == snaps[-1].wall_time
    assert all(v != "-1" for r in rows for v in r.values())


def test_csv_number_reads_back_exactly():
    from kvmtrace.output import csv_cell

    for v in (0.0, 1.0, 10255400.0, 1796670000.1234567, 1 / 3, 2.5e-7, 123456789.125, 1e300, -4.5):
        cell = csv_cell(v)
        assert float(cell) == v, (v, cell)
    assert csv_cell(10255400.0) == "10255400" and csv_cell(float("nan")) == "" and csv_cell(True) == "1"
    assert math.isinf(float(csv_cell(float("inf"))))


def test_top_csv_wall_time_is_exact(tmp_path):
    from kvmtrace.dashboard.model import ViewOptions
    from kvmtrace.dashboard.plain import CsvSink

    snaps, _ = _run(2)
    prev, cur = snaps
    path = tmp_path / "top.csv"
    with CsvSink(str(path)) as sink:
        sink.write(cur, cur.delta(prev), tracepoint_plan(), ViewOptions())
    with open(path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["wall_time"]) == cur.wall_time != round(cur.wall_time, 3)


def test_vectorised_float_cells_equal_csv_number():
    """export formats float columns per column: the same text as output.csv_number, cell by cell."""
    import numpy as np

    from kvmtrace.analysis.export import _float_cells
    from kvmtrace.output import csv_number

    rng = np.random.default_rng(7)
    vals = [0.0, -0.0, 1.0, -4.0, 10255400.0, 9.999e15, 1e16, 1e300, float("inf"), float("-inf"), float("nan"),
            1 / 3, 2.5e-7, -1.0, START] + list(rng.uniform(-1e9, 1e9, 2000)) + list(rng.integers(-10**12, 10**12, 500) * 1.0)
    assert _float_cells(np.array(vals), False) == [csv_number(float(v)) for v in vals]
    assert _float_cells(np.array([-1.0, 2.0, float("nan")]), True) == ["", "2", ""]
