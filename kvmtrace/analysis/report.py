"""Recordings -> report tables (pure pandas), and the JSON document of ``kvmtrace report --json``.

Every latency / slots figure says where it comes from:
  ``latency_source`` = "raw events" (exact percentiles over every recorded operation, numpy's
  linear interpolation between order statistics) when the recording holds a raw event for every
  operation the in-kernel counters saw for that row; otherwise HIST_SOURCE (the in-kernel log2
  histogram, linear interpolation within the bucket), with the reason when raw events exist but
  are incomplete (lost events). Means are always exact (in-kernel sums / counts); maxima are the
  in-kernel maxima (exact).
and ``*_provenance`` (exact / syscall / derived / none) says how the tracer observed it. Rows with
different provenance are never merged: provenance is part of every grouping key.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .. import __version__
from . import engine as E
from . import tables as T
from .input_warnings import InputWarning, of_recordings
from .recording import Recording

HIST_SOURCE = "log2 histogram, linear interpolation within bucket"
EVENT_SOURCE = "raw events"
QS = (0.5, 0.9, 0.99)
REPORT_FORMAT = "kvmtrace-report"
REPORT_VERSION = 2  # 2: sources[].warnings is a list; top-level "warnings" with codes

HVA_KEY = ["vm_id", "pid", "op", "lat_provenance", "slots_provenance"]
MEM_KEY = ["vm_id", "pid", "change", "lat_provenance", "change_provenance"]

# Columns of the event tables a report needs (reading only these keeps 10M-event reports fast).
EVENT_COLUMNS = {
    "hva_events": ["vm_id", "pid", "op", "latency_ns", "slots", "scanned", "memslots", "lat_provenance", "slots_provenance"],
    "memslot_events": ["vm_id", "pid", "change", "result", "latency_ns", "lat_provenance", "change_provenance"],
}


# ----------------------------------------------------------------------------- helpers


def event_stats(ev: pd.DataFrame, key: List[str], col: str, qs: Sequence[float] = QS) -> pd.DataFrame:
    """Exact statistics of ``col`` per ``key`` over an in-memory DataFrame of raw events (rows
    with col < 0 = unknown are left out). Columns: n, p50.., max, mean, events (all rows of the
    group, known or not). Reports do not call this on recordings: the engine computes the same
    figures out of core (``engine.stats`` over value counts)."""
    if ev is None or ev.empty:
        return E.stats(None, key, qs)
    vc = ev.groupby(key + [col], observed=True, sort=False).size().rename("c").reset_index()
    return E.stats(vc.rename(columns={col: "v"}), key, qs)


def _counts(events, cls):
    """Raw events as value counts (``cls``: engine.HvaCounts / MemCounts; from the engine, or
    from an in-memory DataFrame); None when there are none."""
    if events is None:
        return None
    if not isinstance(events, cls):
        if events.empty:
            return None
        events = cls.from_events(events)
    return events if events.events else None


def _hist_q(counts: np.ndarray, qs=QS, hi=None) -> List[float]:
    """Quantiles from a log2 histogram; ``hi`` (the exact maximum, when known) caps them, since
    interpolation inside the top bucket must not report more than was observed."""
    r = T.hist_quantiles(counts, qs)
    out = [math.nan if x is None else float(x) for x in r]
    if hi is not None and not pd.isna(hi):
        out = [x if math.isnan(x) else min(x, float(hi)) for x in out]
    return out


def _div(a, b) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return math.nan
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _norm_keys(df: pd.DataFrame, key: List[str]) -> pd.DataFrame:
    df = df.copy()
    for c in key:
        df[c] = df[c].astype("int64") if c == "pid" else df[c].astype(str)
    return df


def vm_label(name: str, comm: str, pid: int, ordinal: int) -> str:
    """What outputs show for a VM (snapshot.VmInfo.label): guest name or comm, the VMM pid and
    the per-process VM ordinal, e.g. ``web1[4242]#2``; ``#?`` when the VM predates the trace."""
    from ..snapshot import VmInfo

    return VmInfo(vm_id="", pid=int(pid), comm=str(comm or ""), name=str(name or ""), ordinal=int(ordinal or 0)).label


