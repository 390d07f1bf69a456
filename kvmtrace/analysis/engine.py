"""The columnar engine behind every raw-event figure: DuckDB, in-process, streaming Parquet.

Raw events can number billions, so no step here loads them into Python objects or one
DataFrame. DuckDB scans the recordings' Parquet parts (and, for an unfinished recording, its
memory-mapped Arrow journals) column by column, in parallel, spilling to a temporary directory
beyond ``memory_limit``; what comes back to Python is small:

**value counts** - one row per (group key, distinct value): ``GROUP BY key, value`` with
``count(*)``. Latencies in nanoseconds have a few thousand to a few million distinct values per
group, whatever the number of events, and slot counts far fewer. Every figure follows from them:

* exact percentiles: the order statistics at numpy's ranks are read off the cumulative counts
  and interpolated with numpy's own formula (method "linear", ``_lerp``), so the figures are
  bit-for-bit those of ``np.percentile`` over the raw values (tests/test_engine.py checks it);
* counts, maxima and means (exact integer sums, divided once);
* the same tables summed over VMs, recordings or hosts (value counts add), without another scan.

pandas remains the API: every function returns a (small) DataFrame.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ..errors import DataFileError, UsageError

QS = (0.5, 0.9, 0.99)
# DuckDB's working memory; beyond it, hash aggregation spills to a temporary directory.
MEMORY_LIMIT = os.environ.get("KVMTRACE_ENGINE_MEMORY", "300MB")

HVA_KEY = ["vm_id", "pid", "op", "lat_provenance", "slots_provenance"]
MEM_KEY = ["vm_id", "pid", "change", "lat_provenance", "change_provenance"]

# log2 bucket of the VM's memslot count (consts' rule: 0 -> 0, v -> bit length of v); -1 unknown
_MB_SQL = "CASE WHEN memslots < 0 THEN -1 WHEN memslots = 0 THEN 0 ELSE CAST(floor(log2(memslots)) AS BIGINT) + 1 END"


def connect():
    """A fresh in-process DuckDB connection with kvmtrace's limits."""
    try:
        import duckdb
    except ImportError as e:
        raise UsageError(
            "the duckdb Python package is missing (kvmtrace computes raw-event figures with it)",
            "pip install 'duckdb>=1.4' (it is in kvmtrace's install_requires)",
        ) from e
    tmp = os.path.join(tempfile.gettempdir(), f"kvmtrace-engine-{os.getpid()}")
    con = duckdb.connect(
        ":memory:",
        config={
            "memory_limit": MEMORY_LIMIT,
            "temp_directory": tmp,
            "preserve_insertion_order": False,
            "threads": max(1, os.cpu_count() or 1),
        },
    )
    con.execute("SET enable_progress_bar = false")  # never draw on the report's terminal
    return con


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def union_sql(con, sources: Sequence[Tuple[int, object]], columns: Sequence[str]) -> str:
    """SQL of one relation over many recordings' event tables: ``rec`` (the index given with the
    table) + ``columns``, only rows of complete intervals. ``sources``: (rec, EventTable)."""
    parts = []
    cols = ", ".join(f'"{c}"' for c in columns)
    for rec, et in sources:
        flt = f"WHERE interval <= {int(et.last)}"
        if et.parquet:
            files = "[" + ", ".join(_sql_str(p) for p in et.parquet) + "]"
            parts.append(f"SELECT {int(rec)} AS rec, {cols} FROM read_parquet({files}) {flt}")
        for k, tab in enumerate(et.arrow):
            name = f"kvmtrace_arrow_{int(rec)}_{et.name}_{k}"
            con.register(name, tab)
            parts.append(f"SELECT {int(rec)} AS rec, {cols} FROM {name} {flt}")
    if not parts:
        return ""
    return "\nUNION ALL\n".join(parts)


