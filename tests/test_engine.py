"""The columnar engine's exact statistics: bit-for-bit equal to numpy over the raw values."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from kvmtrace.analysis import engine as E
from kvmtrace.analysis.recording import read_recording

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")


def _counts(x):
    v, c = np.unique(x, return_counts=True)
    return v.astype(np.int64), c.astype(np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101, 1000, 9999, 123457])
def test_quantiles_from_counts_bit_identical_to_numpy(n):
    rng = np.random.default_rng(n)
    for x in (rng.integers(0, 50, n), np.maximum(1, rng.lognormal(7, 1.2, n)).astype(np.int64),
              rng.integers(-(2 ** 40), 2 ** 40, n)):
        qs = (0.5, 0.9, 0.99, 0.999, 0.0, 1.0, 0.25)
        want = np.percentile(x, [q * 100 for q in qs])
        got = E.quantiles_from_counts(*_counts(x), qs)
        assert want.tobytes() == got.tobytes(), (n, want, got)


def _old_event_stats(ev, key, col, qs=E.QS):
    """The pre-engine implementation (numpy over the raw values), kept as the reference."""
    names = [f"p{int(round(q * 100))}" for q in qs]
    vals = ev[col].to_numpy(dtype=np.int64)
    rows = []
    for k, idx in ev.groupby(key, observed=True, sort=True).indices.items():
        v = vals[idx]
        v = v[v >= 0]
        k = k if isinstance(k, tuple) else (k,)
        if len(v):
            p = np.percentile(v, [q * 100 for q in qs])
            rows.append(list(k) + [len(idx), len(v)] + [float(x) for x in p] + [float(v.max()), float(v.mean())])
        else:
            rows.append(list(k) + [len(idx), 0] + [math.nan] * (len(qs) + 2))
    return pd.DataFrame(rows, columns=key + ["events", "n"] + names + ["max", "mean"])


def test_stats_match_numpy_per_group_with_unknown_values():
    rng = np.random.default_rng(1)
    n = 50_000
    ev = pd.DataFrame({"vm": rng.choice(["a", "b", "c"], n), "op": rng.choice(["unmap", "age"], n),
                       "lat": np.where(rng.random(n) < 0.05, -1, rng.lognormal(7, 1, n).astype(np.int64))})
    ev.loc[ev["vm"] == "c", "lat"] = -1  # a group with no known value
    ref = _old_event_stats(ev, ["vm", "op"], "lat").set_index(["vm", "op"])
    vc = ev.groupby(["vm", "op", "lat"]).size().rename("c").reset_index().rename(columns={"lat": "v"})
    got = E.stats(vc, ["vm", "op"])
    assert list(got.index) == list(ref.index)
    for c in ref.columns:
        a, b = ref[c].to_numpy(dtype=float), got[c].to_numpy(dtype=float)
        assert np.array_equal(a, b, equal_nan=True), c


def test_engine_scan_equals_in_memory_counts_on_fixture():
    r = read_recording(os.path.join(FIX, "basic"))
    con = E.connect()
    hc = E.hva_counts(con, [(0, r.events["hva_events"])])
    mc = E.mem_counts(con, [(0, r.events["memslot_events"])])
    con.close()
    mem = E.HvaCounts.from_events(r["hva_events"])
    assert hc.events == len(r["hva_events"]) == mem.events
    a = E.stats(hc.lat[E.HVA_KEY + ["v", "c"]], E.HVA_KEY)
    b = E.stats(mem.lat[E.HVA_KEY + ["v", "c"]], E.HVA_KEY)
    pd.testing.assert_frame_equal(a, b)
    assert mc.events == len(r["memslot_events"])


def test_missing_engine_is_one_clear_error(monkeypatch):
    import builtins

    from kvmtrace.errors import UsageError

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "duckdb":
            raise ImportError("no duckdb")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(UsageError, match="duckdb"):
        E.connect()


def test_report_and_compare_never_load_event_tables():
    """Bounded memory by construction: the raw-event figures come from the engine's scans; no
    event table becomes a DataFrame (they would be loaded on first access of r[name])."""
    from kvmtrace.analysis.compare import compare
    from kvmtrace.analysis.recording import read_inputs
    from kvmtrace.analysis.report import EVENT_COLUMNS, build_report

    recs = read_inputs([os.path.join(FIX, "basic"), os.path.join(FIX, "bench-before")], event_columns=EVENT_COLUMNS)
    after = read_inputs([os.path.join(FIX, "basic-csv")])
    rep = build_report(recs)
    cmp = compare(recs[:1], after)
    assert set(rep["hva_ops"]["latency_source"]) >= {"raw events"}
    assert "raw events" in set(cmp["source"])
    with_events = [r for r in recs + after if r.events]
    assert len(with_events) == 2
    for r in with_events:
        assert not set(r.events) & set(r.tables._frames), r.source
    # ... while users' own analysis still gets DataFrames on access
    assert len(recs[0]["hva_events"]) == int(rep["sources"]["hva_events"].iloc[0]) == 288


def test_parquet_part_damaged_inside_its_data_is_one_clear_error(tmp_path, capsys):
    import shutil

    from kvmtrace.cli import main

    rec = tmp_path / "basic"
    shutil.copytree(os.path.join(FIX, "basic"), rec)
    part = rec / "hva_events" / "part-000000.parquet"
    data = bytearray(part.read_bytes())
    data[200:2000] = b"\xab" * 1800  # footer intact, column data garbage
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["report", str(rec)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "raw events unreadable" in err and "fix:" in err and "Traceback" not in err


def test_unfinished_recording_journals_go_through_the_engine(tmp_path):
    """A recorder that never closed leaves Arrow journals (no Parquet parts): the engine scans
    them memory-mapped, with the same figures as numpy over the events."""
    from kvmtrace.analysis.recording import Recorder, read_inputs
    from kvmtrace.analysis.report import build_report
    from kvmtrace.analysis.synth import SynthOp, SynthVm, simulate

    vms = [SynthVm("ffff1", 100, memslots=40)]
    snaps, evs = simulate(vms, [SynthOp("ffff1", op="unmap", per_interval=50)], intervals=3, events=True, seed=5)
    path = str(tmp_path / "rec")
    rec = Recorder(path, events=True, fsync=False, meta={"host": "h"})
    prev = None
    for s, e in zip(snaps, evs):
        rec.write(s.delta(prev), e)
        prev = s
    # no close(): journals only, status "recording"
    assert not any(f.endswith(".parquet") for f in os.listdir(os.path.join(path, "hva_events")))
    r = read_inputs([path])[0]
    rep = build_report([r])
    row = rep["hva_ops"].iloc[0]
    lat = np.array([e.latency_ns for b in evs for e in b], dtype=np.int64)
    assert row["latency_source"] == "raw events" and row["count"] == len(lat) == 150
    assert (row["lat_p50_ns"], row["lat_p99_ns"]) == tuple(np.percentile(lat, [50, 99]))
    assert "hva_events" not in r.tables._frames