def _last_vm_info(df: pd.DataFrame) -> Dict[tuple, dict]:
    """(vm_id, pid) -> comm, name, label, the final memslot count and the largest one seen."""
    info: Dict[tuple, dict] = {}
    if df.empty:
        return info
    last = df.sort_values("interval").groupby(["vm_id", "pid"], sort=False).tail(1)
    seen_max = df.groupby(["vm_id", "pid"], sort=False)["memslots"].max()
    rec_max = df.groupby(["vm_id", "pid"], sort=False)["memslots_max"].max() if "memslots_max" in df else None
    for r in last.itertuples(index=False):
        k = (str(r.vm_id), int(r.pid))
        ordinal = int(getattr(r, "ordinal", 0) or 0)
        mx = max(int(seen_max.get((r.vm_id, r.pid), -1)),
                 int(rec_max.get((r.vm_id, r.pid), -1)) if rec_max is not None else -1)
        info[k] = {"comm": r.comm, "name": r.name, "memslots": int(r.memslots), "memslots_max": mx,
                   "ordinal": ordinal, "vm_label": vm_label(r.name, r.comm, int(r.pid), ordinal)}
    return info


# ----------------------------------------------------------------------------- tables


def hva_ops(hva: pd.DataFrame, duration_s: float, events: Optional[pd.DataFrame] = None, vm_info=None) -> pd.DataFrame:
    """One recording's hva rows (and its raw events, if any: a DataFrame or the engine's
    ``HvaCounts``) -> one row per VM x op x provenance: count, rate, latency p50/p90/p99/max/mean,
    slots visited mean/p99/max, slots scanned."""
    out_cols = [
        "vm_id", "vm_label", "ordinal", "pid", "comm", "name", "memslots", "memslots_max", "op", "count", "count_provenance",
        "duration_s", "rate_per_s",
        "lat_n", "lat_p50_ns", "lat_p90_ns", "lat_p99_ns", "lat_max_ns", "lat_mean_ns", "lat_provenance", "latency_source",
        "slots_n", "slots_mean", "slots_p99", "slots_max", "slots_provenance", "slots_source",
        "scanned_mean", "scanned_max", "scanned_provenance", "underived",
    ]
    if hva.empty:
        return pd.DataFrame(columns=out_cols)
    hva = _norm_keys(hva, HVA_KEY)
    vm_info = vm_info if vm_info is not None else _last_vm_info(hva)
    g = hva.groupby(HVA_KEY, sort=True)
    agg = g.agg(
        count=("count", "sum"),
        lat_count=("lat_count", "sum"),
        lat_sum_ns=("lat_sum_ns", "sum"),
        lat_max_ns=("lat_max_ns", "max"),
        slots_count=("slots_count", "sum"),
        slots_sum=("slots_sum", "sum"),
        slots_max=("slots_max", "max"),
        scanned_provenance=("scanned_provenance", "first"),
    )
    agg["scanned_sum"] = g["scanned_sum"].sum(min_count=1)
    agg["scanned_max"] = g["scanned_max"].max() if "scanned_max" in hva else math.nan
    agg["underived"] = g["underived"].sum() if "underived" in hva else 0
    lat_h = g[T.LAT_B].sum()
    slot_h = g[T.SLOTS_B].sum()
    ev_lat = ev_slots = ev_scan = None
    hc = _counts(events, E.HvaCounts)
    if hc is not None:
        ev_lat, ev_slots, ev_scan = hc.lat_stats(), hc.slots_stats(), hc.scan_max()
    rows = []
    for k, a in agg.iterrows():
        vm_id, pid, op, lprov, sprov = k
        info = vm_info.get((vm_id, pid), {})
        count = int(a["count"])
        row = {
            "vm_id": vm_id, "pid": pid, "comm": info.get("comm", ""), "name": info.get("name", ""),
            "vm_label": info.get("vm_label", "*" if vm_id == "*" else vm_label("", "", pid, 0)),
            "ordinal": info.get("ordinal", 0),
            "memslots": info.get("memslots", -1), "memslots_max": info.get("memslots_max", -1),
            "underived": int(a["underived"]), "op": op, "count": count, "count_provenance": "exact",
            "duration_s": duration_s, "rate_per_s": _div(count, duration_s),
            "lat_provenance": lprov, "slots_provenance": sprov, "scanned_provenance": a["scanned_provenance"],
        }
        complete = ev_lat is not None and k in ev_lat.index and int(ev_lat.loc[k, "events"]) == count
        why = ""
        if ev_lat is not None and not complete:
            got = int(ev_lat.loc[k, "events"]) if k in ev_lat.index else 0
            why = f" (raw events incomplete: {got} of {count})"
        # latency
        if lprov == "none" or int(a["lat_count"]) == 0:
            row.update(lat_n=0, lat_p50_ns=math.nan, lat_p90_ns=math.nan, lat_p99_ns=math.nan,
                       lat_max_ns=math.nan, lat_mean_ns=math.nan, latency_source="none")
        elif complete and int(ev_lat.loc[k, "n"]) == int(a["lat_count"]):
            e = ev_lat.loc[k]
            row.update(lat_n=int(e["n"]), lat_p50_ns=e["p50"], lat_p90_ns=e["p90"], lat_p99_ns=e["p99"],
                       lat_max_ns=float(a["lat_max_ns"]), lat_mean_ns=_div(a["lat_sum_ns"], a["lat_count"]),
                       latency_source=EVENT_SOURCE)
        else:
            p50, p90, p99 = _hist_q(lat_h.loc[k].to_numpy(), hi=a["lat_max_ns"])
            row.update(lat_n=int(a["lat_count"]), lat_p50_ns=p50, lat_p90_ns=p90, lat_p99_ns=p99,
                       lat_max_ns=float(a["lat_max_ns"]), lat_mean_ns=_div(a["lat_sum_ns"], a["lat_count"]),
                       latency_source=HIST_SOURCE + why)
        # slots visited
        if sprov == "none" or int(a["slots_count"]) == 0:
            row.update(slots_n=0, slots_mean=math.nan, slots_p99=math.nan, slots_max=math.nan, slots_source="none")
        elif complete and int(ev_slots.loc[k, "n"]) == int(a["slots_count"]):
            row.update(slots_n=int(a["slots_count"]), slots_mean=_div(a["slots_sum"], a["slots_count"]),
                       slots_p99=ev_slots.loc[k, "p99"], slots_max=float(a["slots_max"]), slots_source=EVENT_SOURCE)
        else:
            row.update(slots_n=int(a["slots_count"]), slots_mean=_div(a["slots_sum"], a["slots_count"]),
                       slots_p99=_hist_q(slot_h.loc[k].to_numpy(), (0.99,), hi=a["slots_max"])[0], slots_max=float(a["slots_max"]),
                       slots_source=HIST_SOURCE + why)
        # slots scanned (linear-scan kernels)
        if pd.isna(a["scanned_sum"]):
            row.update(scanned_mean=math.nan, scanned_max=math.nan)
        else:
            denom = int(a["slots_count"]) or count
            if not pd.isna(a["scanned_max"]):  # the in-kernel maximum
                smax = float(a["scanned_max"])
            elif complete and ev_scan is not None and k in ev_scan.index:
                smax = float(ev_scan.loc[k])
            else:
                smax = math.nan
            row.update(scanned_mean=_div(a["scanned_sum"], denom), scanned_max=smax)
        rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)


