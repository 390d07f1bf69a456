"""What the HTML pages plot, as data: pure functions from recordings and report / compare tables
to figure specifications (``Figure`` -> ``Panel`` -> ``Series``), with their axis ranges and tick
labels decided here, so tests check the plots' data without drawing them. html.py draws them
with matplotlib; nothing here imports it.

The plots a kernel engineer reaches for:

* ``timelines``: per op, the rate and the p50 / p99 latency per interval of every VM (one
  series per recording and VM), from the per-interval rows a recording stores;
* ``latency_figures``: latency CDFs (log x) per op and per memslot change type, and the latency
  histograms (log y, so a single 171 ms operation shows); on compare pages before and after
  overlaid;
* ``vs_memslots``: latency (every percentile the recording stores, and the mean) and slots
  visited / scanned against the memslot count, per recording;
* ``compare_vs_memslots``: the same for two bench directories, before against after.

Colours: one per recording (or compare side, or bench directory) across every plot of a page
(``colour_map``); series of one recording in one panel differ by marker."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..consts import LOG2_BUCKETS
from ..snapshot import Log2Hist
from ..text import display
from . import engine as E
from . import tables as T
from .compare import _latency_counts
from .report import vm_label

# matplotlib's tab10 without its grey (grey reads as an axis, not as data)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
MAX_PANELS = 12  # per figure; more are left out and the figure's note says how many
MAX_SERIES = 12  # per panel (the busiest first)
CDF_POINTS = 2000  # an exact CDF with more distinct values is drawn through this many of them
NS_LABEL = "latency"


@dataclass
class Series:
    key: str  # colour key: the recording (report), the side (compare), the bench directory
    label: str  # legend text, already made printable (text.display)
    x: np.ndarray
    y: np.ndarray
    linestyle: str = "-"
    marker: str = ""
    drawstyle: str = "default"  # "steps-post": a histogram over bucket edges

    def __len__(self) -> int:
        return int(np.count_nonzero(np.isfinite(self.y) & np.isfinite(self.x)))


@dataclass
class Axis:
    label: str
    unit: str = ""  # "ns": latency ticks (1 µs, 10 µs ...); "count": integer ticks; "s"; "fraction"
    log: bool = False
    lim: Optional[Tuple[float, float]] = None


@dataclass
class Panel:
    title: str
    x: Axis
    y: Axis
    series: List[Series] = field(default_factory=list)


@dataclass
class Figure:
    title: str
    alt: str
    panels: List[Panel]
    note: str = ""
    ncols: int = 2

    @property
    def empty(self) -> bool:
        return not any(len(s) for p in self.panels for s in p.series)


# ----------------------------------------------------------------------------- axes and ticks


def colour_map(keys: Sequence[str]) -> Dict[str, str]:
    """One colour per key, in the order keys first appear (the order of a page's recordings)."""
    out: Dict[str, str] = {}
    for k in keys:
        if k not in out:
            out[k] = PALETTE[len(out) % len(PALETTE)]
    return out


def ns_tick(v: float) -> str:
    """A latency tick label: 1 ns, 10 ns, 100 ns, 1 µs, ... 1 ms, 1 s (never 7×10⁰)."""
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if v >= div:
            return f"{v / div:g} {unit}"
    return f"{v:g} ns"


def count_tick(v: float) -> str:
    """A count tick label: 1, 10, 100, 1,000, 10,000 (0.5 for a half)."""
    if v >= 1 and float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:g}"


def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def log_range(values, floor: float = 0.0) -> Optional[Tuple[float, float]]:
    """Limits of a log axis: whole decades around the positive values, with room at either end
    so no point sits on the frame (a constant series gets the decade it lies in, so at least two
    labelled ticks show); None without positive values."""
    a = _finite(values)
    a = a[a > floor] if floor else a[a > 0]
    if not len(a):
        return None
    lo = 10.0 ** math.floor(math.log10(a.min()))
    if a.min() < lo * 1.05:  # a point on a decade (10 memslots, 1 µs) does not sit on the frame
        lo /= 1.25
    hi = 10.0 ** math.ceil(math.log10(a.max() * 1.05))  # headroom: a maximum of 10 does not touch the top
    if hi <= lo:
        hi = lo * 10
    return lo, hi


def zero_range(values) -> Tuple[float, float]:
    """Limits of a linear axis of counts, rates or slots: from 0 to a margin above the largest
    value (a constant series of 1 gets 0-1.15, never 0.96-1.04); 0-1 when nothing is positive."""
    a = _finite(values)
    top = float(a.max()) if len(a) else 0.0
    return (0.0, top * 1.15) if top > 0 else (0.0, 1.0)


