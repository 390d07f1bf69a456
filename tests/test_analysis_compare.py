"""compare and bench tables on synthetic data with known answers (no root): run-level statistics,
one verdict per row, exit status, --json and warnings."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from kvmtrace.analysis.bench import check_slots, new_index, parse_scenarios, parse_slots, save_index, seed_table
from kvmtrace.analysis.compare import (HIST_FLOOR, MIN_EFFECT, compare, decide, exit_status, fmt_ratio_ci,
                                       runs_needed)
from kvmtrace.analysis.recording import read_inputs
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.cli import main
from kvmtrace.errors import UsageError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")
SCHEMA = os.path.join(os.path.dirname(__file__), "..", "docs", "compare.schema.json")


def one_run(path, median, seed, events=True, prov="exact", change_median=None):
    vm = SynthVm("v", 10)
    ops = [SynthOp("v", op="unmap", per_interval=300, lat_median_ns=median, lat_provenance=prov)]
    if change_median:
        ops.append(SynthOp("v", change="move", per_interval=20, lat_median_ns=change_median))
    s, e = simulate([vm], ops, intervals=2, seed=seed, events=events)
    return record_synthetic(str(path), s, e if events else None)


def side(tmp_path, name, median, runs, spread=0.01, seed=0, events=True, change_median=None):
    """A directory of ``runs`` recordings, one per run; each run's medians drawn around ``median``
    (and ``change_median`` for memslot moves) with a run-to-run spread (log SD) ``spread``."""
    rng = np.random.default_rng(seed)
    d = tmp_path / name
    d.mkdir()
    for k in range(runs):
        f = math.exp(rng.normal(0, spread))
        one_run(d / f"run{k}", median * f, seed * 1000 + k, events=events,
                change_median=change_median * f if change_median else None)
    return str(d)


def run_cli(args, capsys, monkeypatch, width=200):
    monkeypatch.setenv("COLUMNS", str(width))
    with pytest.raises(SystemExit) as e:
        main(["compare"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ----------------------------------------------------------------------------- the rule


def test_decide_each_verdict():
    assert decide([100, 102, 98, 101], [130, 128, 133, 131]).verdict == "regression"
    assert decide([130, 128, 133, 131], [100, 102, 98, 101]).verdict == "improvement"
    assert decide([100, 102, 98, 101], [100, 101, 99, 100]).verdict == "same"
    wide = decide([100, 130, 80], [110, 140, 85])
    assert wide.verdict == "inconclusive" and wide.lo < 1 < wide.hi and wide.runs_needed > 3
    one = decide([100], [200])
    assert one.verdict == "inconclusive" and math.isnan(one.lo) and "fewer than 2 runs" in one.note
    # significant but below the minimum effect: "same" when the interval lies inside +-5 %
    small = decide([100, 100.2, 99.8, 100.1, 99.9], [102, 102.2, 101.8, 102.1, 101.9])
    assert small.lo > 1 and small.verdict == "same"
    # beyond 1 but the estimate within the minimum effect and the interval reaching past it
    edge = decide([100, 103, 97], [104, 107, 101])
    assert edge.verdict == "inconclusive"


def test_decide_deterministic_counts_and_zeros():
    assert decide([509, 509], [10, 10]).verdict == "improvement"  # slots scanned, no spread
    assert decide([1, 1, 1], [1, 1]).verdict == "same"
    assert decide([0, 0], [0, 0]).verdict == "same"
    z = decide([0, 3], [2, 3])
    assert z.verdict == "inconclusive" and "0" in z.note


def test_histogram_figures_never_make_a_zero_width_interval():
    """One unmap per run read off a log2 histogram: every run lands on the same interpolated value,
    so the runs agree exactly while the truth may move within the bucket (bench/compare_aa found
    A/A 'regression, 2.00x [2.00-2.00]' this way)."""
    exact = decide([3072.0] * 3, [6144.0] * 3)
    assert exact.lo == exact.hi == exact.ratio  # exact figures (slots visited): the point is the truth
    hist = decide([3072.0] * 3, [6144.0] * 3, floor=HIST_FLOOR, conf=1 - 0.05 / 8)
    assert hist.lo < 1 < 2 < hist.hi and hist.verdict == "inconclusive" and hist.runs_needed > 3
    assert hist.spread_before == 0  # the spread shown is the measured one


def test_min_effect_moves_the_line():
    b, a = [100, 101, 99, 100, 100], [108, 109, 107, 108, 108]
    assert decide(b, a, min_effect=0.05).verdict == "regression"
    assert decide(b, a, min_effect=0.10).verdict == "same"
    assert MIN_EFFECT == 0.05


def test_interval_contains_estimate_as_printed():
    rng = np.random.default_rng(5)
    for _ in range(500):
        b = np.exp(rng.normal(0, rng.uniform(0.001, 0.5), rng.integers(2, 8))) * rng.uniform(0.01, 100)
        a = b.mean() * np.exp(rng.normal(rng.normal(0, 0.3), rng.uniform(0.001, 0.5), rng.integers(2, 8)))
        d = decide(list(b), list(a))
        assert d.lo <= d.ratio <= d.hi
        est, ci = fmt_ratio_ci(d.ratio, d.lo, d.hi)
        lo, hi = (float(x) for x in ci[1:-1].split("-"))
        assert lo <= float(est[:-1]) <= hi, (est, ci)
    assert fmt_ratio_ci(1.2849, 1.2849, 1.2851) == ("1.28x", "[1.28-1.29]")


def test_runs_needed_is_the_first_n_that_decides():
    d, s2, m = math.log(1.12), 0.08 ** 2, math.log(1.05)
    n = runs_needed(d, s2, m)
    assert n is not None and n > 2
    from scipy.stats import t

    assert t.ppf(0.975, 2 * n - 2) * math.sqrt(2 * s2 / n) < d <= t.ppf(0.975, 2 * n - 4) * math.sqrt(2 * s2 / (n - 1))
    # the advice holds: n runs per side with that spread and estimate decide the row
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, n)
    z = (z - z.mean()) / z.std(ddof=1) * math.sqrt(s2)
    assert decide(list(np.exp(z)), list(np.exp(z + d))).verdict == "regression"
    assert decide(list(np.exp(z[:n - 1])), list(np.exp(z[:n - 1] + d))).verdict == "inconclusive"


# ----------------------------------------------------------------------------- whole comparisons


def test_runs_are_the_unit_not_events(tmp_path):
    """Two runs that differ by 6 % in their medians: the old per-event test called a 1-run
    comparison "significant (p<1e-300)"; with runs as the unit it is inconclusive."""
    b = read_inputs([one_run(tmp_path / "b", 2000, seed=1)])
    a = read_inputs([one_run(tmp_path / "a", 2120, seed=2)])
    df = compare(b, a)
    p50 = df[df.metric == "p50"].iloc[0]
    assert p50["verdict"] == "inconclusive" and p50["runs_before"] == p50["runs_after"] == 1
    assert "fewer than 2 runs" in p50["line"]


def test_known_regression_and_aa_over_runs(tmp_path):
    before = read_inputs([side(tmp_path, "b", 2000, runs=5, seed=1)])
    slower = read_inputs([side(tmp_path, "a", 2600, runs=5, seed=2)])
    same = read_inputs([side(tmp_path, "s", 2000, runs=5, seed=3)])
    df = compare(before, slower)
    p50 = df[df.metric == "p50"].iloc[0]
    assert p50["verdict"] == "regression" and 1.2 < p50["ci_lo"] <= p50["ratio"] <= p50["ci_hi"] < 1.4
    assert len(p50["values_before"]) == 5 and p50["n_before"] == 5 * 600
    assert re.match(r"unmap p50: regression, 1\.\d\dx \[1\.\d\d-1\.\d\d\] after/before \(5 vs 5 runs\)$", p50["line"])
    aa = compare(before, same)
    assert not set(aa["verdict"]) & {"regression", "improvement"}, aa[["metric", "verdict", "ratio", "ci_lo", "ci_hi"]]
    assert aa[aa.metric == "visited"]["verdict"].iloc[0] == "same"


def test_memslot_change_rows_and_histogram_only(tmp_path):
    b = read_inputs([side(tmp_path, "b", 2000, runs=4, seed=1, events=False, change_median=40_000)])
    a = read_inputs([side(tmp_path, "a", 2000, runs=4, seed=2, events=False, change_median=20_000)])
    df = compare(b, a)
    mv = df[(df.kind == "memslot") & (df.metric == "p50")].iloc[0]
    assert mv["op"] == "move" and mv["verdict"] == "improvement" and mv["source"].startswith("log2 histogram")
    assert mv["line"].startswith("memslot move p50: improvement, 0.")


def test_different_provenance_not_merged_nor_hidden(tmp_path):
    df = compare(read_inputs([one_run(tmp_path / "b", 2000, 1)]), read_inputs([one_run(tmp_path / "a", 1000, 2, prov="syscall")]))
    assert set(df["lat_provenance"]) == {"exact", "syscall"}
    assert all(v == "inconclusive" for v in df["verdict"])
    assert all("not compared: provenance" in n for n in df["note"])
    exact = df[(df.lat_provenance == "exact") & (df.metric == "p50")].iloc[0]
    assert exact["before"] > 0 and math.isnan(exact["after"])  # one-sided rows keep their figures


def bench_side(tmp_path, name, slow, runs, seed, iter_spread=0.01):
    """A bench directory: unmap at 10 and 500 memslots, ``runs`` runs each, iter_times_s listed."""
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    os.makedirs(path)
    idx = new_index({"host": "synthetic", "kernel": "synthetic", "slots": [10, 500], "scenarios": ["unmap"], "iterations": 4})
    for k in range(runs):
        for nslots in (10, 500):
            f = math.exp(rng.normal(0, 0.01))
            med = (800 + slow * nslots) * f
            s, _ = simulate([SynthVm("v", 7, memslots=nslots)], [SynthOp("v", op="unmap", per_interval=300, lat_median_ns=med)],
                            intervals=2, seed=seed * 100 + k * 7 + nslots, events=False)
            rel = f"runs/unmap-{nslots}-r{k + 1}/recording"
            os.makedirs(path / os.path.dirname(rel))
            record_synthetic(str(path / rel), s, None)
            its = list(np.exp(rng.normal(math.log(med * 1e-5), iter_spread, 4)))
            idx["runs"].append({"scenario": "unmap", "slots": nslots, "run": k + 1, "iterations": 4, "recording": rel,
                                "status": "ok", "workload": {"iter_times_s": its, "iter_avg_s": float(np.mean(its)),
                                                             "iter_best_s": float(min(its)), "iterations": 4}})
    save_index(str(path), idx)
    return str(path)


def test_bench_runs_matrix_with_time_per_iteration(tmp_path, capsys, monkeypatch):
    b = bench_side(tmp_path, "b", slow=2.0, runs=4, seed=1)
    a = bench_side(tmp_path, "a", slow=0.0, runs=4, seed=2)
    df = compare(read_inputs([b]), read_inputs([a]))
    it = df[(df.kind == "iteration") & (df.slots == 500)].iloc[0]
    assert it["runs_before"] == 4 and it["verdict"] == "improvement" and it["source"].endswith("iter_times_s")
    u10 = df[(df.kind == "hva") & (df.slots == 10) & (df.metric == "p50")].iloc[0]
    assert u10["verdict"] == "same" and u10["ratio"] == pytest.approx(800 / 820, rel=0.03)  # 2.4 % < 5 %
    u500 = df[(df.kind == "hva") & (df.slots == 500) & (df.metric == "p50")].iloc[0]
    assert u500["verdict"] == "improvement" and u500["ratio"] == pytest.approx(800 / 1800, rel=0.1)
    code, out, _ = run_cli([b, a], capsys, monkeypatch, width=120)
    assert code in (0, 3)
    assert " unmap " in out and "500 slots" in out and "improvement 0.4" in out
    assert max(len(ln) for ln in out.splitlines()) <= 120


def test_bench_fixtures_with_one_run_are_inconclusive(capsys, monkeypatch):
    """bench-before/after hold one run per configuration: the 2x at 509 slots is not a verdict."""
    code, out, _ = run_cli([os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after")], capsys, monkeypatch, 120)
    assert code == 3
    assert not re.search(r": (regression|improvement)|(regression|improvement) \d", out)
    assert "unmap [unmap, 509 slots] p50: inconclusive, 0.451x after/before (1 vs 1 runs): fewer than 2 runs" in out
    assert "0 regression, 0 improvement, 0 same, 24 inconclusive (rows)" in out
    assert "exit status 3" in out
    assert max(len(ln.rstrip()) for ln in out.splitlines()) <= 120


# ----------------------------------------------------------------------------- exit status, --json, warnings


def test_exit_status_each_verdict(tmp_path, capsys, monkeypatch):
    b = side(tmp_path, "b", 2000, runs=4, seed=1)
    assert run_cli([b, side(tmp_path, "slow", 3000, runs=4, seed=2)], capsys, monkeypatch)[0] == 1
    assert run_cli([b, side(tmp_path, "fast", 1000, runs=4, seed=3)], capsys, monkeypatch)[0] == 0
    one = side(tmp_path, "one", 1000, runs=1, seed=4)
    code, out, err = run_cli([b, one], capsys, monkeypatch)
    assert code == 3 and "exit status 3" in out
    assert err == "kvmtrace: compare: no regression, some rows inconclusive (exit status 3)\n"


def test_exit_status_precedence():
    import pandas as pd

    df = pd.DataFrame({"verdict": ["same", "inconclusive", "regression"]})
    assert exit_status(df) == 1
    assert exit_status(df, warnings=1) == 4
    assert exit_status(df, warnings=1, accept_warnings=True) == 1
    assert exit_status(df[:2]) == 3 and exit_status(df[:1]) == 0


def test_recording_against_bench_dir_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli([os.path.join(FIX, "basic"), os.path.join(FIX, "bench-after")], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "kvmtrace: cannot compare recordings (before) with a bench directory (after)"
    assert "fix:" in err and "Traceback" not in err


def test_bad_min_effect_is_usage_error(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli([FIX + "/basic", FIX + "/basic", "--min-effect", "150%"], capsys, monkeypatch)
    assert code == 2 and "--min-effect" in err and "fix:" in err


def damaged(tmp_path, src, name):
    """A copy of a recording whose recorder never finished (status still "recording")."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    meta_path = dst / "kvmtrace-recording.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = "recording"
    meta_path.write_text(json.dumps(meta))
    return str(dst)


