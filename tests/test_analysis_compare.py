"""compare and bench tables on synthetic data with known answers (no root)."""

from __future__ import annotations

import math
import re
import os

import numpy as np
import pytest

from kvmtrace.analysis.bench import check_slots, parse_scenarios, parse_slots, seed_table
from kvmtrace.analysis.compare import compare, quantile_ci_hist, quantile_ci_values, verdict
from kvmtrace.analysis.recording import read_inputs
from kvmtrace.analysis.synth import SynthOp, SynthVm, record_synthetic, simulate
from kvmtrace.cli import main
from kvmtrace.errors import UsageError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")


def rec(tmp_path, name, median, events=True, seed=1, prov="exact"):
    vm = SynthVm("v", 10)
    s, e = simulate([vm], [SynthOp("v", op="unmap", per_interval=400, lat_median_ns=median, lat_provenance=prov)],
                    intervals=3, seed=seed, events=events)
    return read_inputs([record_synthetic(str(tmp_path / name), s, e if events else None)])


def test_known_speedup_raw_events(tmp_path):
    df = compare(rec(tmp_path, "b", 2000, seed=1), rec(tmp_path, "a", 1000, seed=2))
    r = df.iloc[0]
    assert r["test"] == "Mann-Whitney U on raw event latencies (two-sided)"
    assert r["n_before"] == r["n_after"] == 1200
    assert r["median_ratio_ci_lo"] < 0.5 < r["median_ratio_ci_hi"] and r["median_ratio_ci_hi"] < 0.6
    assert r["p_value"] < 1e-100
    assert re.match(r"unmap: (1\.9\d|2\.0\d)x faster, significant \(p[=<]", r["verdict"]), r["verdict"]


def test_same_distribution_is_noise(tmp_path):
    df = compare(rec(tmp_path, "b", 2000, seed=1), rec(tmp_path, "a", 2000, seed=2))
    r = df.iloc[0]
    assert r["p_value"] > 0.05 and r["median_ratio_ci_lo"] < 1 < r["median_ratio_ci_hi"]
    assert r["verdict"].startswith("unmap: noise (")


def test_histogram_only_says_which_test(tmp_path):
    df = compare(rec(tmp_path, "b", 4000, events=False), rec(tmp_path, "a", 1000, events=False, seed=3))
    r = df.iloc[0]
    assert r["test"].startswith("Mann-Whitney U on log2 bucket indices")
    assert r["latency_source"] == "log2 histogram, linear interpolation within bucket"
    assert "4.0" in r["verdict"] or "3.9" in r["verdict"] or "4.1" in r["verdict"]
    assert "significant" in r["verdict"]


def test_different_provenance_not_merged_nor_hidden(tmp_path):
    df = compare(rec(tmp_path, "b", 2000), rec(tmp_path, "a", 1000, prov="syscall"))
    assert len(df) == 2
    assert all("not compared (provenance differs" in v for v in df["verdict"])


def test_bench_dirs_compare_per_scenario_and_slots():
    df = compare(read_inputs([os.path.join(FIX, "bench-before")]), read_inputs([os.path.join(FIX, "bench-after")]))
    per_run = {"move-inactive": ["iteration", "hva", "memslot"], "unmap": ["iteration", "hva"]}
    assert list(zip(df["scenario"], df["slots"], df["kind"])) == [
        (sc, n, k) for sc in ("move-inactive", "unmap") for n in (10, 509) for k in per_run[sc]]
    u509 = df[(df.kind == "hva") & (df.slots == 509) & (df.scenario == "unmap")].iloc[0]
    assert u509["scanned_mean_before"] == 509 and math.isnan(u509["scanned_mean_after"])
    assert "faster, significant" in u509["verdict"]
    assert u509["median_ratio"] == pytest.approx(800 / 1818, rel=0.15)
    it = df[(df.kind == "iteration") & (df.slots == 509)].iloc[0]
    assert it["verdict"].endswith("not tested (workload JSON has no per-iteration times)")


def test_quantile_cis():
    v = np.arange(1, 1001)
    est, lo, hi = quantile_ci_values(v, 0.5)
    assert est == 500.5 and lo < est < hi and hi - lo < 80
    c = np.zeros(64, dtype=np.int64)
    c[11] = 1000  # all values in [1024, 2048)
    est, lo, hi = quantile_ci_hist(c, 0.5)
    assert est == 1536.0 and 1024 <= lo < est < hi <= 2048