def memslot_updates(mem: pd.DataFrame, events: Optional[pd.DataFrame] = None, vm_info=None) -> pd.DataFrame:
    """One recording's memslot rows -> one row per VM x change type x provenance."""
    out_cols = ["vm_id", "vm_label", "ordinal", "pid", "comm", "name", "change", "count", "errors", "change_provenance", "lat_n",
                "lat_p50_ns", "lat_p90_ns", "lat_p99_ns", "lat_max_ns", "lat_mean_ns", "lat_provenance", "latency_source"]
    if mem.empty:
        return pd.DataFrame(columns=out_cols)
    mem = _norm_keys(mem, MEM_KEY)
    vm_info = vm_info if vm_info is not None else _last_vm_info(mem)
    g = mem.groupby(MEM_KEY, sort=True)
    agg = g.agg(count=("count", "sum"), errors=("errors", "sum"), lat_sum_ns=("lat_sum_ns", "sum"),
                lat_max_ns=("lat_max_ns", "max"))
    lat_h = g[T.LAT_B].sum()
    mc = _counts(events, E.MemCounts)
    ev_lat = E.stats(mc.lat[MEM_KEY + ["v", "c"]], MEM_KEY) if mc is not None else None
    rows = []
    for k, a in agg.iterrows():
        vm_id, pid, change, lprov, cprov = k
        info = vm_info.get((vm_id, pid), {})
        count = int(a["count"])
        n_lat = int(lat_h.loc[k].sum())
        row = {"vm_id": vm_id, "pid": pid, "comm": info.get("comm", ""), "name": info.get("name", ""),
               "vm_label": info.get("vm_label", vm_label("", "", pid, 0)), "ordinal": info.get("ordinal", 0),
               "change": change, "count": count, "errors": int(a["errors"]), "change_provenance": cprov,
               "lat_provenance": lprov}
        complete = ev_lat is not None and k in ev_lat.index and int(ev_lat.loc[k, "events"]) == count
        why = ""
        if ev_lat is not None and not complete:
            got = int(ev_lat.loc[k, "events"]) if k in ev_lat.index else 0
            why = f" (raw events incomplete: {got} of {count})"
        if lprov == "none" or n_lat == 0:
            row.update(lat_n=0, lat_p50_ns=math.nan, lat_p90_ns=math.nan, lat_p99_ns=math.nan,
                       lat_max_ns=math.nan, lat_mean_ns=math.nan, latency_source="none")
        elif complete and int(ev_lat.loc[k, "n"]) == n_lat:
            e = ev_lat.loc[k]
            row.update(lat_n=int(e["n"]), lat_p50_ns=e["p50"], lat_p90_ns=e["p90"], lat_p99_ns=e["p99"],
                       lat_max_ns=float(a["lat_max_ns"]), lat_mean_ns=_div(a["lat_sum_ns"], n_lat),
                       latency_source=EVENT_SOURCE)
        else:
            p50, p90, p99 = _hist_q(lat_h.loc[k].to_numpy(), hi=a["lat_max_ns"])
            row.update(lat_n=n_lat, lat_p50_ns=p50, lat_p90_ns=p90, lat_p99_ns=p99, lat_max_ns=float(a["lat_max_ns"]),
                       lat_mean_ns=_div(a["lat_sum_ns"], n_lat), latency_source=HIST_SOURCE + why)
        rows.append(row)
    return pd.DataFrame(rows, columns=out_cols)


