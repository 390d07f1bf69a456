"""Fleet reports: 50 recordings of 10 hosts in a partitioned directory. kvmtrace's per-host and
all-host rows against the ground truth of the generated events, and the documented DuckDB
query (docs/recording-format.md, run verbatim) against the same truth."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import numpy as np
import pytest

from kvmtrace.analysis import tables as T
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "recording-format.md")
HOSTS = [f"node{k:02d}" for k in range(10)]
PER_HOST = 5  # 50 recordings


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """FLEET/host=H/date=D/recN, and the ground truth: every raw latency by (host, op)."""
    root = tmp_path_factory.mktemp("fleet")
    truth = defaultdict(list)
    seed = 0
    for h in HOSTS:
        for j in range(PER_HOST):
            seed += 1
            vms = [SynthVm(f"ffff8881{seed:04d}0000", 1000 + j, memslots=10 + j), SynthVm(f"ffff8882{seed:04d}0000", 2000 + j)]
            ops = [SynthOp(vms[0].vm_id, op="unmap", per_interval=7 + j, lat_median_ns=1000 + 100 * seed),
                   SynthOp(vms[1].vm_id, op="unmap", per_interval=3),
                   SynthOp(vms[1].vm_id, op="age", per_interval=2 + (seed % 3))]
            snaps, evs = simulate(vms, ops, intervals=2, events=True, seed=seed)
            date = "2026-11-28" if j < 2 else "2026-11-29"
            day = root / f"host={h}" / f"date={date}"
            day.mkdir(parents=True, exist_ok=True)  # the recorder never creates parents
            record_synthetic(str(day / f"rec{j}"), snaps, evs, meta={"host": h})
            for batch in evs:
                for e in batch:
                    if hasattr(e, "op"):
                        truth[(h, e.op)].append(e.latency_ns)
                        truth[("*", e.op)].append(e.latency_ns)
    return str(root), {k: np.array(v, dtype=np.int64) for k, v in truth.items()}


def test_report_over_50_recordings_per_host_and_all_hosts(fleet):
    from rich.console import Console

    from kvmtrace.analysis.recording import read_inputs
    from kvmtrace.analysis.render import report_renderables
    from kvmtrace.analysis.report import EVENT_COLUMNS, build_report, to_json

    root, truth = fleet
    rep = build_report(read_inputs([root], event_columns=EVENT_COLUMNS))  # what `kvmtrace report FLEET` does
    doc = json.loads(json.dumps(to_json(rep)))
    assert len(doc["sources"]) == len(HOSTS) * PER_HOST
    assert {s["source"] for s in doc["sources"]} >= {f"host={HOSTS[0]}/date=2026-11-28/rec0"}
    rows = {(r["host"], r["op"]): r for r in doc["hva_ops_hosts"]}
    assert set(rows) == set(truth)
    for key, lat in truth.items():
        r = rows[key]
        assert r["count"] == len(lat), key
        assert r["latency_ns"]["source"] == "raw events", key
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        assert (r["latency_ns"]["p50"], r["latency_ns"]["p90"], r["latency_ns"]["p99"]) == (p50, p90, p99), key
        assert r["latency_ns"]["max"] == float(lat.max())
    assert rows[("*", "unmap")]["source"] == "50 recordings"
    # terminal: per-host and all-host rows
    con = Console(record=True, width=200)
    for x in report_renderables(rep):
        con.print(x)
    out = con.export_text()
    assert "all hosts" in out and all(h in out for h in HOSTS)


def test_directory_without_recordings_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a kvmtrace recording" in err and "Traceback" not in err


def _doc_query() -> str:
    text = open(DOC).read()
    m = re.search(r"<!-- fleet-query:duckdb -->\s*```sql\n(.*?)```\s*<!-- /fleet-query:duckdb -->", text, re.S)
    assert m, "docs/recording-format.md lost its marked DuckDB query"
    return m.group(1)


def test_documented_duckdb_query_over_several_hosts(fleet):
    duckdb = pytest.importorskip("duckdb")
    root, truth = fleet
    sql = _doc_query().replace("FLEET/", root.rstrip("/") + "/")
    got = duckdb.connect().execute(sql).fetchall()
    assert len({r[0] for r in got}) == len(HOSTS)
    seen = set()
    for host, op, lprov, ops, p50, p99, mx in got:
        lat = truth[(host, op)]
        assert lprov == "exact" and ops == len(lat) and mx == lat.max()
        want50, want99 = np.percentile(lat, [50, 99])
        assert p50 == pytest.approx(want50, rel=1e-12) and p99 == pytest.approx(want99, rel=1e-12)
        seen.add((host, op))
    assert seen == {k for k in truth if k[0] != "*"}


def test_every_column_is_documented():
    text = open(DOC).read()
    for table, schema in T.SCHEMAS.items():
        assert f"**`{table}`**" in text, table
        for name in schema.names:
            if re.fullmatch(r"(lat|slots|range)_b\d\d", name):
                name = re.sub(r"\d\d$", "00", name)
            assert f"`{name}`" in text, (table, name)