def _query(con, sql: str) -> pd.DataFrame:
    import duckdb

    try:
        return con.execute(sql).fetch_df()
    except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException):
        raise  # kvmtrace's own SQL is wrong: a bug, not bad input
    except duckdb.OutOfMemoryException as e:
        raise UsageError(f"raw-event scan ran out of memory: {str(e).splitlines()[0]}",
                         "raise KVMTRACE_ENGINE_MEMORY (now " + MEMORY_LIMIT + ") or free space in "
                         + tempfile.gettempdir() + " (the engine spills there)") from e
    except duckdb.Error as e:  # damaged Parquet data: IOException, InvalidInputException, plain Error, ...
        raise DataFileError(f"raw events unreadable: {str(e).splitlines()[0]}",
                            "the recording was damaged after it was written (a Parquet part's data); "
                            "restore it from a copy") from e


def _norm(df: pd.DataFrame, key: Sequence[str]) -> pd.DataFrame:
    for c in key:
        if c in ("pid", "rec", "mb"):
            df[c] = df[c].astype("int64")
        else:
            df[c] = df[c].astype(str)
    return df


class HvaCounts:
    """Value counts of one set of hva raw events, kept small (see module doc).

    ``lat``: key + ``mb`` (memslot bucket, -1 unknown) + v (latency_ns) + c;
    ``slots``: key + mb + v (slots) + c + ms_min, ms_max (memslot count range), scan_max,
    scan_sum, scan_n (slots scanned over events that know it). Key: ``HVA_KEY`` (+ any
    leading columns such as ``rec``)."""

    def __init__(self, lat: pd.DataFrame, slots: pd.DataFrame):
        self.lat = lat
        self.slots = slots
        self._stats: Dict[str, object] = {}

    def lat_stats(self) -> pd.DataFrame:
        """Exact latency statistics per ``HVA_KEY`` (``stats``)."""
        if "lat" not in self._stats:
            self._stats["lat"] = stats(self.lat[HVA_KEY + ["v", "c"]], HVA_KEY)
        return self._stats["lat"]

    def slots_stats(self) -> pd.DataFrame:
        if "slots" not in self._stats:
            self._stats["slots"] = stats(self.slots[HVA_KEY + ["v", "c"]], HVA_KEY)
        return self._stats["slots"]

    def scan_max(self) -> pd.Series:
        """Largest known slots-scanned figure per ``HVA_KEY`` (NaN: none known)."""
        if "scan" not in self._stats:
            sl = self.slots.copy()
            _norm(sl, HVA_KEY)
            self._stats["scan"] = sl.groupby(HVA_KEY, sort=True)["scan_max"].max()
        return self._stats["scan"]

    def split(self, by: str = "rec") -> Dict[object, "HvaCounts"]:
        """One HvaCounts per value of ``by``, with statistics computed once for all (one pass
        over the value counts, not one per part)."""
        if self.lat.empty:
            return {}
        ks = by
        lat_st = stats(self.lat[[ks] + HVA_KEY + ["v", "c"]], [ks] + HVA_KEY)
        sl_st = stats(self.slots[[ks] + HVA_KEY + ["v", "c"]], [ks] + HVA_KEY)
        sl = self.slots.copy()
        _norm(sl, [ks] + HVA_KEY)
        scan = sl.groupby([ks] + HVA_KEY, sort=True)["scan_max"].max()
        lat_g = dict(list(self.lat.groupby(ks, sort=False)))
        sl_g = dict(list(self.slots.groupby(ks, sort=False)))
        out = {}
        for k, lat in lat_g.items():
            hc = HvaCounts(lat, sl_g.get(k, self.slots.iloc[:0]))
            hc._stats = {"lat": lat_st.xs(k, level=ks), "slots": sl_st.xs(k, level=ks) if k in sl_st.index.get_level_values(ks) else stats(None, HVA_KEY),
                         "scan": scan.xs(k, level=ks) if k in scan.index.get_level_values(ks) else scan.iloc[:0]}
            out[k] = hc
        return out

    @property
    def events(self) -> int:
        return int(self.lat["c"].sum()) if len(self.lat) else 0

    def select(self, **eq) -> "HvaCounts":
        def f(df):
            m = np.ones(len(df), dtype=bool)
            for k, v in eq.items():
                m &= (df[k] == v).to_numpy()
            return df[m]

        return HvaCounts(f(self.lat), f(self.slots))

    def erase(self, vm_id: str = "*", pid: int = 0, drop: Sequence[str] = ("rec",)) -> "HvaCounts":
        """The same counts with the VM key replaced (and ``drop`` columns summed away)."""
        def f(df, extra_sum, extra_min, extra_max):
            if df.empty:
                return df.drop(columns=[c for c in drop if c in df.columns]).assign(vm_id=vm_id, pid=pid)
            df = df.drop(columns=[c for c in drop if c in df.columns]).assign(vm_id=vm_id, pid=pid)
            by = [c for c in df.columns if c not in ("c",) + extra_sum + extra_min + extra_max]
            agg = {"c": "sum"}
            agg.update({c: "sum" for c in extra_sum})
            agg.update({c: "min" for c in extra_min})
            agg.update({c: "max" for c in extra_max})
            return df.groupby(by, sort=False, observed=True, dropna=False).agg(agg).reset_index()

        return HvaCounts(f(self.lat, (), (), ()),
                         f(self.slots, ("scan_sum", "scan_n"), ("ms_min",), ("ms_max", "scan_max")))

    @classmethod
    def from_events(cls, ev: pd.DataFrame) -> "HvaCounts":
        """From an in-memory DataFrame of raw hva events (small inputs, tests, users' frames)."""
        e = ev.assign(mb=_mb(ev["memslots"].to_numpy()) if "memslots" in ev else -1)
        e = _norm(e[HVA_KEY + ["mb", "latency_ns", "slots", "scanned"] + (["memslots"] if "memslots" in ev else [])].copy(),
                  HVA_KEY)
        if "memslots" not in e:
            e["memslots"] = -1
        lat = e.groupby(HVA_KEY + ["mb", "latency_ns"], sort=False).size().rename("c").reset_index()
        lat = lat.rename(columns={"latency_ns": "v"})
        known = e["scanned"] >= 0
        e = e.assign(_ss=e["scanned"].where(known, 0), _sn=known.astype("int64"),
                     _sm=e["scanned"].where(known, np.nan))
        g = e.groupby(HVA_KEY + ["mb", "slots"], sort=False)
        sl = g.agg(c=("slots", "size"), ms_min=("memslots", "min"), ms_max=("memslots", "max"), scan_max=("_sm", "max"),
                   scan_sum=("_ss", "sum"), scan_n=("_sn", "sum")).reset_index().rename(columns={"slots": "v"})
        return cls(lat, sl)