def _all(series: Sequence[Series], axis: str) -> list:
    return [v for s in series for v in (s.x if axis == "x" else s.y)]


def _finish(p: Panel) -> Panel:
    """Decide the panel's limits from its data (log: whole decades; counts: from 0)."""
    for name, ax in (("x", p.x), ("y", p.y)):
        if ax.lim is not None:
            continue
        vals = _all(p.series, name)
        if ax.log:
            ax.lim = log_range(vals)
        elif ax.unit in ("count", "rate"):
            ax.lim = zero_range(vals)
        elif ax.unit == "fraction":
            ax.lim = (0.0, 1.0)
    return p


def _cap_series(series: List[Series], weight: Dict[int, float]) -> Tuple[List[Series], int]:
    if len(series) <= MAX_SERIES:
        return series, 0
    order = sorted(range(len(series)), key=lambda i: -weight.get(i, 0))[:MAX_SERIES]
    return [series[i] for i in sorted(order)], len(series) - MAX_SERIES


def _cap_note(panels_left: int, series_left: int, what: str) -> str:
    parts = []
    if panels_left:
        parts.append(f"{panels_left} more panel{'s' if panels_left != 1 else ''} not drawn")
    if series_left:
        parts.append(f"{series_left} less busy {what} not drawn")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- timelines


TIMELINE_COLS = ["key", "source", "vm_id", "pid", "vm_label", "op", "lat_provenance", "interval", "t_s", "elapsed_s",
                 "count", "rate_per_s", "lat_p50_ns", "lat_p99_ns", "latency_source"]


def _vm_labels(r) -> Dict[Tuple[str, int], str]:
    out: Dict[Tuple[str, int], str] = {}
    for table in ("hva", "vms"):
        df = r[table]
        if df.empty:
            continue
        last = df.sort_values("interval").groupby(["vm_id", "pid"], sort=False).tail(1)
        for row in last.itertuples(index=False):
            out[(str(row.vm_id), int(row.pid))] = vm_label(row.name, row.comm, int(row.pid),
                                                          int(getattr(row, "ordinal", 0) or 0))
    return out


EVENT_SOURCE = "raw events"
HIST_SOURCE = "log2 histogram"


def interval_quantiles(recs) -> pd.DataFrame:
    """Exact latency p50 / p99 per recording (``rec``), VM, op and interval from the raw events
    (numpy's linear interpolation: DuckDB's quantile_cont, out of core), with ``n`` the events
    of the group (known latency or not), for the intervals whose events are complete."""
    key = ["rec", "vm_id", "pid", "op", "lat_provenance", "interval"]
    parts = []
    src = [(i, r.events["hva_events"]) for i, r in enumerate(recs) if "hva_events" in r.events]
    if src:
        con = E.connect()
        try:
            rel = E.union_sql(con, src, ["interval", "vm_id", "pid", "op", "lat_provenance", "latency_ns"])
            if rel:
                parts.append(E._query(con, f"""SELECT {", ".join(key)}, count(*) AS n,
                    quantile_cont(latency_ns, 0.5) FILTER (WHERE latency_ns >= 0) AS p50,
                    quantile_cont(latency_ns, 0.99) FILTER (WHERE latency_ns >= 0) AS p99
                    FROM ({rel}) GROUP BY ALL"""))
        finally:
            con.close()
    for i, r in enumerate(recs):  # event tables held in memory (recordings built by hand)
        if "hva_events" in r.events or "hva_events" not in r.tables or r.tables["hva_events"].empty:
            continue
        ev = r.tables["hva_events"].assign(rec=i)
        known = ev[ev["latency_ns"] >= 0]
        g = known.groupby(key, observed=True)["latency_ns"]
        q = pd.DataFrame({"p50": g.quantile(0.5), "p99": g.quantile(0.99)})
        q["n"] = ev.groupby(key, observed=True).size()
        parts.append(q.reset_index())
    if not parts:
        return pd.DataFrame(columns=key + ["n", "p50", "p99"])
    df = pd.concat(parts, ignore_index=True)
    for c in ("rec", "pid", "interval", "n"):
        df[c] = df[c].astype("int64")
    for c in ("vm_id", "op", "lat_provenance"):
        df[c] = df[c].astype(str)
    return df


