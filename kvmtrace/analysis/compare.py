"""Before/after comparison with runs as the unit of replication (docs/analysis.md, "compare").

Each side is a set of runs: one recording is one run (a bench directory holds one recording per
scenario x memslot count x run). Every row (op or memslot change type x scenario x memslot count
x metric) is decided from ONE figure per run, never from the raw events as independent samples:

* metrics: latency p50 and p99 of the run (raw events when every run of both sides recorded one
  for every operation, else the run's log2 histogram), mean slots visited, mean slots scanned per
  hva op, and the workload's time per iteration (the run's median of ``iter_times_s``);
* the estimate is the ratio of geometric means over runs, after / before (< 1 is faster);
* its interval is Welch's t interval on the difference of the mean logs, exponentiated (a side
  whose runs read exactly the same value off log2 histograms counts a run-to-run SD of
  ln 2 / sqrt 12, one bucket's quantisation, not 0); the
  intervals of one comparison hold together at 95 % (Bonferroni: each row's at 1 - 0.05 / k for
  the k rows both sides have), so an A/A comparison calls any row a change at most 5 % of the time;
* ONE rule decides the verdict, with m = ``min_effect`` (default 5 %)::

      regression   the whole interval > 1 and the estimate > 1 + m
      improvement  the whole interval < 1 and the estimate < 1 / (1 + m)
      same         the whole interval inside [1 / (1 + m), 1 + m]
      inconclusive anything else (also: fewer than 2 runs on a side, a row on one side only)

  An inconclusive row says how many runs per side would likely decide it, assuming its estimate
  and run-to-run spread hold.

Nothing is dropped: every key of either side gets its rows; a row on one side only keeps that
side's figures and is inconclusive ("not compared: ...").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..consts import LOG2_BUCKETS
from ..errors import UsageError
from ..snapshot import Log2Hist
from . import tables as T
from .recording import Recording
from .report import EVENT_SOURCE, HIST_SOURCE

CONFIDENCE = 0.95
MIN_EFFECT = 0.05  # changes smaller than 5 % count as "same"
MIN_RUNS = 2  # per side: fewer and the run-to-run spread is unknown
MAX_RUNS_ADVICE = 10_000
METHOD = ("per-run figures; ratio of geometric means (after / before); Welch t interval on the log scale, "
          "simultaneous 95% over the rows (Bonferroni); runs are the unit of replication")
VERDICTS = ("regression", "improvement", "same", "inconclusive")
ITER_SOURCE = "workload JSON: per-run median of iter_times_s"


@dataclass
class Run:
    """One run's figures for one comparison key."""

    count: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_BUCKETS, dtype=np.int64))
    values: Optional[Tuple[np.ndarray, np.ndarray]] = None  # raw latencies as (values, counts), when complete
    slots_count: int = 0
    slots_sum: int = 0
    scanned_sum: Optional[int] = None
    iter_time: float = math.nan
    iter_source: str = ""
    slots_provenance: str = ""


def _bench_key(r: Recording) -> Tuple[str, int]:
    if r.bench:
        return (str(r.bench.get("scenario", "")), int(r.bench.get("slots") or -1))
    return ("", -1)


def _latency_counts(recs: Sequence[Recording]) -> Dict[str, Optional[pd.DataFrame]]:
    """Raw-event latency value counts of every recording (engine, out of core), per event table:
    rec, op/change, lat_provenance, v, c. Event tables held in memory are counted in pandas."""
    from . import engine as E

    out: Dict[str, Optional[pd.DataFrame]] = {}
    con = None
    try:
        for ev_table, name_col in (("hva_events", "op"), ("memslot_events", "change")):
            src = [(i, r.events[ev_table]) for i, r in enumerate(recs) if ev_table in r.events]
            parts = []
            if src:
                con = con or E.connect()
                parts.append(E.latency_counts(con, src, name_col))
            for i, r in enumerate(recs):
                if ev_table not in r.events and ev_table in r.tables and not r.tables[ev_table].empty:
                    ev = r.tables[ev_table]
                    vc = ev.groupby([name_col, "lat_provenance", "latency_ns"], observed=True).size().rename("c").reset_index()
                    vc = vc.rename(columns={"latency_ns": "v"}).assign(rec=i)
                    vc[name_col] = vc[name_col].astype(str)
                    vc["lat_provenance"] = vc["lat_provenance"].astype(str)
                    parts.append(vc)
            out[ev_table] = pd.concat(parts, ignore_index=True) if parts else None
    finally:
        if con is not None:
            con.close()
    return out


