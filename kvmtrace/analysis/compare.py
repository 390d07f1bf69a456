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
    if abs(ratio - 1) < 1e-12:
        change = "1.00x (same)"
    elif ratio < 1:
        change = f"{1 / ratio:.2f}x faster"
    else:
        change = f"{ratio:.2f}x slower"
    if p is None or math.isnan(p):
        return f"{name}: {change}, not tested ({note or 'no samples for a test'})"
    if p < ALPHA and abs(math.log(ratio)) >= math.log(1 + MIN_EFFECT):
        return f"{name}: {change}, significant (p={_fmt_p(p)})"
    if p < ALPHA:
        return f"{name}: {change}, significant but below {MIN_EFFECT:.0%} (negligible, p={_fmt_p(p)})"
    return f"{name}: noise ({change}, p={_fmt_p(p)})"


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


def compare(before: Sequence[Recording], after: Sequence[Recording]) -> pd.DataFrame:
    """The comparison table (COLUMNS), one row per key of either side."""
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
        if b is None or a is None:
            missing = "before" if b is None else "after"
            other = [k for k in (B if b is None else A) if k[:4] == key[:4]]
            if other:
                note = f"provenance differs: {lprov} on one side, {other[0][4]} on the other; not comparable"
            else:
                note = f"no {name} in {missing}"
            row.update(n_before=b.count if b else 0, n_after=a.count if a else 0, verdict=f"{label}: not compared ({note})")
            rows.append(row)
            continue
        row.update(n_before=b.count, n_after=a.count)
        if kind == "iteration":
            mb = float(np.mean(b.iter_avg)) if b.iter_avg else math.nan
            ma = float(np.mean(a.iter_avg)) if a.iter_avg else math.nan
            bb = float(np.min(b.iter_best)) if b.iter_best else math.nan
            ba = float(np.min(a.iter_best)) if a.iter_best else math.nan
            p = math.nan
            test, note = "", "workload JSON has avg/best only, no per-iteration times"
            if b.iter_all_complete and a.iter_all_complete and len(b.iter_all) > 1 and len(a.iter_all) > 1:
                p = _mwu(np.array(b.iter_all), np.array(a.iter_all))
                test = "Mann-Whitney U on per-iteration times (workload JSON iter_times_s)"
            r = _ratio(ma, mb)
            row.update(median_before=mb, median_after=ma, median_ratio=r, best_before=bb, best_after=ba,
                       best_ratio=_ratio(ba, bb), unit="s", latency_source="workload JSON (iter_avg_s, iter_best_s)",
                       test=test, p_value=p, verdict=verdict(label + " time/iter", r, p, note))
            rows.append(row)
            continue
        raw = b.events_complete and a.events_complete and b.values and a.values
        if raw:
            from . import engine as E

            (vb, cb), (va, ca) = E.merge_counts(b.values), E.merge_counts(a.values)
            med_b, med_b_lo, med_b_hi = quantile_ci_counts(vb, cb, 0.5)
            med_a, med_a_lo, med_a_hi = quantile_ci_counts(va, ca, 0.5)
            p99_b, p99_b_lo, p99_b_hi = quantile_ci_counts(vb, cb, 0.99)
            p99_a, p99_a_lo, p99_a_hi = quantile_ci_counts(va, ca, 0.99)
            p = _mwu_counts(vb, cb, va, ca)
            test = "Mann-Whitney U on raw event latencies (two-sided)"
            src = EVENT_SOURCE
            nb, na = int(cb.sum()), int(ca.sum())
        else:
            med_b, med_b_lo, med_b_hi = quantile_ci_hist(b.hist, 0.5)
            med_a, med_a_lo, med_a_hi = quantile_ci_hist(a.hist, 0.5)
            p99_b, p99_b_lo, p99_b_hi = quantile_ci_hist(b.hist, 0.99)
            p99_a, p99_a_lo, p99_a_hi = quantile_ci_hist(a.hist, 0.99)
            idx = np.arange(LOG2_BUCKETS)
            xb, xa = np.repeat(idx, b.hist), np.repeat(idx, a.hist)
            p = _mwu(xb, xa)
            test = "Mann-Whitney U on log2 bucket indices (histograms only; ties corrected; two-sided)"
            src = HIST_SOURCE
            nb, na = int(b.hist.sum()), int(a.hist.sum())
        r = _ratio(med_a, med_b)
        row.update(
            median_before=med_b, median_after=med_a, median_ratio=r,
            median_ratio_ci_lo=_ratio(med_a_lo, med_b_hi), median_ratio_ci_hi=_ratio(med_a_hi, med_b_lo),
            p99_before=p99_b, p99_after=p99_a, p99_ratio=_ratio(p99_a, p99_b),
            p99_ratio_ci_lo=_ratio(p99_a_lo, p99_b_hi), p99_ratio_ci_hi=_ratio(p99_a_hi, p99_b_lo),
            latency_source=src, ci_method=CI_METHOD, test=test, p_value=p,
        )
        if lprov == "none" or nb == 0 or na == 0:
            row.update(test="", p_value=math.nan, ci_method="")
            p = math.nan
        if kind == "hva":
            sb, sa = _ratio(b.slots_sum, b.slots_count), _ratio(a.slots_sum, a.slots_count)
            cb = _ratio(b.scanned_sum, b.slots_count or b.count) if b.scanned_sum is not None else math.nan
            ca = _ratio(a.scanned_sum, a.slots_count or a.count) if a.scanned_sum is not None else math.nan
            row.update(slots_mean_before=sb, slots_mean_after=sa, slots_ratio=_ratio(sa, sb),
                       scanned_mean_before=cb, scanned_mean_after=ca, scanned_ratio=_ratio(ca, cb),
                       slots_provenance=b.slots_provenance if b.slots_provenance == a.slots_provenance
                       else f"{b.slots_provenance} -> {a.slots_provenance}")
        note = "no latency figure (provenance none)" if lprov == "none" else ""
        row["verdict"] = verdict(label, r, p, note)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