def timeline(recs, keys: Optional[Sequence[str]] = None, events: bool = True) -> pd.DataFrame:
    """Per recording, VM, op and interval: the operations, their rate (count / the interval's
    length) and latency p50 / p99: exact from the raw events where the interval holds one for
    every operation (``latency_source`` "raw events"), else from the interval's in-kernel log2
    histogram (linear interpolation within the bucket, capped by the in-kernel maximum). An
    interval in which a VM ran no such op (no row is stored) counts 0 between the VM's first
    and last row; its latency is unknown (NaN). ``t_s``: the interval's end, seconds after the
    recording's first interval began. ``keys``: the colour key per recording (default: its
    source). ``events``: use raw events where complete."""
    exact = interval_quantiles(recs) if events else None
    ex = {}
    if exact is not None and not exact.empty:
        ex = {tuple(k): (n, p50, p99) for k, n, p50, p99 in zip(
            exact[["rec", "vm_id", "pid", "op", "lat_provenance", "interval"]].itertuples(index=False, name=None),
            exact["n"], exact["p50"], exact["p99"])}
    rows = []
    for i, r in enumerate(recs):
        hva, iv = r["hva"], r["intervals"]
        if hva.empty or iv.empty:
            continue
        key = keys[i] if keys is not None else r.source
        t0 = float(iv["t_start"].min())
        ivs = iv.sort_values("interval")[["interval", "t_end", "elapsed_s"]].to_numpy()
        labels = _vm_labels(r)
        h = hva.assign(vm_id=hva["vm_id"].astype(str), pid=hva["pid"].astype("int64"), op=hva["op"].astype(str),
                       lat_provenance=hva["lat_provenance"].astype(str))
        for (vm_id, pid, op, lp), g in h.groupby(["vm_id", "pid", "op", "lat_provenance"], sort=True):
            by_iv = g.groupby("interval", sort=True)
            cnt = by_iv["count"].sum()
            lat_n = by_iv["lat_count"].sum()
            lat_max = by_iv["lat_max_ns"].max()
            hist = by_iv[T.LAT_B].sum()
            first, last = int(cnt.index.min()), int(cnt.index.max())
            for n, t_end, el in ivs:
                n = int(n)
                if n < first or n > last:
                    continue
                c = int(cnt.get(n, 0))
                p50 = p99 = math.nan
                src = ""
                e = ex.get((i, vm_id, int(pid), op, lp, n))
                if c and lp != "none" and e is not None and int(e[0]) == c and not pd.isna(e[1]):
                    p50, p99, src = float(e[1]), float(e[2]), EVENT_SOURCE
                elif c and lp != "none" and int(lat_n.get(n, 0)) > 0:
                    qs = T.hist_quantiles(hist.loc[n].to_numpy(), (0.5, 0.99))
                    cap = float(lat_max.get(n, math.nan))
                    p50, p99 = (min(float(q), cap) if not math.isnan(cap) else float(q) for q in qs)
                    src = HIST_SOURCE
                rows.append([key, r.source, vm_id, int(pid), labels.get((vm_id, int(pid)), str(vm_id)), op, lp, n,
                             float(t_end) - t0, float(el), c, c / float(el) if el > 0 else math.nan, p50, p99, src])
    return pd.DataFrame(rows, columns=TIMELINE_COLS)


def timelines(tl: pd.DataFrame) -> List[Figure]:
    """One figure per op: operations per second per interval (left) and latency p50 (solid) /
    p99 (dashed) per interval (right), one series per recording and VM."""
    figs = []
    if tl is None or tl.empty:
        return figs
    for op, g in tl.groupby("op", sort=True):
        rate_s, lat_s, weight = [], [], {}
        for (key, src, vm_id, pid, label, lp), s in g.groupby(["key", "source", "vm_id", "pid", "vm_label",
                                                               "lat_provenance"], sort=False):
            s = s.sort_values("t_s")
            name = f"{display(src)}: {display(label)}" + (f" ({lp})" if lp != "exact" else "")
            weight[len(rate_s)] = float(s["count"].sum())
            rate_s.append(Series(key, name, s["t_s"].to_numpy(float), s["rate_per_s"].to_numpy(float), marker="o"))
            lat_s.append((Series(key, name, s["t_s"].to_numpy(float), s["lat_p50_ns"].to_numpy(float), marker="o"),
                          Series(key, name, s["t_s"].to_numpy(float), s["lat_p99_ns"].to_numpy(float), linestyle="--",
                                 marker="o")))
        kept, left = _cap_series(rate_s, weight)
        keep_idx = [rate_s.index(k) for k in kept]
        lat = [x for i in keep_idx for x in lat_s[i]]
        t = Axis("seconds since the recording started", "s", lim=zero_range(tl["t_s"]))
        rate = _finish(Panel(f"{op}: operations per second per interval", t, Axis("operations / s", "rate"), kept))
        latp = _finish(Panel(f"{op}: latency per interval, p50 solid, p99 dashed", Axis(t.label, "s", lim=t.lim),
                             Axis(NS_LABEL, "ns", log=True), lat))
        used = set(g["latency_source"]) - {""}
        how = {frozenset([EVENT_SOURCE]): "exact over the interval's raw events",
               frozenset([HIST_SOURCE]): "from the interval's in-kernel log2 histogram (linear interpolation within the "
                                         "bucket)"}.get(frozenset(used),
                                                        "exact over the interval's raw events where it holds one for "
                                                        "every operation, else from its in-kernel log2 histogram")
        note = f"per-interval p50/p99 {how}; an interval without operations has rate 0 and no latency point"
        cap = _cap_note(0, left, "VMs")
        figs.append(Figure(f"{op} per interval", f"timeline of {op}: rate and latency per interval", [rate, latp],
                           note + (f"; {cap}" if cap else "")))
    return figs