class MemCounts:
    """Value counts of memslot raw events: key (``MEM_KEY``) + v (latency_ns) + c."""

    def __init__(self, lat: pd.DataFrame):
        self.lat = lat

    @property
    def events(self) -> int:
        return int(self.lat["c"].sum()) if len(self.lat) else 0

    def select(self, **eq) -> "MemCounts":
        m = np.ones(len(self.lat), dtype=bool)
        for k, v in eq.items():
            m &= (self.lat[k] == v).to_numpy()
        return MemCounts(self.lat[m])

    @classmethod
    def from_events(cls, ev: pd.DataFrame) -> "MemCounts":
        e = _norm(ev[MEM_KEY + ["latency_ns"]].copy(), MEM_KEY)
        lat = e.groupby(MEM_KEY + ["latency_ns"], sort=False).size().rename("c").reset_index()
        return cls(lat.rename(columns={"latency_ns": "v"}))


def _mb(memslots: np.ndarray) -> np.ndarray:
    from .synth import log2_buckets

    m = np.asarray(memslots, dtype=np.int64)
    out = log2_buckets(np.maximum(m, 0))
    out[m < 0] = -1
    return out


def hva_counts(con, sources: Sequence[Tuple[int, object]]) -> HvaCounts:
    """Scan the hva raw events of several recordings (``(rec, EventTable)``) once per figure
    family; the results carry ``rec``."""
    cols = ["interval"] + HVA_KEY + ["latency_ns", "slots", "scanned", "memslots"]
    rel = union_sql(con, sources, cols)
    keys = ", ".join(["rec"] + HVA_KEY)
    if not rel:
        lat = pd.DataFrame(columns=["rec"] + HVA_KEY + ["mb", "v", "c"])
        sl = pd.DataFrame(columns=["rec"] + HVA_KEY + ["mb", "v", "c", "ms_min", "ms_max", "scan_max", "scan_sum", "scan_n"])
        return HvaCounts(_norm(lat, ["rec"] + HVA_KEY + ["mb"]), _norm(sl, ["rec"] + HVA_KEY + ["mb"]))
    # one scan, two groupings: by latency value and by slots value
    both = _query(
        con,
        f"""SELECT {keys}, mb, GROUPING(latency_ns) AS by_slots, latency_ns, slots, count(*) AS c,
                   min(memslots) AS ms_min, max(memslots) AS ms_max,
                   max(scanned) FILTER (WHERE scanned >= 0) AS scan_max,
                   coalesce(sum(scanned) FILTER (WHERE scanned >= 0), 0) AS scan_sum,
                   count(*) FILTER (WHERE scanned >= 0) AS scan_n
            FROM (SELECT *, {_MB_SQL} AS mb FROM ({rel}))
            GROUP BY GROUPING SETS (({keys}, mb, latency_ns), ({keys}, mb, slots))""",
    )
    sel = both["by_slots"].to_numpy() != 0
    lat = both.loc[~sel, ["rec"] + HVA_KEY + ["mb", "latency_ns", "c"]].rename(columns={"latency_ns": "v"})
    sl = both.loc[sel, ["rec"] + HVA_KEY + ["mb", "slots", "c", "ms_min", "ms_max", "scan_max", "scan_sum", "scan_n"]]
    sl = sl.rename(columns={"slots": "v"})
    lat, sl = lat.reset_index(drop=True), sl.reset_index(drop=True)
    for df in (lat, sl):
        _norm(df, ["rec"] + HVA_KEY + ["mb"])
        df["v"] = df["v"].astype("int64")
        df["c"] = df["c"].astype("int64")
    sl["scan_sum"] = sl["scan_sum"].astype("int64")
    sl["scan_n"] = sl["scan_n"].astype("int64")
    return HvaCounts(lat, sl)