def _iter_time(wl: dict) -> Tuple[float, str]:
    its = wl.get("iter_times_s")
    if isinstance(its, list) and its:
        try:
            vals = [float(x) for x in its]
        except (TypeError, ValueError):
            vals = []
        if vals and all(math.isfinite(v) for v in vals):
            return float(np.median(vals)), ITER_SOURCE
    try:
        avg = float(wl.get("iter_avg_s"))
    except (TypeError, ValueError):
        return math.nan, ""
    return avg, "workload JSON: iter_avg_s (no iter_times_s)"


def collect(recs: Sequence[Recording]) -> Dict[tuple, List[Run]]:
    """Recordings (one run each) -> {(kind, scenario, slots, name, lat_provenance): [Run per run]}."""
    out: Dict[tuple, List[Run]] = {}
    lat_vc = _latency_counts(recs)
    for ri, r in enumerate(recs):
        scen, nslots = _bench_key(r)
        for kind, table, name_col, ev_table in (("hva", "hva", "op", "hva_events"), ("memslot", "memslot", "change", "memslot_events")):
            df = r[table]
            if df.empty:
                continue
            vc = lat_vc.get(ev_table)
            has_ev = vc is not None and ev_table in r.tables
            if has_ev:
                vc = vc[vc["rec"] == ri]
            g = df.assign(_n=df[name_col].astype(str), _p=df["lat_provenance"].astype(str)).groupby(["_n", "_p"], sort=True)
            for (name, lprov), part in g:
                run = Run()
                run.count = int(part["count"].sum())
                run.hist = T.hist_sum(part, T.LAT_B).astype(np.int64)
                if kind == "hva":
                    run.slots_count = int(part["slots_count"].sum())
                    run.slots_sum = int(part["slots_sum"].sum())
                    run.slots_provenance = str(part["slots_provenance"].iloc[0])
                    sc = part["scanned_sum"].sum(min_count=1)
                    if not pd.isna(sc):
                        run.scanned_sum = int(sc)
                if has_ev and not vc.empty:
                    sel = ((vc[name_col] == name) & (vc["lat_provenance"] == lprov)).to_numpy()
                    v, c = vc["v"].to_numpy(np.int64)[sel], vc["c"].to_numpy(np.int64)[sel]
                    if int(c.sum()) == run.count and not (v < 0).any():
                        from . import engine as E

                        run.values = E.merge_counts([(v, c)])
                out.setdefault((kind, scen, nslots, name, lprov), []).append(run)
        if r.bench:
            wl = r.bench.get("workload") or {}
            run = Run()
            run.iter_time, run.iter_source = _iter_time(wl)
            run.count = int(wl.get("iterations") or r.bench.get("iterations") or 0)
            if not math.isnan(run.iter_time):
                out.setdefault(("iteration", scen, nslots, "time/iter", "workload"), []).append(run)
    return out


# ----------------------------------------------------------------------------- the statistics


@dataclass
class Decision:
    """The run-level comparison of one row."""

    ratio: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    verdict: str = "inconclusive"
    runs_needed: Optional[int] = None  # per side, for an inconclusive row (None: not estimable)
    note: str = ""
    spread_before: float = math.nan  # run-to-run SD of the log figure (~ coefficient of variation)
    spread_after: float = math.nan


def _t(df: float, conf: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + conf / 2, df))