def memslot_bucket_label(b: int) -> str:
    """log2 bucket -> the memslot counts it holds: "0", "1", "2-3", "4-7", ... "256-511"."""
    if b <= 0:
        return "0"
    lo, hi = T.Log2Hist.bucket_bounds(b)
    return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"


# memslots_source values: where each operation's memslot count comes from
MEMSLOTS_KERNEL = "memslot count at each operation (in-kernel buckets)"
MEMSLOTS_EVENTS = "memslot count at each operation (raw events)"
MEMSLOTS_INTERVAL_END = "VM memslot count at interval end (recording without in-kernel memslot-count buckets)"

BY_MEMSLOTS_COLS = ["op", "bucket", "memslots_bucket", "memslots_min", "memslots_max", "count", "lat_p50_ns",
                    "lat_p99_ns", "lat_mean_ns", "lat_provenance", "latency_source", "slots_mean",
                    "slots_provenance", "scanned_mean", "memslots_source"]


def _by_memslots_kernel(bm: pd.DataFrame) -> list:
    """Rows from the in-kernel memslot-count buckets: counts and means (the kernel keeps sums per
    bucket, no latency histogram, so no percentiles); ``memslots_max`` is the largest count seen."""
    rows = []
    b = _norm_keys(bm, ["op", "lat_provenance", "slots_provenance"])
    g = b.groupby(["op", "bucket", "lat_provenance", "slots_provenance"], sort=True)
    agg = g.agg(count=("count", "sum"), lat_count=("lat_count", "sum"), lat_sum_ns=("lat_sum_ns", "sum"),
                slots_count=("slots_count", "sum"), slots_sum=("slots_sum", "sum"), mmax=("memslots_max", "max"))
    agg["scanned_sum"] = g["scanned_sum"].sum(min_count=1)
    for (op, bucket, lp, sp), a in agg.iterrows():
        has_lat = lp != "none" and int(a["lat_count"]) > 0
        mmax = int(a["mmax"])
        rows.append([op, int(bucket), memslot_bucket_label(int(bucket)), math.nan, mmax,
                     int(a["count"]), math.nan, math.nan, _div(a["lat_sum_ns"], a["lat_count"]) if has_lat else math.nan,
                     lp, "in-kernel sum / count (mean only)" if has_lat else "none",
                     _div(a["slots_sum"], a["slots_count"]) if sp != "none" else math.nan, sp,
                     _div(a["scanned_sum"], a["slots_count"] or a["count"]), MEMSLOTS_KERNEL])
    return rows