def test_verdict_lines():
    assert verdict("unmap", 1 / 2.3, 1e-9) == "unmap: 2.30x faster, significant (p=1e-09)"
    assert verdict("unmap", 1.5, 0.3) == "unmap: noise (1.50x slower, p=0.3)"
    assert verdict("unmap", 1.01, 1e-5) == "unmap: 1.01x slower, significant but below 2% (negligible, p=1e-05)"
    assert verdict("unmap", float("nan"), None) == "unmap: not compared (no latency on one side)"


def test_seed_table_from_bench_dir():
    t = seed_table(read_inputs([os.path.join(FIX, "bench-before")]))
    t = t[t.scenario == "unmap"]
    assert list(t["slots"]) == [10, 509] and list(t["op"]) == ["unmap", "unmap"]
    assert list(t["count"]) == [1500, 1500] and list(t["count_per_iter"]) == [500, 500]
    assert list(t["scanned_mean"]) == [10.0, 509.0]
    assert t["iter_best_s"].iloc[1] > t["iter_best_s"].iloc[0]


def test_bench_option_parsing_and_cap():
    assert parse_slots("10,30, 509") == [10, 30, 509]
    with pytest.raises(UsageError, match="comma-separated list"):
        parse_slots("10,x")
    with pytest.raises(UsageError, match="unknown scenario bogus"):
        parse_scenarios("unmap,bogus")
    with pytest.raises(UsageError) as e:
        check_slots([10, 509, 600], 509)
    assert str(e.value) == ("--slots 600: above this kernel's memslot limit (509, KVM_CAP_NR_MEMSLOTS)\n"
                            "  fix: use memslot counts up to 509")