def runs_needed(d: float, s2: float, m: float, conf: float = CONFIDENCE) -> Optional[int]:
    """Runs per side after which the rule would likely decide a row whose log ratio is ``d`` and
    whose per-run log figures have variance ``s2`` on each side: the smallest n with
    t(2n-2) * sqrt(2 s2 / n) below |d| (when |d| > m: regression or improvement) or below
    m - |d| (same). None when it would take more than MAX_RUNS_ADVICE runs."""
    target = abs(d) if abs(d) > m else m - abs(d)
    if target <= 0 or not math.isfinite(s2):
        return None
    if s2 <= 0:
        return MIN_RUNS
    def decides(n: int) -> bool:  # the half-width falls with n: bisect
        return _t(2 * n - 2, conf) * math.sqrt(2 * s2 / n) < target

    if not decides(MAX_RUNS_ADVICE):
        return None
    lo, hi = MIN_RUNS - 1, MAX_RUNS_ADVICE  # decides(hi), not decides(lo) (or lo below MIN_RUNS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decides(mid):
            hi = mid
        else:
            lo = mid
    return hi


HIST_FLOOR = math.log(2) / math.sqrt(12)  # SD of a uniform error over one log2 bucket, on the log scale


def decide(before: Sequence[float], after: Sequence[float], min_effect: float = MIN_EFFECT,
           conf: float = CONFIDENCE, floor: float = 0.0) -> Decision:
    """The rule of the module docstring on per-run figures of one row. ``floor``: the run-to-run
    SD (log scale) of a side whose runs agree exactly: HIST_FLOOR for figures read off log2
    histograms, whose runs can agree to the bucket (one event per run always lands on the same
    interpolated value) while the truth moves within it; 0 for exact figures."""
    b = np.array([x for x in before if x is not None and not math.isnan(x)], dtype=float)
    a = np.array([x for x in after if x is not None and not math.isnan(x)], dtype=float)
    m = math.log1p(min_effect)
    out = Decision()
    if len(a) == 0 or len(b) == 0:
        out.note = f"not compared: no figure in {'before' if len(b) == 0 else 'after'}"
        return out
    if (b <= 0).any() or (a <= 0).any():
        if (b == 0).all() and (a == 0).all():
            out.ratio = out.lo = out.hi = 1.0
            out.verdict, out.note = "same", "0 on every run of both sides"
        else:
            out.note = "a run's figure is 0: no ratio on the log scale"
        return out
    lb, la = np.log(b), np.log(a)
    d = float(la.mean() - lb.mean())
    out.ratio = math.exp(d)
    vb = float(lb.var(ddof=1)) if len(lb) > 1 else math.nan
    va = float(la.var(ddof=1)) if len(la) > 1 else math.nan
    out.spread_before, out.spread_after = math.sqrt(vb) if vb == vb else math.nan, math.sqrt(va) if va == va else math.nan
    if len(b) < MIN_RUNS or len(a) < MIN_RUNS:
        known = [v or floor ** 2 for v in (vb, va) if v == v]
        n = runs_needed(d, max(known), m, conf) if known else None
        out.runs_needed = max(n, MIN_RUNS) if n else None
        out.note = f"fewer than {MIN_RUNS} runs on a side: run-to-run spread " + ("unknown; record 5 per side to start"
                                                                              if not known else "of one side only")
        return out
    vb, va = vb or floor ** 2, va or floor ** 2  # runs that agree exactly: agree to the floor
    se2 = vb / len(b) + va / len(a)
    if se2 == 0:
        half = 0.0
    else:
        dof = se2 ** 2 / ((vb / len(b)) ** 2 / (len(b) - 1) + (va / len(a)) ** 2 / (len(a) - 1))
        half = _t(dof, conf) * math.sqrt(se2)
    lo, hi = d - half, d + half
    out.lo, out.hi = math.exp(lo), math.exp(hi)
    if lo > 0 and d > m:
        out.verdict = "regression"
    elif hi < 0 and d < -m:
        out.verdict = "improvement"
    elif lo >= -m and hi <= m:
        out.verdict = "same"
    else:
        out.verdict = "inconclusive"
        out.runs_needed = runs_needed(d, (vb + va) / 2, m, conf)
        out.note = ("the interval includes 1 (no change)" if abs(d) > m
                    else f"the interval reaches beyond the {min_effect:.3g} minimum effect")
    return out


# ----------------------------------------------------------------------------- rounding


def ratio_decimals(x: float) -> int:
    """Decimals that give ``x`` three significant digits (at least 2, at most 8)."""
    if x is None or not math.isfinite(x) or x <= 0:
        return 2
    return int(min(8, max(2, 2 - math.floor(math.log10(x)))))