# ----------------------------------------------------------------------------- latency distributions


DIST_COLS = ["key", "label", "panel", "kind", "name", "lat_provenance", "n", "exact", "values", "counts", "hist"]


def latency_counts(recs) -> Dict[str, Optional[pd.DataFrame]]:
    """Raw-event latency value counts of every recording (the engine's one scan per table)."""
    return _latency_counts(recs)


def latency_dists(recs, key: Callable[[int, object], Tuple[str, str, str]],
                  counts: Optional[Dict[str, Optional[pd.DataFrame]]] = None) -> pd.DataFrame:
    """Latency distributions per op and per memslot change type, summed over the recordings that
    share a (colour key, legend label, panel) given by ``key(i, recording)``: the in-kernel log2
    histogram always (``hist``, 64 buckets), and the exact values (``values``, ``counts``) when
    every recording of the group holds a raw event for every operation (``exact``)."""
    counts = latency_counts(recs) if counts is None else counts
    acc: Dict[tuple, dict] = {}
    for i, r in enumerate(recs):
        ck, label, panel = key(i, r)
        for kind, table, col, ev in (("hva", "hva", "op", "hva_events"), ("memslot", "memslot", "change", "memslot_events")):
            df = r[table]
            if df.empty:
                continue
            vc = counts.get(ev)
            vc = vc[vc["rec"] == i] if vc is not None and not vc.empty else None
            g = df.assign(_n=df[col].astype(str), _p=df["lat_provenance"].astype(str)).groupby(["_n", "_p"], sort=True)
            for (name, lp), part in g:
                if lp == "none":
                    continue
                hist = T.hist_sum(part, T.LAT_B).astype(np.int64)
                n = int(hist.sum())
                if n == 0:
                    continue
                exact = None
                if vc is not None:
                    sel = ((vc[col] == name) & (vc["lat_provenance"] == lp)).to_numpy()
                    v, c = vc["v"].to_numpy(np.int64)[sel], vc["c"].to_numpy(np.int64)[sel]
                    if int(c.sum()) == int(part["count"].sum()) == n and not (v < 0).any():
                        exact = (v, c)
                a = acc.setdefault((panel, kind, name, lp, ck, label),
                                   {"hist": np.zeros(LOG2_BUCKETS, np.int64), "parts": [], "exact": True})
                a["hist"] += hist
                a["exact"] &= exact is not None
                if exact is not None:
                    a["parts"].append(exact)
    rows = []
    for (panel, kind, name, lp, ck, label), a in acc.items():
        v = c = None
        if a["exact"]:
            v, c = E.merge_counts(a["parts"])
        rows.append([ck, label, panel, kind, name, lp, int(a["hist"].sum()), bool(a["exact"]), v, c, a["hist"]])
    return pd.DataFrame(rows, columns=DIST_COLS)


def cdf_points(values: Optional[np.ndarray], counts: Optional[np.ndarray], hist: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, bool]:
    """(x in ns, fraction of operations <= x, exact). Exact values: the empirical CDF at every
    distinct value (at most CDF_POINTS of them, spread evenly). Otherwise the log2 histogram's
    CDF at the bucket bounds, where it is exact: the fraction of operations below 2^i."""
    if values is not None and counts is not None and len(values):
        cum = np.cumsum(counts) / float(np.sum(counts))
        x = np.maximum(values.astype(float), 1.0)  # a 0 ns latency sits at 1 ns on a log axis
        if len(x) > CDF_POINTS:
            idx = np.unique(np.linspace(0, len(x) - 1, CDF_POINTS).round().astype(int))
            x, cum = x[idx], cum[idx]
        return np.concatenate([[x[0]], x]), np.concatenate([[0.0], cum]), True  # from 0 at the smallest value
    h = np.asarray(hist, dtype=float)
    nz = np.nonzero(h)[0]
    if not len(nz):
        return np.zeros(0), np.zeros(0), False
    lo, hi = int(nz.min()), int(nz.max())
    cum = np.cumsum(h) / h.sum()
    # bucket i holds [2^(i-1), 2^i): below its lower bound lie the buckets before it
    xs = [float(Log2Hist.bucket_bounds(lo)[0]) if lo > 0 else 0.5]
    ys = [float(cum[lo - 1]) if lo > 0 else 0.0]
    for i in range(lo, hi + 1):
        xs.append(float(Log2Hist.bucket_bounds(i)[1]))
        ys.append(float(cum[i]))
    return np.maximum(np.array(xs), 0.5), np.array(ys), False


