"""Before/after comparison of two sets of recordings (or bench directories): one row per
hva op / memslot change type (x scenario x slot count for bench runs) with

* median and p99 of latency on each side and their ratio (after / before) with a confidence
  interval. CI method (distribution-free, conservative): each side's quantile gets an
  order-statistic interval at confidence sqrt(0.95) (binomial ranks, normal approximation), and
  the ratio interval is [lo_after / hi_before, hi_after / lo_before], which covers the true
  ratio with probability >= 95 % since the sides are independent. With histograms only, the
  same ranks are read off the log2 histogram (linear interpolation within the bucket).
* a significance test (scipy): Mann-Whitney U, two-sided, on the raw event latencies when both
  sides recorded a raw event for every operation; otherwise on the log2 bucket indices of the
  in-kernel histograms (ties corrected; a coarser test that can miss shifts inside one bucket).
  The ``test`` column says which. p-values are per row, not corrected for multiple rows.
* slots visited and slots scanned means and their ratio;
* a verdict: "<op>: 2.30x faster, significant (p=...)", "... noise (...)", and explicit lines
  for rows that cannot be compared (missing on one side, different provenance). Nothing is
  dropped: every key of either side gets a row.

Bench runs add one ``iteration`` row per scenario x slots: the workload's time per iteration
(avg; best shown alongside); tested with Mann-Whitney only when the workload JSON lists every
iteration's time (``iter_times_s``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..consts import LOG2_BUCKETS
from ..snapshot import Log2Hist
from . import tables as T
from .recording import Recording
from .report import EVENT_SOURCE, HIST_SOURCE

ALPHA = 0.05
MIN_EFFECT = 0.02  # significant changes smaller than 2 % are called negligible
SIDE_CONF = math.sqrt(0.95)
CI_METHOD = "order-statistic CI per side at sqrt(0.95), combined as ratio bounds (>=95%)"


@dataclass
class Side:
    """Everything one side knows about one comparison key."""

    count: int = 0
    lat_count: int = 0
    lat_sum: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_BUCKETS, dtype=np.int64))
    values: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # raw latencies as (values, counts)
    events_complete: bool = True
    slots_count: int = 0
    slots_sum: int = 0
    scanned_sum: Optional[int] = None
    iter_avg: List[float] = field(default_factory=list)
    iter_best: List[float] = field(default_factory=list)
    iter_all: List[float] = field(default_factory=list)
    iter_all_complete: bool = True
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


def collect(recs: Sequence[Recording]) -> Dict[tuple, Side]:
    """Recordings -> {(kind, scenario, slots, name, lat_provenance): Side}."""
    out: Dict[tuple, Side] = {}
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
                key = (kind, scen, nslots, name, lprov)
                s = out.setdefault(key, Side())
                cnt = int(part["count"].sum())
                s.count += cnt
                lat_count = int(part["lat_count"].sum()) if "lat_count" in part else int(part[T.LAT_B].to_numpy().sum())
                s.lat_count += lat_count
                s.lat_sum += int(part["lat_sum_ns"].sum())
                s.hist += T.hist_sum(part, T.LAT_B)
                if kind == "hva":
                    s.slots_count += int(part["slots_count"].sum())
                    s.slots_sum += int(part["slots_sum"].sum())
                    s.slots_provenance = str(part["slots_provenance"].iloc[0])
                    sc = part["scanned_sum"].sum(min_count=1)
                    if not pd.isna(sc):
                        s.scanned_sum = (s.scanned_sum or 0) + int(sc)
                if has_ev and not vc.empty:
                    sel = ((vc[name_col] == name) & (vc["lat_provenance"] == lprov)).to_numpy()
                    v, c = vc["v"].to_numpy(np.int64)[sel], vc["c"].to_numpy(np.int64)[sel]
                    if int(c.sum()) != cnt or (v < 0).any():
                        s.events_complete = False
                    else:
                        s.values.append((v, c))
                else:
                    s.events_complete = False
        if r.bench:
            wl = r.bench.get("workload") or {}
            key = ("iteration", scen, nslots, "time/iter", "workload")
            s = out.setdefault(key, Side())
            if wl.get("iter_avg_s") is not None:
                s.iter_avg.append(float(wl["iter_avg_s"]))
            if wl.get("iter_best_s") is not None:
                s.iter_best.append(float(wl["iter_best_s"]))
            its = wl.get("iter_times_s", wl.get("iter_s"))
            if isinstance(its, list) and its:
                s.iter_all.extend(float(x) for x in its)
            else:
                s.iter_all_complete = False
            s.count += int(wl.get("iterations") or r.bench.get("iterations") or 0)
    return out


def _ranks(n: int, q: float, conf: float) -> Tuple[float, float]:
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + conf / 2))
    half = z * math.sqrt(n * q * (1 - q))
    return max(0.0, n * q - half), min(float(n), n * q + half)


def quantile_ci_values(v: np.ndarray, q: float, conf: float = SIDE_CONF) -> Tuple[float, float, float]:
    """Exact quantile (numpy linear) of raw values, with an order-statistic interval."""
    n = len(v)
    if n == 0:
        return (math.nan,) * 3
    s = np.sort(v)
    est = float(np.quantile(s, q))
    lo_r, hi_r = _ranks(n, q, conf)
    lo = float(s[max(0, int(math.floor(lo_r)) - 1)])
    hi = float(s[min(n - 1, int(math.ceil(hi_r)))])
    return est, min(lo, est), max(hi, est)


def quantile_ci_counts(v: np.ndarray, c: np.ndarray, q: float, conf: float = SIDE_CONF) -> Tuple[float, float, float]:
    """``quantile_ci_values`` of the multiset {v[i] x c[i]} (v sorted, distinct), without
    expanding it: the same figures, bit for bit."""
    from . import engine as E

    n = int(c.sum())
    if n == 0:
        return (math.nan,) * 3
    est = float(E.quantiles_from_counts(v, c, [q], percent=False)[0])
    lo_r, hi_r = _ranks(n, q, conf)
    lo = float(E.order_stat(v, c, max(0, int(math.floor(lo_r)) - 1)))
    hi = float(E.order_stat(v, c, min(n - 1, int(math.ceil(hi_r)))))
    return est, min(lo, est), max(hi, est)


MWU_EXPAND_MAX = 2_000_000  # up to this many values, scipy runs on the values themselves


def _mwu_counts(vx: np.ndarray, cx: np.ndarray, vy: np.ndarray, cy: np.ndarray) -> float:
    """``_mwu`` from value counts: scipy on the values while they are few (its exact method for
    tiny samples included), else the same asymptotic formulas over the counts (engine)."""
    from . import engine as E

    if int(cx.sum()) + int(cy.sum()) <= MWU_EXPAND_MAX:
        return _mwu(np.repeat(vx, cx), np.repeat(vy, cy))
    if len(vx) == 1 and len(vy) == 1 and vx[0] == vy[0]:
        return 1.0
    return E.mwu_pvalue(vx, cx, vy, cy)


def quantile_ci_hist(counts: np.ndarray, q: float, conf: float = SIDE_CONF) -> Tuple[float, float, float]:
    """Histogram quantile (linear within bucket) with the same order-statistic ranks read off
    the histogram."""
    h = Log2Hist.from_counts([int(c) for c in counts])
    n = h.total
    if n == 0:
        return (math.nan,) * 3
    lo_r, hi_r = _ranks(n, q, conf)
    est = h.quantile(q)
    lo = h.quantile(lo_r / n) if lo_r > 0 else float(h.nonzero()[0][0])
    hi = h.quantile(hi_r / n)
    return float(est), float(min(lo, est)), float(max(hi, est))


def _ratio(a: float, b: float) -> float:
    if b is None or a is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def _mwu(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return math.nan
    if np.all(x == x[0]) and np.all(y == x[0]):
        return 1.0
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-300 else "<1e-300"


def verdict(name: str, ratio: float, p: Optional[float], note: str = "") -> str:
    """One line: "<name>: 2.30x faster, significant (p=1e-09)" / "...: noise (1.01x slower, p=0.4)"."""
    if ratio is None or math.isnan(ratio):
        return f"{name}: not compared ({note or 'no latency on one side'})"
    if ratio <= 0:
        return f"{name}: not compared (zero median)"
    change = _change(ratio, "1.00x (same)")
    if p is None or math.isnan(p):
        return f"{name}: {change}, not tested ({note or 'no samples for a test'})"
    if p < ALPHA and abs(math.log(ratio)) >= math.log(1 + MIN_EFFECT):
        return f"{name}: {change}, significant ({_p_is(p)})"
    if p < ALPHA:
        return f"{name}: {change}, significant but below {MIN_EFFECT:.0%} (negligible, {_p_is(p)})"
    return f"{name}: noise ({change}, {_p_is(p)})"


def _change(ratio: float, same: str) -> str:
    if abs(ratio - 1) < 1e-12:
        return same
    return f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"


def _p_is(p: float) -> str:
    t = _fmt_p(p)
    return "p" + t if t.startswith("<") else "p=" + t


def short_verdict(ratio: float, p: Optional[float], compared: bool = True) -> str:
    """A verdict for one cell: "2.22x faster", "1.30x slower", "same (<2%)", "noise",
    "1.02x faster?" (not tested), "n/c" (not compared)."""
    if not compared or ratio is None or math.isnan(ratio) or ratio <= 0:
        return "n/c"
    change = _change(ratio, "same")
    if p is None or math.isnan(p):
        return change + "?"
    if p >= ALPHA:
        return "noise"
    if abs(math.log(ratio)) < math.log(1 + MIN_EFFECT):
        return f"same (<{MIN_EFFECT:.0%})"
    return change


COLUMNS = [
    "kind", "scenario", "slots", "op", "lat_provenance", "n_before", "n_after",
    "median_before", "median_after", "median_ratio", "median_ratio_ci_lo", "median_ratio_ci_hi",
    "p99_before", "p99_after", "p99_ratio", "p99_ratio_ci_lo", "p99_ratio_ci_hi",
    "best_before", "best_after", "best_ratio", "unit", "latency_source", "ci_method", "test", "p_value",
    "slots_mean_before", "slots_mean_after", "slots_ratio", "scanned_mean_before", "scanned_mean_after",
    "scanned_ratio", "slots_provenance", "verdict",
]


def _label(kind, scen, nslots, name) -> str:
    base = name if kind != "memslot" else f"memslot {name}"
    if scen or nslots >= 0:
        return f"{base} [{scen}, {nslots} slots]"
    return base


def _side_figures(s: Side, kind: str, raw: bool) -> dict:
    """One side's own figures (median, p99 with their intervals; slots visited / scanned means),
    computed whether or not the other side has the key: a value that exists is never hidden."""
    if raw:
        from . import engine as E

        v, c = E.merge_counts(s.values)
        med = quantile_ci_counts(v, c, 0.5)
        p99 = quantile_ci_counts(v, c, 0.99)
        n = int(c.sum())
    else:
        med = quantile_ci_hist(s.hist, 0.5)
        p99 = quantile_ci_hist(s.hist, 0.99)
        n = int(s.hist.sum())
    out = {"med": med, "p99": p99, "n_lat": n, "src": EVENT_SOURCE if raw else HIST_SOURCE}
    if kind == "hva":
        out["slots"] = _ratio(s.slots_sum, s.slots_count)
        out["scanned"] = _ratio(s.scanned_sum, s.slots_count or s.count) if s.scanned_sum is not None else math.nan
    return out


def _iter_figures(s: Side) -> dict:
    return {"avg": float(np.mean(s.iter_avg)) if s.iter_avg else math.nan,
            "best": float(np.min(s.iter_best)) if s.iter_best else math.nan}


def compare(before: Sequence[Recording], after: Sequence[Recording]) -> pd.DataFrame:
    """The comparison table (COLUMNS), one row per key of either side. A key present on one side
    only keeps that side's figures (the other side's are NaN) and a "not compared" verdict."""
    B, A = collect(before), collect(after)
    keys = sorted(set(B) | set(A), key=lambda k: (k[1], k[2], {"iteration": 0, "hva": 1, "memslot": 2}[k[0]], k[3], k[4]))
    rows = []
    for key in keys:
        kind, scen, nslots, name, lprov = key
        label = _label(kind, scen, nslots, name)
        row = dict.fromkeys(COLUMNS, math.nan)
        row.update(kind=kind, scenario=scen, slots=nslots, op=name, lat_provenance=lprov, ci_method="", test="",
                   latency_source="", unit="ns", slots_provenance="")
        b, a = B.get(key), A.get(key)
        row.update(n_before=b.count if b else 0, n_after=a.count if a else 0)
        if kind == "iteration":
            fb = _iter_figures(b) if b else {"avg": math.nan, "best": math.nan}
            fa = _iter_figures(a) if a else {"avg": math.nan, "best": math.nan}
            mb, ma, bb, ba = fb["avg"], fa["avg"], fb["best"], fa["best"]
            row.update(median_before=mb, median_after=ma, best_before=bb, best_after=ba, unit="s",
                       latency_source="workload JSON (iter_avg_s, iter_best_s)")
            if b is None or a is None:
                row["verdict"] = f"{label} time/iter: not compared (no run in {'before' if b is None else 'after'})"
                rows.append(row)
                continue
            p = math.nan
            test, note = "", "workload JSON has no per-iteration times"
            if b.iter_all_complete and a.iter_all_complete and len(b.iter_all) > 1 and len(a.iter_all) > 1:
                p = _mwu(np.array(b.iter_all), np.array(a.iter_all))
                test = "Mann-Whitney U on per-iteration times (workload JSON iter_times_s)"
            r = _ratio(ma, mb)
            row.update(median_ratio=r, best_ratio=_ratio(ba, bb), test=test, p_value=p,
                       verdict=verdict(label, r, p, note))
            rows.append(row)
            continue
        raw = bool(b and a and b.events_complete and a.events_complete and b.values and a.values)
        if b is None or a is None:
            one = b or a
            f = _side_figures(one, kind, bool(one.events_complete and one.values))
            side = "before" if b is not None else "after"
            row.update({f"median_{side}": f["med"][0], f"p99_{side}": f["p99"][0], "latency_source": f["src"]})
            if kind == "hva":
                row.update({f"slots_mean_{side}": f["slots"], f"scanned_mean_{side}": f["scanned"],
                            "slots_provenance": one.slots_provenance})
            other = [k for k in (B if b is None else A) if k[:4] == key[:4]]
            missing = "before" if b is None else "after"
            if other:
                note = f"provenance differs: {lprov} on one side, {other[0][4]} on the other; not comparable"
            else:
                note = f"no {name} in {missing}"
            row["verdict"] = f"{label}: not compared ({note})"
            rows.append(row)
            continue
        fb, fa = _side_figures(b, kind, raw), _side_figures(a, kind, raw)
        (med_b, med_b_lo, med_b_hi), (med_a, med_a_lo, med_a_hi) = fb["med"], fa["med"]
        (p99_b, p99_b_lo, p99_b_hi), (p99_a, p99_a_lo, p99_a_hi) = fb["p99"], fa["p99"]
        nb, na = fb["n_lat"], fa["n_lat"]
        if raw:
            from . import engine as E

            (vb, cb), (va, ca) = E.merge_counts(b.values), E.merge_counts(a.values)
            p = _mwu_counts(vb, cb, va, ca)
            test = "Mann-Whitney U on raw event latencies (two-sided)"
        else:
            idx = np.arange(LOG2_BUCKETS)
            p = _mwu(np.repeat(idx, b.hist), np.repeat(idx, a.hist))
            test = "Mann-Whitney U on log2 bucket indices (histograms only; ties corrected; two-sided)"
        r = _ratio(med_a, med_b)
        row.update(
            median_before=med_b, median_after=med_a, median_ratio=r,
            median_ratio_ci_lo=_ratio(med_a_lo, med_b_hi), median_ratio_ci_hi=_ratio(med_a_hi, med_b_lo),
            p99_before=p99_b, p99_after=p99_a, p99_ratio=_ratio(p99_a, p99_b),
            p99_ratio_ci_lo=_ratio(p99_a_lo, p99_b_hi), p99_ratio_ci_hi=_ratio(p99_a_hi, p99_b_lo),
            latency_source=fb["src"], ci_method=CI_METHOD, test=test, p_value=p,
        )
        if lprov == "none" or nb == 0 or na == 0:
            row.update(test="", p_value=math.nan, ci_method="")
            p = math.nan
        if kind == "hva":
            sb, sa, cb, ca = fb["slots"], fa["slots"], fb["scanned"], fa["scanned"]
            row.update(slots_mean_before=sb, slots_mean_after=sa, slots_ratio=_ratio(sa, sb),
                       scanned_mean_before=cb, scanned_mean_after=ca, scanned_ratio=_ratio(ca, cb),
                       slots_provenance=b.slots_provenance if b.slots_provenance == a.slots_provenance
                       else f"{b.slots_provenance} -> {a.slots_provenance}")
        note = "no latency figure (provenance none)" if lprov == "none" else ""
        row["verdict"] = verdict(label, r, p, note)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    # latency histograms per side and key, for plots (kept out of the table's columns)
    hists = []
    for side, sides in (("before", B), ("after", A)):
        for (kind, scen, nslots, name, lprov), s in sides.items():
            if kind != "iteration" and s.hist.sum():
                hists.append([side, kind, scen, nslots, name, lprov] + [int(x) for x in s.hist])
    df.attrs["latency_hists"] = pd.DataFrame(hists, columns=["side", "kind", "scenario", "slots", "op", "lat_provenance"]
                                             + list(T.LAT_B))
    return df


def _attach_modes(meta: dict) -> str:
    """The attach mode(s) of a recording, from its probe plan (e.g. "fentry", "kprobe+tracepoint")."""
    plan = meta.get("probe_plan") or {}
    modes = sorted({str(o.get("attach")) for o in plan.get("ops") or () if isinstance(o, dict)
                    and o.get("attach") not in (None, "", "none")})
    return "+".join(modes) if modes else "unknown"


def describe(recs: Sequence[Recording], path: str = "") -> Dict[str, str]:
    """What one side is: label, kernel, host and attach mode (values joined when runs differ)."""
    def uniq(vals):
        vals = [v for v in dict.fromkeys(str(v) for v in vals) if v]
        return ", ".join(vals) if vals else "?"

    bench = {r.bench.get("bench_dir") for r in recs if r.bench}
    label = uniq([os.path.basename(os.path.normpath(d)) for d in sorted(bench)]) if bench else uniq(r.source for r in recs)
    return {"label": label, "kernel": uniq(r.meta.get("kernel", "") for r in recs),
            "host": uniq(r.meta.get("host", "") for r in recs), "attach": uniq(_attach_modes(r.meta) for r in recs),
            "path": path}


def is_bench(df: pd.DataFrame) -> bool:
    return bool((df["scenario"] != "").any() or (df["slots"] >= 0).any()) if not df.empty else False


def bench_matrix(df: pd.DataFrame) -> Tuple[List[int], List[dict]]:
    """The upstream series' table shape: rows = scenario x what (time/iter, each op's p50 and p99
    latency, slots visited, slots scanned where either side has it), columns = memslot counts; every cell holds
    (before, after) figures (NaN where a side has none); p50 and time/iter rows carry a short
    verdict per cell."""
    d = df[df["slots"] >= 0]
    slots = sorted(int(x) for x in d["slots"].unique())
    out: List[dict] = []
    order = {"iteration": 0, "hva": 1, "memslot": 2}
    keys = sorted({(r.scenario, order[r.kind], r.kind, r.op, r.lat_provenance) for r in d.itertuples()})
    for scen, _, kind, op, lprov in keys:
        part = d[(d["scenario"] == scen) & (d["kind"] == kind) & (d["op"] == op) & (d["lat_provenance"] == lprov)]
        by = {int(r.slots): r for r in part.itertuples()}
        what = "time/iter" if kind == "iteration" else (f"memslot {op}" if kind == "memslot" else op) + " p50"
        multi_prov = len(set(df[(df["scenario"] == scen) & (df["op"] == op) & (df["kind"] == kind)]["lat_provenance"])) > 1
        if multi_prov and kind != "iteration":
            what += f" ({lprov})"
        unit = "s" if kind == "iteration" else "ns"
        out.append({"scenario": scen, "what": what, "unit": unit,
                    "cells": {n: (by[n].median_before, by[n].median_after) if n in by else (math.nan, math.nan) for n in slots},
                    "verdicts": {n: short_verdict(by[n].median_ratio, by[n].p_value, by[n].n_before > 0 and by[n].n_after > 0)
                                 if n in by else "" for n in slots}})
        if kind != "iteration":
            out.append({"scenario": scen, "what": what.replace(" p50", " p99"), "unit": unit, "verdicts": None,
                        "cells": {n: (by[n].p99_before, by[n].p99_after) if n in by else (math.nan, math.nan) for n in slots}})
        if kind == "hva":
            out.append({"scenario": scen, "what": f"{op} visited", "unit": "", "verdicts": None,
                        "cells": {n: (by[n].slots_mean_before, by[n].slots_mean_after) if n in by else (math.nan, math.nan)
                                  for n in slots}})
        if kind == "hva" and (part["scanned_mean_before"].notna().any() or part["scanned_mean_after"].notna().any()):
            out.append({"scenario": scen, "what": f"{op} scanned", "unit": "",
                        "cells": {n: (by[n].scanned_mean_before, by[n].scanned_mean_after) if n in by else (math.nan, math.nan)
                                  for n in slots}, "verdicts": None})
    return slots, out