def by_memslots(hva: pd.DataFrame, events: Optional[pd.DataFrame] = None,
                kernel: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """hva ops by the VM's memslot count (log2 buckets, in numeric order). The count is the one
    at each operation: from raw events when they cover every operation (exact percentiles), else
    from the in-kernel buckets (``kernel``: the recording's by_memslots table; counts and means).
    Recordings with neither (older versions, or a tracer that kept no buckets) fall back to the
    VM's memslot count at the end of each interval, and ``memslots_source`` says so."""
    from .tables import log2_buckets

    total = int(hva["count"].sum()) if not hva.empty else 0
    hc = _counts(events, E.HvaCounts)
    use_events = hc is not None and hc.events == total and total > 0 and bool((hc.lat["mb"] >= 0).any())
    have_kernel = kernel is not None and not kernel.empty
    if use_events and have_kernel and bool((hc.lat["mb"] < 0).any()):
        use_events = False  # some events lack the count: the in-kernel buckets cover every operation
    rows = []
    if use_events:
        key = ["op", "mb", "lat_provenance", "slots_provenance"]
        lat = hc.lat[hc.lat["mb"] >= 0]
        sl = hc.slots[hc.slots["mb"] >= 0]
        lat_g = dict(list(lat.groupby(key, sort=True, observed=True)))
        sl_g = dict(list(sl.groupby(key, sort=True, observed=True)))
        for k in sorted(lat_g):
            op, b, lp, sp = k
            lg = lat_g[k].groupby("v", sort=True)["c"].sum()
            sg = sl_g[k]
            known = lg[lg.index >= 0]
            lv, lc = known.index.to_numpy(np.int64), known.to_numpy(np.int64)
            n_l = int(lc.sum())
            p50, p99 = E.quantiles_from_counts(lv, lc, (0.5, 0.99)) if n_l else (math.nan, math.nan)
            sk = sg[sg["v"] >= 0]
            n_s = int(sk["c"].sum())
            s_sum = int(np.dot(sk["v"].to_numpy(np.int64).astype(object), sk["c"].to_numpy(np.int64).astype(object))) if n_s else 0
            n_c = int(sg["scan_n"].sum())
            c_sum = int(sg["scan_sum"].astype("int64").sum())
            l_sum = int(np.dot(lv.astype(object), lc.astype(object))) if n_l else 0
            rows.append([str(op), int(b), memslot_bucket_label(int(b)), int(sg["ms_min"].min()), int(sg["ms_max"].max()),
                         int(lg.sum()), float(p50), float(p99), float(l_sum / n_l) if n_l else math.nan, str(lp),
                         EVENT_SOURCE if n_l else "none", float(s_sum / n_s) if n_s else math.nan, str(sp),
                         float(c_sum / n_c) if n_c else math.nan, MEMSLOTS_EVENTS])
    elif have_kernel:
        rows = _by_memslots_kernel(kernel)
    elif not hva.empty:
        h = hva[hva["memslots"] >= 0].copy()
        if not h.empty:
            h = _norm_keys(h, ["op", "lat_provenance", "slots_provenance"])
            h["b"] = log2_buckets(h["memslots"].to_numpy())
            g = h.groupby(["op", "b", "lat_provenance", "slots_provenance"], sort=True)
            agg = g.agg(count=("count", "sum"), lat_count=("lat_count", "sum"), lat_sum_ns=("lat_sum_ns", "sum"),
                        lat_max_ns=("lat_max_ns", "max"),
                        slots_count=("slots_count", "sum"), slots_sum=("slots_sum", "sum"),
                        mmin=("memslots", "min"), mmax=("memslots", "max"))
            agg["scanned_sum"] = g["scanned_sum"].sum(min_count=1)
            lat_h = g[T.LAT_B].sum()
            for k, a in agg.iterrows():
                op, b, lp, sp = k
                has_lat = lp != "none" and int(a["lat_count"]) > 0
                p50, p99 = _hist_q(lat_h.loc[k].to_numpy(), (0.5, 0.99), hi=a["lat_max_ns"]) if has_lat else (math.nan, math.nan)
                rows.append([op, int(b), memslot_bucket_label(int(b)), int(a["mmin"]), int(a["mmax"]), int(a["count"]),
                             p50, p99, _div(a["lat_sum_ns"], a["lat_count"]) if has_lat else math.nan, lp,
                             HIST_SOURCE if has_lat else "none", _div(a["slots_sum"], a["slots_count"]), sp,
                             _div(a["scanned_sum"], a["slots_count"] or a["count"]), MEMSLOTS_INTERVAL_END])
    df = pd.DataFrame(rows, columns=BY_MEMSLOTS_COLS)
    return df.sort_values(["op", "bucket", "lat_provenance", "slots_provenance"], kind="stable").reset_index(drop=True)


def sources(recs: Sequence[Recording], event_rows: Optional[Dict[str, List[int]]] = None) -> pd.DataFrame:
    """One row per input recording: where, what, how long, lost events and status.
    ``event_rows``: raw events per recording and table, as the engine counted them (else the
    event tables are counted in memory)."""
    rows = []
    for i, r in enumerate(recs):
        iv = r["intervals"]
        b = r.bench or {}
        wl = b.get("workload") or {}
        rows.append({
            "source": r.source, "path": r.path, "host": r.meta.get("host", ""), "kernel": r.meta.get("kernel", ""),
            "label": r.meta.get("label", ""), "scenario": b.get("scenario", ""),
            "bench_dir": os.path.basename(os.path.normpath(b["bench_dir"])) if b.get("bench_dir") else "",
            "bench_slots": b.get("slots") if b.get("slots") is not None else -1,
            "iter_avg_s": float(wl.get("iter_avg_s", math.nan)) if wl.get("iter_avg_s") is not None else math.nan,
            "iter_best_s": float(wl.get("iter_best_s", math.nan)) if wl.get("iter_best_s") is not None else math.nan,
            "start": r.meta.get("start"), "end": r.meta.get("end"),
            "duration_s": float(iv["elapsed_s"].sum()), "intervals": int(len(iv)),
            "status": r.meta.get("status", ""), "lost_events": int(iv["lost_events"].sum()),
            "map_full": int(iv["map_full"].sum()), "unattributed": int(iv["unattributed"].sum()),
            "raw_events": bool(r.has_events),
            "hva_events": _event_rows(r, "hva_events", i, event_rows),
            "memslot_events": _event_rows(r, "memslot_events", i, event_rows),
            "warnings": "; ".join(w for w in r.warnings if w and str(w).strip()),
            **_self_cost(r.meta.get("self_cost")),
        })
    return pd.DataFrame(rows)


def _self_cost(c) -> dict:
    """kvmtrace's own cost over a recording (metadata ``self_cost``; absent in recordings made
    before kvmtrace measured it)."""
    c = c or {}
    num = lambda k: math.nan if c.get(k) is None else float(c[k])  # noqa: E731
    return {"bpf_stats": c.get("bpf_stats", "not recorded"), "bpf_ns_per_event": num("bpf_ns_per_event"),
            "bpf_cpu_share": num("bpf_cpu_share"), "user_cpu_share": num("user_cpu_share"),
            "late_intervals": int(c.get("late_intervals") or 0)}


def _prefix(df: pd.DataFrame, r: Recording, src: pd.Series) -> pd.DataFrame:
    df = df.copy()
    front = {"source": r.source, "host": src["host"], "kernel": src["kernel"], "scenario": src["scenario"],
             "bench_slots": src["bench_slots"]}
    for i, (c, v) in enumerate(front.items()):
        df.insert(i, c, v)
    return df


def _event_rows(r: Recording, name: str, i: int, event_rows) -> int:
    if name not in r.tables:
        return 0
    if event_rows is not None and name in event_rows:
        return int(event_rows[name][i])
    return int(len(r.tables[name]))


def _engine_counts(recs: Sequence[Recording]):
    """Value counts of every recording's raw events (one engine scan per figure family, all
    recordings at once), tagged with the recording's index ``rec``."""
    hsrc = [(i, r.events["hva_events"]) for i, r in enumerate(recs) if "hva_events" in r.events]
    msrc = [(i, r.events["memslot_events"]) for i, r in enumerate(recs) if "memslot_events" in r.events]
    hc = mc = None
    if hsrc or msrc:
        con = E.connect()
        try:
            hc = E.hva_counts(con, hsrc)
            mc = E.mem_counts(con, msrc)
        finally:
            con.close()
    return hc, mc


def _rec_counts(r: Recording, i: int, hc_all, mc_all):
    """(HvaCounts or None, MemCounts or None) of recording ``i``: the engine's, or for event
    tables held in memory (recordings built by hand), counted from the DataFrame."""
    out = []
    for name, allc, cls in (("hva_events", hc_all, E.HvaCounts), ("memslot_events", mc_all, E.MemCounts)):
        if name in r.events and allc is not None:
            if isinstance(allc, dict):  # HvaCounts split by recording
                out.append(allc.get(i) or E.HvaCounts(pd.DataFrame(columns=["c"]), pd.DataFrame(columns=["c"])))
            else:
                out.append(allc.select(rec=i))
        elif name in r.tables and not r.events:
            out.append(cls.from_events(r.tables[name]) if not r.tables[name].empty else None)
        else:
            out.append(None)
    return out[0], out[1]


def _concat_counts(cs: Sequence[Optional[E.HvaCounts]]) -> Optional[E.HvaCounts]:
    cs = [c for c in cs if c is not None]
    if not cs:
        return None
    return E.HvaCounts(pd.concat([c.lat for c in cs], ignore_index=True), pd.concat([c.slots for c in cs], ignore_index=True))


ALL_HOSTS = "*"


def _hosts_rows(recs: Sequence[Recording], src: pd.DataFrame, counts) -> List[pd.DataFrame]:
    """hva ops per op over all VMs and recordings of each host, then of all hosts (host "*").
    Counts, histograms and raw-event value counts add up across recordings, so percentiles stay
    exact where every recording of the group holds every raw event. duration_s (and the rate)
    is the sum of the recordings' durations: per recorded second, not per wall-clock second."""
    hosts = sorted({r.host for r in recs})
    groups = [(h, [i for i, r in enumerate(recs) if r.host == h]) for h in hosts] + [(ALL_HOSTS, list(range(len(recs))))]
    out = []
    for host, idx in groups:
        hv = [recs[i]["hva"] for i in idx if not recs[i]["hva"].empty]
        if not hv:
            continue
        hva = pd.concat(hv, ignore_index=True).assign(vm_id="*", pid=0, comm="", name="", memslots=-1)
        hc = _concat_counts([counts[i][0] for i in idx])
        dur = float(src.iloc[idx]["duration_s"].sum())
        df = hva_ops(hva, dur, hc.erase() if hc is not None else None, {})
        kernels = sorted({str(k) for k in src.iloc[idx]["kernel"]})
        front = {"source": f"{len(idx)} recording{'s' if len(idx) != 1 else ''}", "host": host,
                 "kernel": kernels[0] if len(kernels) == 1 else ", ".join(kernels), "scenario": "", "bench_slots": -1}
        for j, (c, v) in enumerate(front.items()):
            df.insert(j, c, v)
        out.append(df)
    return out


WARNING_COLUMNS = ["source", "code", "warning"]


class Report:
    """All report tables, each a DataFrame: ``sources``, ``hva_ops`` (per VM x op),
    ``hva_ops_total`` (per op, all VMs of a source), ``memslot_updates``, ``by_memslots``,
    ``hva_ops_hosts`` (per op, all VMs and recordings of a host; ``host`` "*": all hosts),
    ``warnings`` (one row per warning of an input: source, code, text; input_warnings.CODES);
    ``hist`` holds summed latency histograms per (source, op) for the plots."""

    TABLES = ("sources", "hva_ops", "hva_ops_total", "memslot_updates", "by_memslots", "hva_ops_hosts", "warnings")

    def __init__(self, tables: Dict[str, pd.DataFrame], hist: pd.DataFrame, warnings: Sequence[InputWarning] = ()):
        self.tables = tables
        self.hist = hist
        self.warnings: List[InputWarning] = list(warnings)
        self.tables["warnings"] = pd.DataFrame([[w.source, w.code, w.text] for w in self.warnings],
                                               columns=WARNING_COLUMNS)

    def __getitem__(self, k):
        return self.tables[k]

    @property
    def lost_events(self) -> int:
        s = self.tables["sources"]
        return int(s["lost_events"].sum()) if not s.empty else 0


def build_report(recs: Sequence[Recording]) -> Report:
    hc_all, mc_all = _engine_counts(recs)
    hc_split = hc_all.split("rec") if hc_all is not None else None
    # the same per recording with the VM erased (hva_ops_total), statistics again in one pass
    tot_split = hc_all.erase(drop=()).split("rec") if hc_all is not None else {}
    counts = [_rec_counts(r, i, hc_split, mc_all) for i, r in enumerate(recs)]
    event_rows = {"hva_events": [h.events if h is not None else 0 for h, _ in counts],
                  "memslot_events": [m.events if m is not None else 0 for _, m in counts]}
    src = sources(recs, event_rows)
    parts: Dict[str, List[pd.DataFrame]] = {t: [] for t in Report.TABLES if t not in ("sources", "warnings")}
    hists = []
    for i, r in enumerate(recs):
        s = src.iloc[i]
        hva, mem = r["hva"], r["memslot"]
        hev, mev = counts[i]
        dur = float(s["duration_s"])
        # VM names and memslot counts: the vms table has every interval (the final count is its
        # last one); the hva rows only fill in VMs it lacks
        info = _last_vm_info(_norm_keys(hva, ["vm_id", "pid"])) if not hva.empty else {}
        info.update(_last_vm_info(_norm_keys(r["vms"], ["vm_id", "pid"])) if not r["vms"].empty else {})
        parts["hva_ops"].append(_prefix(hva_ops(hva, dur, hev, info), r, s))
        # per op over all VMs: the same aggregation with the VM erased
        hva_all = hva.assign(vm_id="*", pid=0, comm="", name="", memslots=-1) if not hva.empty else hva
        hev_all = tot_split.get(i) if i in tot_split else (hev.erase() if hev is not None else None)
        parts["hva_ops_total"].append(_prefix(hva_ops(hva_all, dur, hev_all, {}), r, s))
        info_m = _last_vm_info(_norm_keys(mem, ["vm_id", "pid"])) if not mem.empty else {}
        info_m.update(info)
        parts["memslot_updates"].append(_prefix(memslot_updates(mem, mev, info_m), r, s))
        parts["by_memslots"].append(_prefix(by_memslots(hva, hev, r.tables.get("by_memslots")), r, s))
        if not hva.empty:
            h = _norm_keys(hva, ["op", "lat_provenance"]).groupby(["op", "lat_provenance"], sort=True)[T.LAT_B].sum()
            h = h.reset_index()
            h.insert(0, "source", r.source)
            hists.append(h)
    parts["hva_ops_hosts"] = _hosts_rows(recs, src, counts)
    tables = {"sources": src}
    for t, ps in parts.items():
        full = [p for p in ps if not p.empty]
        # no rows: the columns stay (a CSV of an empty table still has its header)
        tables[t] = pd.concat(full, ignore_index=True) if full else pd.DataFrame(columns=ps[0].columns if ps else [])
    hist = pd.concat(hists, ignore_index=True) if hists else pd.DataFrame()
    return Report(tables, hist, of_recordings(recs))


# ----------------------------------------------------------------------------- JSON


def _num(v):
    if v is None:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) else f
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def _latency(r) -> dict:
    return {"p50": _num(r["lat_p50_ns"]), "p90": _num(r["lat_p90_ns"]), "p99": _num(r["lat_p99_ns"]),
            "max": _num(r["lat_max_ns"]), "mean": _num(r["lat_mean_ns"]), "n": _num(r["lat_n"]),
            "provenance": r["lat_provenance"], "source": r["latency_source"]}