def test_compare_cli_csv_and_html(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    with pytest.raises(SystemExit) as e:
        main(["compare", os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after"),
              "--csv", str(tmp_path / "c.csv"), "--html", str(tmp_path / "c.html")])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "unmap [unmap, 509 slots]:" in out and "faster, significant" in out
    assert (tmp_path / "c.csv").read_text().startswith("kind,scenario,slots,op,")
    assert "data:image/png;base64," in (tmp_path / "c.html").read_text()


def _compare_lines(args, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.chdir(FIX)
    with pytest.raises(SystemExit) as e:
        main(["compare"] + args)
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = [ln.rstrip() for ln in out.splitlines()]
    assert max(len(ln) for ln in lines) <= 120
    return lines


def test_compare_lines_at_120_columns_show_both_sides(capsys, monkeypatch):
    # 5.10-like (scanned 509) against a recording without scanned: "509 -> -", never just "-";
    # rows missing on one side keep the side that has them ("- -> 3.06µs")
    lines = _compare_lines(["hist-only", "basic"], capsys, monkeypatch)
    assert lines == [
        "before: hist-only  kernel 5.10-synthetic  host synthetic  attach unknown",
        "after:  basic  kernel 0.0.0-synthetic  host synthetic  attach unknown",
        "before -> after (ratio = after / before, < 1 is faster; [95% CI] below it)",
        "",
        " what                  count               p50          ratio               p99          ratio  visited   scanned",
        " ────────────────────────────────────────────────────────────────────────────────────────────────────────────────",
        " age                 0 -> 28       - -> 3.06µs              -       - -> 5.13µs              -   - -> 2         -",
        "   n/c",
        " unmap            900 -> 260  22.1µs -> 1.15µs        0.0521x  60.1µs -> 3.65µs        0.0608x   1 -> 1  509 -> -",
        "   19.20x faster                                [0.044-0.061]                    [0.047-0.073]",
        " memslot create       0 -> 8       - -> 45.9µs              -       - -> 57.5µs              -        -         -",
        "   n/c",
        " memslot move         0 -> 4       - -> 1.71ms              -       - -> 2.66ms              -        -         -",
        "   n/c",
        "",
        "age: not compared (no age in before)",
        "unmap: 19.20x faster, significant (p=7.5e-158)",
        "memslot create: not compared (no create in before)",
        "memslot move: not compared (no move in before)",
        "tests: Mann-Whitney U on log2 bucket indices (histograms only; ties corrected; two-sided)",
        "CI: order-statistic interval per side at sqrt(0.95), combined into ratio bounds (>= 95 %)",
    ]


def test_compare_bench_dirs_prints_the_memslot_count_matrix(capsys, monkeypatch):
    lines = _compare_lines(["bench-before", "bench-after"], capsys, monkeypatch)
    # rows = scenario and what, columns = memslot counts, cells before -> after (synthetic 5.10-like
    # linear scan against 6.1-like interval tree: scanned "509 -> -", the 509 column ~2x faster)
    assert lines == [
        'before: bench-before  kernel 5.10-synthetic  host synthetic  attach kprobe',
        'after:  bench-after  kernel 6.1-synthetic  host synthetic  attach fentry',
        'before -> after by scenario and memslot count (latency p50 / p99; time/iter = workload average)',
        '',
        ' scenario / what             10 slots         509 slots',
        ' ──────────────────────────────────────────────────────',
        ' move-inactive',
        '   time/iter         6.61ms -> 6.45ms  14.7ms -> 6.45ms',
        '                        1.02x faster?     2.27x faster?',
        '   unmap p50         3.38µs -> 3.19µs  7.17µs -> 3.34µs',
        '                                noise      2.15x faster',
        '   unmap p99         8.03µs -> 7.95µs     16.1µs -> 8µs',
        '   unmap visited               1 -> 1            1 -> 1',
        '   unmap scanned              10 -> -          509 -> -',
        '   memslot move p50  24.9µs -> 19.3µs  91.5µs -> 42.7µs',
        '                         1.29x faster      2.14x faster',
        '   memslot move p99  61.6µs -> 55.7µs   184µs -> 65.1µs',
        ' unmap',
        '   time/iter         6.61ms -> 6.45ms  14.7ms -> 6.45ms',
        '                        1.02x faster?     2.27x faster?',
        '   unmap p50           828ns -> 810ns   1.81µs -> 816ns',
        '                         1.02x faster      2.22x faster',
        '   unmap p99         2.02µs -> 1.99µs     4.07µs -> 2µs',
        '   unmap visited               1 -> 1            1 -> 1',
        '   unmap scanned              10 -> -          509 -> -',
        '',
        'verdict per cell: significant change, noise, same (<2%), ? = not tested, n/c = not compared',
        'time/iter [move-inactive, 10 slots]: 1.02x faster, not tested (workload JSON has no per-iteration times)',
        'unmap [move-inactive, 10 slots]: noise (1.06x faster, p=0.15)',
        'memslot move [move-inactive, 10 slots]: 1.29x faster, significant (p=1e-05)',
        'time/iter [move-inactive, 509 slots]: 2.27x faster, not tested (workload JSON has no per-iteration times)',
        'unmap [move-inactive, 509 slots]: 2.15x faster, significant (p=2.1e-18)',
        'memslot move [move-inactive, 509 slots]: 2.14x faster, significant (p=3.9e-19)',
        'time/iter [unmap, 10 slots]: 1.02x faster, not tested (workload JSON has no per-iteration times)',
        'unmap [unmap, 10 slots]: 1.02x faster, significant (p=0.017)',
        'time/iter [unmap, 509 slots]: 2.27x faster, not tested (workload JSON has no per-iteration times)',
        'unmap [unmap, 509 slots]: 2.22x faster, significant (p<1e-300)',
        'tests: Mann-Whitney U on log2 bucket indices (histograms only; ties corrected; two-sided)',
        'CI: order-statistic interval per side at sqrt(0.95), combined into ratio bounds (>= 95 %)',
    ]


def test_one_sided_rows_keep_their_figures(tmp_path):
    df = compare(rec(tmp_path, "b", 2000), rec(tmp_path, "a", 1000, prov="syscall"))
    exact = df[df.lat_provenance == "exact"].iloc[0]
    sysc = df[df.lat_provenance == "syscall"].iloc[0]
    assert exact["median_before"] > 0 and math.isnan(exact["median_after"]) and exact["slots_mean_before"] == 1
    assert sysc["median_after"] > 0 and math.isnan(sysc["median_before"])