def _ceil_text(x: float, dec: int) -> str:
    """x rounded up: at ``dec`` decimals below 1000, else to 3 significant digits."""
    if x < 1000:
        return f"{math.ceil(x * 10 ** dec) / 10 ** dec:.{dec}f}"
    f = 10 ** (math.floor(math.log10(x)) - 2)
    return f"{math.ceil(x / f) * f:.3g}"


def fmt_ratio_ci(ratio: float, lo: float, hi: float) -> Tuple[str, str]:
    """("1.28x", "[1.21-1.35]"): the estimate to 3 significant digits, the interval rounded
    outwards at the same decimals (a bound from 1000 up to 3 significant digits, rounded up), so
    the printed interval always contains the printed estimate."""
    if ratio is None or not math.isfinite(ratio):
        return "-", ""
    dec = ratio_decimals(ratio)
    est = f"{ratio:.{dec}f}x" if ratio < 1000 else f"{ratio:.3g}x"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return est, ""
    f = 10 ** dec
    return est, f"[{math.floor(lo * f) / f:.{dec}f}-{_ceil_text(hi, dec)}]"


# ----------------------------------------------------------------------------- the table

COLUMNS = [
    "kind", "scenario", "slots", "op", "lat_provenance", "metric", "unit", "runs_before", "runs_after",
    "n_before", "n_after", "before", "after", "ratio", "ci_lo", "ci_hi", "spread_before", "spread_after",
    "verdict", "runs_needed", "note", "source", "slots_provenance", "values_before", "values_after", "line",
]

METRIC_ORDER = {"time/iter": 0, "p50": 1, "p99": 2, "visited": 3, "scanned": 4}


def _label(kind, scen, nslots, name) -> str:
    base = name if kind != "memslot" else f"memslot {name}"
    if scen or nslots >= 0:
        return f"{base} [{scen}, {nslots} slots]"
    return base


def _quantile(run: Run, q: float, raw: bool) -> float:
    if raw:
        from . import engine as E

        v, c = run.values
        return float(E.quantiles_from_counts(v, c, [q], percent=False)[0]) if int(c.sum()) else math.nan
    h = Log2Hist.from_counts([int(c) for c in run.hist])
    x = h.quantile(q) if h.total else None
    return math.nan if x is None else float(x)


def _metrics(kind: str, lprov: str, runs: List[Run], raw: bool) -> Dict[str, Tuple[List[float], str, str]]:
    """{metric: (one figure per run, unit, source)} for one side of one key."""
    out: Dict[str, Tuple[List[float], str, str]] = {}
    if kind == "iteration":
        srcs = sorted({r.iter_source for r in runs})
        out["time/iter"] = ([r.iter_time for r in runs], "s", "; ".join(srcs))
        return out
    if lprov != "none":
        src = EVENT_SOURCE if raw else HIST_SOURCE
        out["p50"] = ([_quantile(r, 0.5, raw) for r in runs], "ns", src)
        out["p99"] = ([_quantile(r, 0.99, raw) for r in runs], "ns", src)
    if kind == "hva":
        out["visited"] = ([r.slots_sum / r.slots_count if r.slots_count else math.nan for r in runs], "slots",
                          "mean slots visited per op")
        if any(r.scanned_sum is not None for r in runs):
            out["scanned"] = ([r.scanned_sum / (r.slots_count or r.count) if r.scanned_sum is not None and (r.slots_count or r.count)
                               else math.nan for r in runs], "slots", "mean slots scanned per op")
    return out