def _hva_json(df: pd.DataFrame) -> List[dict]:
    out = []
    for _, r in df.iterrows():
        out.append({
            "source": r["source"], "host": r["host"], "kernel": r["kernel"], "scenario": r["scenario"],
            "bench_slots": _num(r["bench_slots"]), "vm": r["vm_id"], "vm_label": r["vm_label"],
            "ordinal": _num(r["ordinal"]), "pid": _num(r["pid"]), "comm": r["comm"],
            "name": r["name"], "memslots": _num(r["memslots"]), "memslots_max": _num(r["memslots_max"]),
            "op": r["op"], "count": _num(r["count"]), "underived": _num(r["underived"]),
            "count_provenance": r["count_provenance"], "rate_per_s": _num(r["rate_per_s"]),
            "latency_ns": _latency(r),
            "slots_visited": {"mean": _num(r["slots_mean"]), "p99": _num(r["slots_p99"]), "max": _num(r["slots_max"]),
                              "n": _num(r["slots_n"]), "provenance": r["slots_provenance"], "source": r["slots_source"]},
            "slots_scanned": {"mean": _num(r["scanned_mean"]), "max": _num(r["scanned_max"]),
                              "provenance": r["scanned_provenance"]},
        })
    return out


def to_json(rep: Report) -> dict:
    """The ``kvmtrace report --json`` document (schema: docs/report.schema.json)."""
    src = rep["sources"]
    mem = []
    for _, r in rep["memslot_updates"].iterrows() if not rep["memslot_updates"].empty else []:
        mem.append({"source": r["source"], "vm": r["vm_id"], "vm_label": r["vm_label"], "ordinal": _num(r["ordinal"]),
                    "pid": _num(r["pid"]), "comm": r["comm"],
                    "change": r["change"], "change_provenance": r["change_provenance"], "count": _num(r["count"]),
                    "errors": _num(r["errors"]), "latency_ns": _latency(r)})
    bym = []
    for _, r in rep["by_memslots"].iterrows() if not rep["by_memslots"].empty else []:
        bym.append({"source": r["source"], "op": r["op"], "bucket": _num(r["bucket"]),
                    "memslots_bucket": r["memslots_bucket"],
                    "memslots_min": _num(r["memslots_min"]), "memslots_max": _num(r["memslots_max"]),
                    "count": _num(r["count"]),
                    "latency_ns": {"p50": _num(r["lat_p50_ns"]), "p99": _num(r["lat_p99_ns"]),
                                   "mean": _num(r["lat_mean_ns"]), "provenance": r["lat_provenance"],
                                   "source": r["latency_source"]},
                    "slots_visited": {"mean": _num(r["slots_mean"]), "provenance": r["slots_provenance"]},
                    "slots_scanned": {"mean": _num(r["scanned_mean"])}, "memslots_source": r["memslots_source"]})
    by_src: Dict[str, List[str]] = {}
    for w in rep.warnings:
        by_src.setdefault(w.source, []).append(w.text)
    sources_json = []
    for row in src.to_dict("records"):
        d = {k: _num(v) for k, v in row.items()}
        d["warnings"] = by_src.get(row["source"], [])
        sources_json.append(d)
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "kvmtrace_version": __version__,
        "warnings": [w.as_dict() for w in rep.warnings],
        "sources": sources_json,
        "hva_ops": _hva_json(rep["hva_ops"]) if not rep["hva_ops"].empty else [],
        "hva_ops_total": _hva_json(rep["hva_ops_total"]) if not rep["hva_ops_total"].empty else [],
        "memslot_updates": mem,
        "by_memslots": bym,
        "hva_ops_hosts": _hva_json(rep["hva_ops_hosts"]) if not rep["hva_ops_hosts"].empty else [],
        "lost_events": rep.lost_events,
        "lost_events_by_source": [{"source": s, "lost_events": int(n)} for s, n in zip(src["source"], src["lost_events"])]
        if not src.empty else [],
    }