def test_warnings_travel_and_exit_4(tmp_path, capsys, monkeypatch):
    b = side(tmp_path, "b", 2000, runs=3, seed=1)
    a = side(tmp_path, "a", 3000, runs=3, seed=2)
    damaged(tmp_path, os.path.join(a, "run1"), "a/run9")
    recs = read_inputs([a])
    want = [w for r in recs for w in r.warnings]
    assert want and any("recorder did not finish" in w for w in want)
    code, out, _ = run_cli([b, a, "--html", tmp_path / "c.html"], capsys, monkeypatch)
    assert code == 4
    assert "WARNING after run9: " + want[0] in out
    assert "recorder did not finish" in (tmp_path / "c.html").read_text()
    code, out, _ = run_cli([b, a, "--accept-warnings"], capsys, monkeypatch)
    assert code == 1 and "WARNING after run9" in out
    code, out, _ = run_cli([b, a, "--json"], capsys, monkeypatch)
    doc = json.loads(out)
    assert code == 4 and doc["exit_status"] == 4
    assert [w["warning"] for w in doc["sides"]["after"]["warnings"]] == want and doc["sides"]["before"]["warnings"] == []


def test_json_shape_validates_against_schema(tmp_path, capsys, monkeypatch):
    import jsonschema

    schema = json.load(open(SCHEMA))
    jsonschema.Draft202012Validator.check_schema(schema)
    b = side(tmp_path, "b", 2000, runs=3, seed=1)
    for other, want in ((side(tmp_path, "s", 3000, runs=3, seed=2), 1), (side(tmp_path, "o", 1000, runs=1, seed=3), 3)):
        code, out, _ = run_cli([b, other, "--json", "--min-effect", "0.1"], capsys, monkeypatch)
        doc = json.loads(out)
        jsonschema.validate(doc, schema)
        assert code == want == doc["exit_status"] and doc["min_effect"] == 0.1
        assert sum(doc["summary"].values()) == len(doc["rows"])
        for r in doc["rows"]:
            if r["ci_lo"] is not None:
                assert r["ci_lo"] <= r["ratio"] <= r["ci_hi"]
    bench = [os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after")]
    code, out, _ = run_cli(bench + ["--json"], capsys, monkeypatch)
    doc = json.loads(out)
    jsonschema.validate(doc, schema)
    assert code == 3 and {r["verdict"] for r in doc["rows"]} == {"inconclusive"}
    assert {r["slots"] for r in doc["rows"]} == {10, 509}


def test_compare_cli_csv_and_html(tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli([os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after"),
                            "--csv", tmp_path / "c.csv", "--html", tmp_path / "c.html"], capsys, monkeypatch)
    assert code == 3
    assert (tmp_path / "c.csv").read_text().startswith("kind,scenario,slots,op,lat_provenance,metric,")
    page = (tmp_path / "c.html").read_text()
    assert "data:image/png;base64," in page and "exit status 3" in page


# ----------------------------------------------------------------------------- bench helpers


def test_seed_table_from_bench_dir():
    t = seed_table(read_inputs([os.path.join(FIX, "bench-before")]))
    t = t[t.scenario == "unmap"]
    assert list(t["slots"]) == [10, 509] and list(t["op"]) == ["unmap", "unmap"]
    assert list(t["count"]) == [1500, 1500] and list(t["count_per_iter"]) == [500, 500]
    assert list(t["scanned_mean"]) == [10.0, 509.0]
    assert t["iter_best_s"].iloc[1] > t["iter_best_s"].iloc[0]


def test_bench_option_parsing_and_cap():
    from kvmtrace.analysis.bench import run_dir_name

    assert parse_slots("10,30, 509") == [10, 30, 509]
    with pytest.raises(UsageError, match="comma-separated list"):
        parse_slots("10,x")
    with pytest.raises(UsageError, match="unknown scenario bogus"):
        parse_scenarios("unmap,bogus")
    with pytest.raises(UsageError) as e:
        check_slots([10, 509, 600], 509)
    assert str(e.value) == ("--slots 600: above this kernel's memslot limit (509, KVM_CAP_NR_MEMSLOTS)\n"
                            "  fix: use memslot counts up to 509")
    assert [run_dir_name("unmap", 8, k) for k in range(3)] == ["unmap-8", "unmap-8-r2", "unmap-8-r3"]


def test_bench_runs_option_in_help_and_min_effect_default(capsys):
    from kvmtrace.commands import compare as cc

    assert cc.MIN_EFFECT == MIN_EFFECT
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--runs" in out and "[default: 5;" in out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    for code in ("0  no", "1  a regression", "2  bad input", "3  no regression", "4  an input"):
        assert code in out


@pytest.mark.parametrize("kind", ["damaged", "empty", "lost_events", "map_full", "underived"])
def test_each_warning_kind_travels_through_compare(kind, tmp_path, capsys, monkeypatch):
    """A damaged, empty, lossy, map-full or underived recording on one side: compare says so in
    text and JSON and exits 4 unless --accept-warnings (then the verdict's own status)."""
    from .test_report_warnings import KINDS

    make, text = KINDS[kind]
    good = tmp_path / "good"
    good.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    from .test_report_warnings import make_clean
    make_clean(str(good / "r"))
    make(str(bad / "r"))
    code, out, err = run_cli([good, bad], capsys, monkeypatch)
    assert code == 4, (out, err)
    assert text in out.replace("\n", " ") or text in " ".join(out.split())
    code, out, _ = run_cli([good, bad, "--json"], capsys, monkeypatch)
    doc = json.loads(out)
    assert code == 4 and doc["exit_status"] == 4
    assert any(text in w["warning"] for w in doc["sides"]["after"]["warnings"]), doc["sides"]["after"]["warnings"]
    assert doc["sides"]["before"]["warnings"] == []
    code, out, _ = run_cli([good, bad, "--accept-warnings"], capsys, monkeypatch)
    assert code in (0, 1, 3) and "WARNING after" in out