def mem_counts(con, sources: Sequence[Tuple[int, object]]) -> MemCounts:
    cols = ["interval"] + MEM_KEY + ["latency_ns"]
    rel = union_sql(con, sources, cols)
    if not rel:
        return MemCounts(_norm(pd.DataFrame(columns=["rec"] + MEM_KEY + ["v", "c"]), ["rec"] + MEM_KEY))
    keys = ", ".join(["rec"] + MEM_KEY)
    lat = _query(con, f"SELECT {keys}, latency_ns AS v, count(*) AS c FROM ({rel}) GROUP BY ALL")
    _norm(lat, ["rec"] + MEM_KEY)
    lat["v"] = lat["v"].astype("int64")
    lat["c"] = lat["c"].astype("int64")
    return MemCounts(lat)


def latency_counts(con, sources: Sequence[Tuple[int, object]], name_col: str) -> pd.DataFrame:
    """rec, ``name_col`` (op or change), lat_provenance, v (latency_ns), c: the latency value
    counts compare needs, one scan."""
    rel = union_sql(con, sources, ["interval", name_col, "lat_provenance", "latency_ns"])
    if not rel:
        return pd.DataFrame(columns=["rec", name_col, "lat_provenance", "v", "c"])
    df = _query(con, f"SELECT rec, {name_col}, lat_provenance, latency_ns AS v, count(*) AS c FROM ({rel}) GROUP BY ALL")
    _norm(df, ["rec", name_col, "lat_provenance"])
    df["v"] = df["v"].astype("int64")
    df["c"] = df["c"].astype("int64")
    return df