def hist_steps(hist: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A log2 histogram as steps over its bucket edges (x: bucket lower bounds in ns, and the
    last bucket's upper bound; y: operations per bucket, the last repeated for steps-post)."""
    h = np.asarray(hist, dtype=float)
    nz = np.nonzero(h)[0]
    if not len(nz):
        return np.zeros(0), np.zeros(0)
    lo, hi = max(1, int(nz.min())), int(nz.max())
    lo = min(lo, hi)
    edges = [float(Log2Hist.bucket_bounds(i)[0]) for i in range(lo, hi + 1)] + [float(Log2Hist.bucket_bounds(hi)[1])]
    ys = list(h[lo: hi + 1]) + [h[hi]]
    if int(nz.min()) == 0:  # operations of 0 ns: counted with the first bucket (a log axis has no 0)
        ys[0] += h[0]
    return np.array(edges), np.array(ys, dtype=float)


HIST_FLOOR = 0.5  # empty buckets sit here on the log axis (below one operation)


def _dist_title(kind: str, name: str, lp: str, panel: str) -> str:
    t = f"memslot {name}" if kind == "memslot" else name
    if lp != "exact":
        t += f" ({lp})"
    return f"{t} · {panel}" if panel else t


def latency_figures(d: pd.DataFrame) -> List[Figure]:
    """Two figures: latency CDFs (log x) and latency histograms (log y), one panel per op and
    memslot change type (and per ``panel``: a bench scenario and memslot count), one series per
    colour key and label. A CDF from a histogram (no complete raw events) is dashed with a
    marker at each bucket bound."""
    if d is None or d.empty:
        return []
    order = {"hva": 0, "memslot": 1}
    groups = sorted(d.groupby(["panel", "kind", "name", "lat_provenance"], sort=False),
                    key=lambda kv: (str(kv[0][0]), order.get(kv[0][1], 2), kv[0][2], kv[0][3]))
    left = max(0, len(groups) - MAX_PANELS)
    groups = groups[:MAX_PANELS]
    cdfs, hists, hidden = [], [], 0
    any_hist_cdf = False
    for (panel, kind, name, lp), g in groups:
        cs, hs, weight = [], [], {}
        for i, r in enumerate(g.itertuples(index=False)):
            x, y, exact = cdf_points(r.values, r.counts, r.hist)
            any_hist_cdf |= not exact
            lab = r.label + ("" if exact else " (histogram)")
            cs.append(Series(r.key, lab, x, y, linestyle="-" if exact else "--", marker="" if exact else "o",
                             drawstyle="steps-post" if exact else "default"))
            hx, hy = hist_steps(r.hist)
            hs.append(Series(r.key, r.label, hx, np.maximum(hy, HIST_FLOOR), drawstyle="steps-post"))
            weight[i] = float(r.n)
        cs, h1 = _cap_series(cs, weight)
        hs, _ = _cap_series(hs, weight)
        hidden += h1
        title = _dist_title(kind, name, lp, panel)
        cdfs.append(_finish(Panel(title, Axis(NS_LABEL, "ns", log=True), Axis("fraction of operations ≤ latency",
                                                                                "fraction"), cs)))
        hp = Panel(title, Axis(NS_LABEL + " (log2 buckets)", "ns", log=True), Axis("operations per bucket", "count", log=True),
                   hs)
        hp.y.lim = (HIST_FLOOR, (log_range(_all(hs, "y")) or (1.0, 10.0))[1])
        hists.append(_finish(hp))
    cap = _cap_note(left, hidden, "series")
    note_c = ("CDF over every operation's latency from raw events (exact)"
              + ("; dashed with markers: from the in-kernel log2 histogram, exact at the bucket bounds only"
                 if any_hist_cdf else ""))
    note_h = "operations per in-kernel log2 latency bucket, log scale: one operation in the tail shows"
    return [Figure("latency CDF per op and memslot change type", "latency CDFs", cdfs,
                   note_c + (f"; {cap}" if cap else ""), ncols=3 if len(cdfs) > 4 else 2),
            Figure("latency histogram per op and memslot change type", "latency histograms", hists,
                   note_h + (f"; {cap}" if cap else ""), ncols=3 if len(hists) > 4 else 2)]


SLOTS_COLS = ["key", "label", "panel", "op", "slots_provenance", "n", "hist"]


def slots_dists(recs, key: Callable[[int, object], Tuple[str, str, str]]) -> pd.DataFrame:
    """Memslots visited per hva operation: the in-kernel log2 histograms (``hist``, 64 buckets)
    per op, summed over the recordings that share a ``key(i, recording)`` (colour key, legend
    label, panel); operations whose slots were not observed (provenance none) are left out."""
    acc: Dict[tuple, np.ndarray] = {}
    for i, r in enumerate(recs):
        ck, label, panel = key(i, r)
        df = r["hva"]
        if df.empty:
            continue
        g = df.assign(_n=df["op"].astype(str), _p=df["slots_provenance"].astype(str)).groupby(["_n", "_p"], sort=True)
        for (op, sp), part in g:
            h = T.hist_sum(part, T.SLOTS_B).astype(np.int64)
            if sp == "none" or not h.sum():
                continue
            k = (panel, op, sp, ck, label)
            acc[k] = acc.get(k, np.zeros(LOG2_BUCKETS, np.int64)) + h
    rows = [[ck, label, panel, op, sp, int(h.sum()), h] for (panel, op, sp, ck, label), h in acc.items()]
    return pd.DataFrame(rows, columns=SLOTS_COLS)


def bucket_steps(hist: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A log2 histogram over its bucket indices (x: i - 0.5 for each bucket from the first to
    the last non-empty one, and the last + 0.5; y: count per bucket, the last repeated for
    steps-post)."""
    h = np.asarray(hist, dtype=float)
    nz = np.nonzero(h)[0]
    if not len(nz):
        return np.zeros(0), np.zeros(0)
    lo, hi = int(nz.min()), int(nz.max())
    return np.arange(lo, hi + 2) - 0.5, np.concatenate([h[lo: hi + 1], [h[hi]]])


def slots_figure(d: pd.DataFrame) -> Optional[Figure]:
    """Memslots visited per operation: one panel per op, operations per log2 bucket of the
    slots visited (x: the counts each bucket holds, 0, 1, 2-3, 4-7 ...), log y, one series
    per colour key and label."""
    if d is None or d.empty:
        return None
    panels = []
    groups = sorted(d.groupby(["panel", "op", "slots_provenance"], sort=False), key=lambda kv: tuple(map(str, kv[0])))
    left = max(0, len(groups) - MAX_PANELS)
    for (panel, op, sp), g in groups[:MAX_PANELS]:
        series = []
        for r in g.itertuples(index=False):
            x, y = bucket_steps(r.hist)
            series.append(Series(r.key, r.label, x, np.maximum(y, HIST_FLOOR), drawstyle="steps-post"))
        xs = _all(series, "x")
        title = (f"{op} ({sp})" if sp != "exact" else op) + (f" · {panel}" if panel else "")
        p = Panel(title, Axis("memslots visited (log2 buckets)", "bucket", lim=(min(xs) - 0.5, max(xs) + 0.5)),
                  Axis("operations per bucket", "count", log=True), series)
        p.y.lim = (HIST_FLOOR, (log_range(_all(series, "y")) or (1.0, 10.0))[1])
        panels.append(p)
    cap = _cap_note(left, 0, "")
    return Figure("memslots visited per operation", "memslots visited per operation", panels,
                  "operations per in-kernel log2 bucket of the memslots each visited, log scale"
                  + (f"; {cap}" if cap else ""), ncols=3 if len(panels) > 4 else 2)


# ----------------------------------------------------------------------------- against memslot count


def vs_memslots(bym: pd.DataFrame, groups: Optional[Dict[str, str]] = None,
                keys: Optional[Dict[str, str]] = None) -> Optional[Figure]:
    """Per op up to three panels: latency (p50 solid, p99 dashed, mean dotted: every figure the
    recording stores), memslots visited and memslots scanned (linear-scan kernels; apart, as
    509 scanned would flatten 1 visited) against the memslot count at the operation (x: the largest count seen in each log2 bucket). One series per recording, or
    per bench directory and scenario (``groups``: source -> bench directory, whose runs join
    into one line). ``keys``: source -> colour key (default the bench directory or source)."""
    if bym is None or bym.empty:
        return None
    groups, keys = groups or {}, keys or {}
    d = bym[pd.to_numeric(bym["memslots_max"], errors="coerce") > 0].copy()
    if d.empty:
        return None
    d["series"] = [f"{display(groups[s])} {display(sc)}" if groups.get(s) else display(s)
                   for s, sc in zip(d["source"], d["scenario"] if "scenario" in d else [""] * len(d))]
    d["ckey"] = [keys.get(s, groups.get(s) or s) for s in d["source"]]
    panels, left = [], 0
    ops = sorted(d["op"].astype(str).unique())
    if len(ops) * 3 > MAX_PANELS:
        left = len(ops) - MAX_PANELS // 3
        ops = ops[: MAX_PANELS // 3]
    for op in ops:
        g = d[d["op"].astype(str) == op]
        lat, visited, scanned = [], [], []
        for (ck, name), s in g.groupby(["ckey", "series"], sort=False):
            s = s.sort_values("memslots_max")
            x = s["memslots_max"].to_numpy(float)
            for col, ls, dest in (("lat_p50_ns", "-", lat), ("lat_p99_ns", "--", lat), ("lat_mean_ns", ":", lat),
                                  ("slots_mean", "-", visited), ("scanned_mean", "-", scanned)):
                y = pd.to_numeric(s[col], errors="coerce").to_numpy(float)
                if np.isfinite(y).any():
                    dest.append(Series(ck, name, x, y, linestyle=ls, marker="o"))
        xa = Axis("memslot count at the operation", "count", log=True)
        if lat:
            panels.append(_finish(Panel(f"{op}: latency, p50 solid, p99 dashed, mean dotted", xa,
                                        Axis(NS_LABEL, "ns", log=True), lat)))
        for what, series in (("visited", visited), ("scanned", scanned)):
            if series:
                panels.append(_finish(Panel(f"{op}: memslots {what} per op (mean)", Axis(xa.label, "count", log=True),
                                            Axis(f"memslots {what}", "count"), series)))
    note = ("x: the largest memslot count seen in each log2 bucket of the count at the operation; recordings with "
            "in-kernel memslot-count buckets keep sums only, so they give the mean")
    cap = f"{left} more op{'s' if left != 1 else ''} not drawn" if left else ""
    return Figure("latency and memslots visited / scanned against the memslot count", "latency and slots against memslot count",
                  panels, note + (f"; {cap}" if cap else ""), ncols=3 if any("scanned" in p.title for p in panels) else 2)


def compare_vs_memslots(df: pd.DataFrame) -> Optional[Figure]:
    """Bench comparisons: per scenario and op, latency p50 (solid) / p99 (dashed), memslots
    visited and memslots scanned against the memslot count, before and after (colours)."""
    d = df[(df["slots"] > 0) & (df["kind"] != "iteration")]
    if d.empty:
        return None
    panels, total = [], 0
    for (scen, kind, op, lp), g in d.groupby(["scenario", "kind", "op", "lat_provenance"], sort=True):
        name = f"{display(scen)}: {'memslot ' if kind == 'memslot' else ''}{op}" + (f" ({lp})" if lp != "exact" else "")
        lat, visited, scanned = [], [], []
        for side in ("before", "after"):
            for metric, ls, dest in (("p50", "-", lat), ("p99", "--", lat), ("visited", "-", visited),
                                     ("scanned", "-", scanned)):
                s = g[g["metric"] == metric].sort_values("slots")
                y = pd.to_numeric(s[side], errors="coerce").to_numpy(float)
                if len(s) and np.isfinite(y).any():
                    dest.append(Series(side, side, s["slots"].to_numpy(float), y, linestyle=ls, marker="o"))
        for title, series, ya in ((f"{name}: latency, p50 solid, p99 dashed", lat, Axis(NS_LABEL, "ns", log=True)),
                                  (f"{name}: memslots visited per op", visited, Axis("memslots visited", "count")),
                                  (f"{name}: memslots scanned per op", scanned, Axis("memslots scanned", "count"))):
            if series:
                total += 1
                if len(panels) < MAX_PANELS:
                    panels.append(_finish(Panel(title, Axis("memslot count", "count", log=True), ya, series)))
    if not panels:
        return None
    cap = _cap_note(total - len(panels), 0, "")
    return Figure("before and after against the memslot count", "latency and slots against memslot count, before and after",
                  panels, "geometric means over runs" + (f"; {cap}" if cap else ""), ncols=3)


# ----------------------------------------------------------------------------- pages

SIDES = ("before", "after")
Sections = Tuple[Dict[str, str], List[Tuple[str, List[Figure]]]]


def report_keys(src: pd.DataFrame) -> List[str]:
    """The colour key of every recording of a report: its bench directory (whose runs are one
    recording set), else its source."""
    return [r.get("bench_dir") or r["source"] for _, r in src.iterrows()]


def _hist_dists(hist: pd.DataFrame, keys: Dict[str, str]) -> pd.DataFrame:
    """A report's summed histograms (Report.hist: hva ops only, no raw events) as
    ``latency_dists`` rows."""
    rows = []
    for _, r in hist.iterrows():
        h = r[T.LAT_B].to_numpy(dtype=np.int64)
        if h.sum():
            rows.append([keys.get(r["source"], r["source"]), display(r["source"]), "", "hva", str(r["op"]),
                         str(r["lat_provenance"]), int(h.sum()), False, None, None, h])
    return pd.DataFrame(rows, columns=DIST_COLS)


def report_figures(rep, recs=None) -> Sections:
    """Every figure of the report page, by section, and the page's one colour per recording
    (bench directory). ``recs``: the recordings the report was built from, in the order of
    ``rep["sources"]``: timelines, memslot change types and exact CDFs need them; without them
    the figures come from what the report holds (hva histograms, the memslot-count table)."""
    src = rep["sources"]
    keys = report_keys(src) if not src.empty else []
    by_source = dict(zip(src["source"], keys)) if keys else {}
    colours = colour_map(keys)
    groups = {r["source"]: r["bench_dir"] for _, r in src.iterrows() if r.get("bench_dir")} if not src.empty else {}
    sections: List[Tuple[str, List[Figure]]] = []
    slots = None
    if recs is not None:
        sections.append(("Per VM and op over time", timelines(timeline(recs, keys))))
        key = lambda i, r: (keys[i] if i < len(keys) else r.source, display(r.source), "")  # noqa: E731
        d = latency_dists(recs, key)
        slots = slots_figure(slots_dists(recs, key))
    else:
        d = _hist_dists(rep.hist, by_source) if rep.hist is not None and not rep.hist.empty else None
    sections.append(("Latency distributions", latency_figures(d)))
    sections.append(("Memslots visited per operation", [slots] if slots is not None else []))
    vm = vs_memslots(rep["by_memslots"], groups, by_source)
    sections.append(("Against the memslot count", [vm] if vm is not None else []))
    return colours, sections


def _side_key(side: str):
    """``latency_dists`` key of a compare side: colour = the side; a bench run's panel is its
    scenario and memslot count (distributions at different counts are not one distribution)."""
    def key(i, r):
        panel = f"{display(r.bench.get('scenario', ''))}, {r.bench.get('slots')} slots" if r.bench else ""
        return side, side, panel
    return key


def _compare_dists(df: pd.DataFrame) -> pd.DataFrame:
    """The compare table's summed histograms per side and key (when no recordings are given)."""
    h = df.attrs.get("latency_hists")
    rows = []
    if h is None or h.empty:
        return pd.DataFrame(columns=DIST_COLS)
    for r in h.to_dict("records"):
        c = np.array([r[b] for b in T.LAT_B], dtype=np.int64)
        panel = f"{display(r['scenario'])}, {r['slots']} slots" if r["scenario"] or r["slots"] >= 0 else ""
        rows.append([r["side"], r["side"], panel, r["kind"], str(r["op"]), str(r["lat_provenance"]), int(c.sum()), False,
                     None, None, c])
    return pd.DataFrame(rows, columns=DIST_COLS)


def compare_figures(df: pd.DataFrame, recs=None) -> Sections:
    """Every figure of the compare page: before and after (one colour each) against the memslot
    count (bench directories), and the latency CDFs and histograms per op and memslot change
    type (bench: per scenario and memslot count), overlaid. ``recs``: (before, after)
    recordings, for exact CDFs from raw events; else the compare table's summed histograms."""
    slots = None
    if recs is not None:
        d = pd.concat([latency_dists(rs, _side_key(side)) for side, rs in zip(SIDES, recs)], ignore_index=True)
        slots = slots_figure(pd.concat([slots_dists(rs, _side_key(side)) for side, rs in zip(SIDES, recs)],
                                       ignore_index=True))
    else:
        d = _compare_dists(df)
    vm = compare_vs_memslots(df)
    return colour_map(SIDES), [("Against the memslot count", [vm] if vm is not None else []),
                               ("Latency distributions, before and after", latency_figures(d)),
                               ("Memslots visited per operation, before and after", [slots] if slots is not None else [])]