def _center(vals: Sequence[float]) -> float:
    """The side's figure: the geometric mean over runs (the arithmetic mean when a run has 0)."""
    v = np.array([x for x in vals if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan
    if (v > 0).all():
        return float(np.exp(np.log(v).mean()))
    return float(v.mean())


def verdict_line(row: dict) -> str:
    """One line per row: "unmap [unmap, 509 slots] p50: regression, 1.28x [1.21-1.35] after/before
    (5 vs 5 runs)"; an inconclusive row says why and how many runs would likely decide it."""
    label = _label(row["kind"], row["scenario"], row["slots"], row["op"])
    if row["kind"] != "iteration":
        label += " " + row["metric"]
    est, ci = fmt_ratio_ci(row["ratio"], row["ci_lo"], row["ci_hi"])
    runs = f"{row['runs_before']} vs {row['runs_after']} runs"
    if row["runs_before"] == 0 or row["runs_after"] == 0 or est == "-":
        return f"{label}: inconclusive, {row['note']}"
    fig = f"{est} {ci}".strip() + " after/before"
    line = f"{label}: {row['verdict']}, {fig} ({runs})"
    if row["verdict"] == "inconclusive":
        why = [row["note"]] if row["note"] else []
        n = row["runs_needed"]
        if n is not None and not (isinstance(n, float) and math.isnan(n)):
            why.append(f"~{int(n)} runs per side would likely decide it")
        elif row["spread_before"] == row["spread_before"] or row["spread_after"] == row["spread_after"]:
            why.append(f"more than {MAX_RUNS_ADVICE} runs per side would be needed")
        line += ": " + "; ".join(why)
    return line


def family_confidence(k: int, conf: float = CONFIDENCE) -> float:
    """Each of ``k`` rows' interval confidence so that all k hold together with ``conf``
    (Bonferroni): an A/A comparison calls any row a change with probability <= 1 - conf."""
    return 1 - (1 - conf) / max(1, k)


def compare(before: Sequence[Recording], after: Sequence[Recording], min_effect: float = MIN_EFFECT) -> pd.DataFrame:
    """The comparison table (COLUMNS): one row per key of either side x metric, each with the
    run-level ratio, its interval (simultaneous over the rows both sides have: Bonferroni) and
    one verdict (``decide``)."""
    B, A = collect(before), collect(after)
    keys = sorted(set(B) | set(A), key=lambda k: (k[1], k[2], {"iteration": 0, "hva": 1, "memslot": 2}[k[0]], k[3], k[4]))
    k_rows = 0
    for key in set(B) & set(A):
        raw = all(r.values is not None for r in B[key] + A[key])
        k_rows += len(set(_metrics(key[0], key[4], B[key], raw)) & set(_metrics(key[0], key[4], A[key], raw)))
    conf = family_confidence(k_rows)
    rows = []
    for key in keys:
        kind, scen, nslots, name, lprov = key
        b, a = B.get(key, []), A.get(key, [])
        raw = all(r.values is not None for r in b + a)
        mb, ma = _metrics(kind, lprov, b, raw) if b else {}, _metrics(kind, lprov, a, raw) if a else {}
        for metric in sorted(set(mb) | set(ma), key=METRIC_ORDER.get):
            vb, unit, src = mb.get(metric) or ([], None, None)
            va, unit_a, src_a = ma.get(metric) or ([], None, None)
            row = dict.fromkeys(COLUMNS, math.nan)
            row.update(kind=kind, scenario=scen, slots=nslots, op=name, lat_provenance=lprov, metric=metric,
                       unit=unit or unit_a, runs_before=len(vb), runs_after=len(va),
                       n_before=sum(r.count for r in b), n_after=sum(r.count for r in a),
                       before=_center(vb), after=_center(va), source=src or src_a, note="", runs_needed=None,
                       values_before=[float(x) for x in vb], values_after=[float(x) for x in va], slots_provenance="")
            if kind == "hva":
                provs = [p for p in dict.fromkeys(r.slots_provenance for r in b + a) if p]
                row["slots_provenance"] = " -> ".join(provs)
            if b and a:
                floor = HIST_FLOOR if (src or src_a) == HIST_SOURCE else 0.0
                dcs = decide(vb, va, min_effect, conf, floor)
                row.update(ratio=dcs.ratio, ci_lo=dcs.lo, ci_hi=dcs.hi, verdict=dcs.verdict, runs_needed=dcs.runs_needed,
                           note=dcs.note, spread_before=dcs.spread_before, spread_after=dcs.spread_after)
            else:
                other = [k for k in (B if not b else A) if k[:4] == key[:4]]
                missing = "before" if not b else "after"
                if other:
                    note = f"not compared: provenance {lprov} on one side, {other[0][4]} on the other"
                else:
                    note = f"not compared: no {name} in {missing}"
                row.update(verdict="inconclusive", note=note)
            row["line"] = verdict_line(row)
            rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["min_effect"] = min_effect
    df.attrs["confidence"] = conf
    df.attrs["rows_tested"] = k_rows
    # latency histograms per side and key, summed over runs, for plots (kept out of the table's columns)
    hists = []
    for side, sides in (("before", B), ("after", A)):
        for (kind, scen, nslots, name, lprov), runs in sides.items():
            h = sum((r.hist for r in runs), np.zeros(LOG2_BUCKETS, dtype=np.int64))
            if kind != "iteration" and h.sum():
                hists.append([side, kind, scen, nslots, name, lprov] + [int(x) for x in h])
    df.attrs["latency_hists"] = pd.DataFrame(hists, columns=["side", "kind", "scenario", "slots", "op", "lat_provenance"]
                                             + list(T.LAT_B))
    return df


def summary(df: pd.DataFrame) -> Dict[str, int]:
    return {v: int((df["verdict"] == v).sum()) for v in VERDICTS}


# ----------------------------------------------------------------------------- sides and exit status

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INCONCLUSIVE, EXIT_WARNINGS = 0, 1, 2, 3, 4


def exit_status(df: pd.DataFrame, warnings: int = 0, accept_warnings: bool = False) -> int:
    """2 (bad input) is raised before this; then 4 > 1 > 3 > 0."""
    if warnings and not accept_warnings:
        return EXIT_WARNINGS
    if (df["verdict"] == "regression").any():
        return EXIT_REGRESSION
    if (df["verdict"] == "inconclusive").any():
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def input_kind(recs: Sequence[Recording], what: str) -> str:
    """"bench" (runs of bench directories) or "recording"; a side mixing both is refused."""
    kinds = {"bench" if r.bench else "recording" for r in recs}
    if len(kinds) > 1:
        raise UsageError(f"{what} mixes bench directories and recordings",
                         "give each side only recordings (or directories of them) or only bench directories")
    return kinds.pop() if kinds else "recording"


def check_kinds(before: Sequence[Recording], after: Sequence[Recording]) -> str:
    kb, ka = input_kind(before, "before"), input_kind(after, "after")
    if kb != ka:
        name = {"bench": "a bench directory", "recording": "recordings"}
        raise UsageError(f"cannot compare {name[kb]} (before) with {name[ka]} (after)",
                         "pass two bench directories, or two recordings (or directories of recordings)")
    return kb


def _attach_modes(meta: dict) -> str:
    """The attach mode(s) of a recording, from its probe plan (e.g. "fentry", "kprobe+tracepoint")."""
    plan = meta.get("probe_plan") or {}
    modes = sorted({str(o.get("attach")) for o in plan.get("ops") or () if isinstance(o, dict)
                    and o.get("attach") not in (None, "", "none")})
    return "+".join(modes) if modes else "unknown"


def describe(recs: Sequence[Recording], path: str = "") -> dict:
    """What one side is: label, kernel, host, attach mode (values joined when runs differ), its
    kind, how many runs, and every warning of its recordings (one line each, with the run)."""
    def uniq(vals):
        vals = [v for v in dict.fromkeys(str(v) for v in vals) if v]
        return ", ".join(vals) if vals else "?"

    bench = {r.bench.get("bench_dir") for r in recs if r.bench}
    if bench:
        label = uniq([os.path.basename(os.path.normpath(d)) for d in sorted(bench)])
    elif path and len(recs) > 1:  # a directory of recordings: its name, not every run's
        label = os.path.basename(os.path.normpath(path)) or path
    else:
        label = uniq(r.source for r in recs)
    warnings = [{"source": r.source, "path": r.path, "warning": str(w)} for r in recs for w in (r.warnings or [])]
    return {"label": label, "kernel": uniq(r.meta.get("kernel", "") for r in recs),
            "host": uniq(r.meta.get("host", "") for r in recs), "attach": uniq(_attach_modes(r.meta) for r in recs),
            "path": path, "kind": "bench" if bench else "recording", "runs": len(recs), "warnings": warnings}


def to_json(df: pd.DataFrame, before: dict, after: dict, status: int, accept_warnings: bool) -> dict:
    """The document of docs/compare.schema.json."""
    from .. import __version__

    def num(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

    rows = []
    for r in df.to_dict("records"):
        est, ci = fmt_ratio_ci(r["ratio"], r["ci_lo"], r["ci_hi"])
        rows.append({
            "kind": r["kind"], "scenario": r["scenario"], "slots": int(r["slots"]) if r["slots"] >= 0 else None,
            "op": r["op"], "lat_provenance": r["lat_provenance"], "metric": r["metric"], "unit": r["unit"],
            "runs_before": int(r["runs_before"]), "runs_after": int(r["runs_after"]),
            "n_before": int(r["n_before"]), "n_after": int(r["n_after"]),
            "values_before": [num(x) for x in r["values_before"]], "values_after": [num(x) for x in r["values_after"]],
            "before": num(r["before"]), "after": num(r["after"]), "ratio": num(r["ratio"]),
            "ci_lo": num(r["ci_lo"]), "ci_hi": num(r["ci_hi"]), "ratio_text": f"{est} {ci}".strip(),
            "spread_before": num(r["spread_before"]), "spread_after": num(r["spread_after"]),
            "verdict": r["verdict"], "runs_needed": None if r["runs_needed"] is None or r["runs_needed"] != r["runs_needed"]
            else int(r["runs_needed"]), "note": r["note"], "source": r["source"] or "", "line": r["line"],
        })
    return {"format": "kvmtrace-compare", "format_version": 1, "kvmtrace_version": __version__,
            "method": METHOD, "family_confidence": CONFIDENCE,
            "confidence": float(df.attrs.get("confidence", CONFIDENCE)), "rows_tested": int(df.attrs.get("rows_tested", 0)),
            "min_effect": float(df.attrs.get("min_effect", MIN_EFFECT)),
            "exit_status": status, "accept_warnings": bool(accept_warnings), "summary": summary(df),
            "sides": {"before": before, "after": after}, "rows": rows}


# ----------------------------------------------------------------------------- bench matrix


def is_bench(df: pd.DataFrame) -> bool:
    return bool((df["scenario"] != "").any() or (df["slots"] >= 0).any()) if not df.empty else False


def short_verdict(row) -> str:
    """A verdict for one cell: "regression 1.28x", "improvement 0.45x", "same", "inconclusive"."""
    v = row["verdict"] if isinstance(row, dict) else row.verdict
    if v in ("regression", "improvement"):
        r = row["ratio"] if isinstance(row, dict) else row.ratio
        return f"{v} {fmt_ratio_ci(r, math.nan, math.nan)[0]}"
    return str(v)


def bench_matrix(df: pd.DataFrame) -> Tuple[List[int], List[dict]]:
    """The upstream series' table shape: rows = scenario x what (time/iter, each op's p50 and p99
    latency, slots visited, slots scanned), columns = memslot counts; every cell holds the
    (before, after) figures (geometric means over runs; NaN where a side has none) and its verdict."""
    d = df[df["slots"] >= 0]
    slots = sorted(int(x) for x in d["slots"].unique())
    out: List[dict] = []
    order = {"iteration": 0, "hva": 1, "memslot": 2}
    keys = sorted({(r.scenario, order[r.kind], r.kind, r.op, r.lat_provenance, METRIC_ORDER[r.metric], r.metric)
                   for r in d.itertuples()})
    for scen, _, kind, op, lprov, _, metric in keys:
        part = d[(d["scenario"] == scen) & (d["kind"] == kind) & (d["op"] == op) & (d["lat_provenance"] == lprov)
                 & (d["metric"] == metric)]
        by = {int(r.slots): r for r in part.itertuples()}
        if kind == "iteration":
            what = "time/iter"
        else:
            what = f"{'memslot ' if kind == 'memslot' else ''}{op} {metric}"
            if len(set(d[(d["scenario"] == scen) & (d["op"] == op) & (d["kind"] == kind)]["lat_provenance"])) > 1:
                what += f" ({lprov})"
        unit = part["unit"].iloc[0]
        out.append({"scenario": scen, "what": what, "unit": unit,
                    "cells": {n: (by[n].before, by[n].after) if n in by else (math.nan, math.nan) for n in slots},
                    "verdicts": {n: short_verdict(by[n]) if n in by else "" for n in slots}})
    return slots, out