def merge_counts(parts: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """Several (values, counts) -> one, values sorted ascending and distinct."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    v = np.concatenate([p[0] for p in parts]).astype(np.int64)
    c = np.concatenate([p[1] for p in parts]).astype(np.int64)
    u, inv = np.unique(v, return_inverse=True)
    return u, _sum_by(inv.ravel(), c, len(u))


def _sum_by(idx: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    np.add.at(out, idx, c)
    return out


# ----------------------------------------------------------------------------- exact statistics


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (numpy/lib/_function_base_impl.py ``_lerp``), the same
    operations in the same order, so results are bit-identical to ``np.percentile``."""
    diff_b_a = b - a
    out = np.add(a, diff_b_a * t)
    np.subtract(b, diff_b_a * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=out.dtype)
    return out


def quantiles_from_counts(v: np.ndarray, c: np.ndarray, qs: Sequence[float], percent: bool = True) -> np.ndarray:
    """Exact quantiles (numpy "linear") of the multiset {v[i] repeated c[i] times}; ``v`` sorted
    ascending, c > 0. Equals ``np.percentile(np.repeat(v, c), [q * 100 for q in qs])`` (or, with
    ``percent=False``, ``np.quantile(np.repeat(v, c), qs)``)."""
    n = int(c.sum())
    if n == 0:
        return np.full(len(qs), np.nan)
    q = np.true_divide(np.asanyarray([x * 100 for x in qs]), 100) if percent else np.asanyarray(qs, dtype=np.float64)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = n - 1
    nxt[above] = n - 1
    gamma = np.asanyarray(virtual - np.where(above, -1, prev), dtype=virtual.dtype)
    cum = np.cumsum(c)
    a = v[np.searchsorted(cum, prev.astype(np.int64), side="right")]
    b = v[np.searchsorted(cum, nxt.astype(np.int64), side="right")]
    return _lerp(a.astype(np.int64), b.astype(np.int64), gamma)


def stats(vc: pd.DataFrame, key: List[str], qs: Sequence[float] = QS) -> pd.DataFrame:
    """Exact statistics per ``key`` from value counts (columns key + v + c). Values < 0 are
    "unknown" and left out of n / percentiles / max / mean but counted in ``events``.
    Index: key; columns events, n, p50.., max, mean (as report.event_stats always gave)."""
    names = [f"p{int(round(q * 100))}" for q in qs]
    cols = ["events", "n"] + names + ["max", "mean"]
    if vc is None or vc.empty:
        return pd.DataFrame(columns=key + cols).set_index(key)
    df = vc.groupby(key + ["v"], sort=True, observed=True)["c"].sum().reset_index()
    df = df[df["c"] > 0]
    keys = df[key].to_numpy(dtype=object)
    v = df["v"].to_numpy(dtype=np.int64)
    c = df["c"].to_numpy(dtype=np.int64)
    # group boundaries (rows are sorted by key, then v)
    same = np.ones(len(df), dtype=bool)  # row has the key of the row before
    same[:1] = False
    for col in key:
        a = df[col].to_numpy()
        same[1:] &= a[1:] == a[:-1]
    starts = np.flatnonzero(~same)
    ends = np.append(starts[1:], len(df))
    rows = []
    for s, e in zip(starts, ends):
        gv, gc = v[s:e], c[s:e]
        events = int(gc.sum())
        known = gv >= 0
        kv, kc = gv[known], gc[known]
        k = list(keys[s])
        if len(kv):
            n = int(kc.sum())
            p = quantiles_from_counts(kv, kc, qs)
            total = int(np.dot(kv.astype(object), kc.astype(object)))  # exact integer sum
            rows.append(k + [events, n] + [float(x) for x in p] + [float(kv[-1]), float(total / n)])
        else:
            rows.append(k + [events, 0] + [np.nan] * (len(qs) + 2))
    out = pd.DataFrame(rows, columns=key + cols)
    for col in key:
        out[col] = out[col].astype("int64") if col in ("pid", "rec", "mb") else out[col].astype(str)
    return out.set_index(key)
