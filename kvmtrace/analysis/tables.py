"""Column layout of every table of a recording, and the conversion of snapshots and raw events
into rows (tidy: one row per interval x VM x op, interval x VM x change, interval, event).

Histograms are stored as fixed columns ``<name>_b00`` .. ``<name>_b63`` (bucket 0 = value 0,
bucket i = [2**(i-1), 2**i)), so they sum with a plain groupby. Provenance columns travel with
every figure group.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from ..consts import LOG2_BUCKETS
from ..snapshot import HvaEvent, HvaEventBatch, Log2Hist, MemslotEvent, Snapshot

I64 = pa.int64()
F64 = pa.float64()
STR = pa.string()
BOOL = pa.bool_()


def hist_columns(prefix: str) -> List[str]:
    return [f"{prefix}_b{i:02d}" for i in range(LOG2_BUCKETS)]


LAT_B = hist_columns("lat")
SLOTS_B = hist_columns("slots")
RANGE_B = hist_columns("range")

_INTERVAL = [("interval", I64), ("t_start", F64), ("t_end", F64), ("elapsed_s", F64)]
_VM = [
    ("vm_id", STR),
    ("pid", I64),
    ("comm", STR),
    ("name", STR),
    ("memslots", I64),  # VM memslot count at interval end; -1 unknown
    ("memslots_provenance", STR),
    ("ordinal", I64),  # n-th VM of its VMM process while traced (VmInfo.ordinal); 0 = predates the trace
    ("memslots_max", I64),  # largest memslot count of the VM seen while traced; -1 unknown
]

SCHEMAS: Dict[str, pa.Schema] = {
    "intervals": pa.schema(
        [
            ("interval", I64),
            ("seq", I64),
            ("t_start", F64),
            ("t_end", F64),
            ("elapsed_s", F64),
            ("lost_events", I64),
            ("map_full", I64),
            ("unattributed", I64),
            ("self_cpu_s", F64),
            ("vms", I64),
            ("hva_ops", I64),
            ("memslot_updates", I64),
            ("hva_events", I64),
            ("memslot_events", I64),
            # kvmtrace's own cost in the interval (Snapshot.cost); null: BPF statistics unavailable
            ("bpf_run_ns", I64),
            ("bpf_run_cnt", I64),
            ("bpf_stats_s", F64),  # seconds BPF statistics were on (sampled: part of the interval)
            ("late_s", F64),  # the snapshot came this much later than its interval asked
        ]
    ),
    "vms": pa.schema(
        _INTERVAL
        + _VM
        + [("vcpus", I64), ("partial", BOOL), ("alive", BOOL)]
    ),
    "hva": pa.schema(
        _INTERVAL
        + _VM
        + [
            ("op", STR),
            ("count", I64),
            ("lat_count", I64),
            ("lat_sum_ns", I64),
            ("lat_max_ns", I64),  # cumulative maximum since attach (a max cannot be differenced)
            ("lat_provenance", STR),
            ("slots_count", I64),
            ("slots_sum", I64),
            ("slots_max", I64),  # cumulative maximum since attach
            ("slots_provenance", STR),
            ("scanned_sum", I64),  # null: not a linear-scan kernel
            ("scanned_provenance", STR),
            ("scanned_max", I64),  # cumulative maximum since attach; null: not measured
            ("underived", I64),  # ops whose slots figure could not be derived (counted, never guessed)
        ]
        + [(c, I64) for c in LAT_B + SLOTS_B + RANGE_B]
    ),
    # hva ops by the VM's memslot count AT THE OPERATION (log2 bucket), aggregated in the kernel
    "by_memslots": pa.schema(
        _INTERVAL
        + [("vm_id", STR), ("pid", I64)]
        + [
            ("op", STR),
            ("bucket", I64),  # log2 bucket of the memslot count (0 = none, i = [2**(i-1), 2**i))
            ("memslots_max", I64),  # largest memslot count seen in the bucket (cumulative maximum)
            ("count", I64),
            ("lat_count", I64),
            ("lat_sum_ns", I64),
            ("lat_provenance", STR),
            ("slots_count", I64),
            ("slots_sum", I64),
            ("slots_provenance", STR),
            ("scanned_sum", I64),  # null: not a linear-scan kernel
        ]
    ),
    "memslot": pa.schema(
        _INTERVAL
        + _VM
        + [
            ("change", STR),
            ("count", I64),
            ("errors", I64),
            ("lat_sum_ns", I64),
            ("lat_max_ns", I64),  # cumulative maximum since attach
            ("lat_provenance", STR),
            ("change_provenance", STR),
        ]
        + [(c, I64) for c in LAT_B]
    ),
    "hva_events": pa.schema(
        [
            ("interval", I64),
            ("ts_ns", I64),
            ("vm_id", STR),
            ("pid", I64),
            ("tid", I64),
            ("op", STR),
            ("start", I64),
            ("end", I64),
            ("latency_ns", I64),
            ("slots", I64),
            ("scanned", I64),
            ("memslots", I64),
            ("lat_provenance", STR),
            ("slots_provenance", STR),
        ]
    ),
    "memslot_events": pa.schema(
        [
            ("interval", I64),
            ("ts_ns", I64),
            ("vm_id", STR),
            ("pid", I64),
            ("tid", I64),
            ("change", STR),
            ("slot", I64),
            ("as_id", I64),
            ("gpa", I64),
            ("size", I64),
            ("hva", I64),
            ("flags", I64),
            ("result", I64),
            ("latency_ns", I64),
            ("lat_provenance", STR),
            ("change_provenance", STR),
        ]
    ),
}

# Tables always present in a recording; event tables only when raw events were recorded.
AGG_TABLES = ("intervals", "vms", "hva", "memslot", "by_memslots")
EVENT_TABLES = ("hva_events", "memslot_events")
TEXT_COLUMNS = {"vm_id", "comm", "name", "op", "change"}  # user-influenced text (CSV escaping)


def columns(table: str) -> List[str]:
    return list(SCHEMAS[table].names)


# Columns added to a table after recordings without them were written, with the value an older
# recording stands for (unknown / not measured). Readers fill them in (``upgrade``), so older
# recordings keep reading; tables added later (by_memslots) are simply absent from them.
ADDED_COLUMNS: Dict[str, Dict[str, object]] = {
    "intervals": {"bpf_run_ns": None, "bpf_run_cnt": None, "bpf_stats_s": None, "late_s": 0.0},
    "vms": {"ordinal": 0, "memslots_max": -1},
    "hva": {"ordinal": 0, "memslots_max": -1, "scanned_max": None, "underived": 0},
    "memslot": {"ordinal": 0, "memslots_max": -1},
}


def legacy_names(table: str) -> List[str]:
    """The table's columns as written before ADDED_COLUMNS existed."""
    added = ADDED_COLUMNS.get(table, {})
    return [n for n in SCHEMAS[table].names if n not in added]


def upgrade(table: str, t: pa.Table) -> pa.Table:
    """An older table (its columns = ``legacy_names``) -> the current schema, the added columns
    filled with their 'unknown' value. Tables already current, or of another shape, are
    returned unchanged (the caller's schema check then judges them)."""
    added = ADDED_COLUMNS.get(table)
    if not added or t.column_names != legacy_names(table):
        return t
    schema = SCHEMAS[table]
    cols = []
    for f in schema:
        if f.name in added:
            cols.append(pa.array([added[f.name]] * t.num_rows, type=f.type))
        else:
            cols.append(t.column(f.name).cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _i64(v) -> int:
    """Fit an unsigned kernel value into int64 (addresses above 2**63 wrap, as in C)."""
    v = int(v)
    if v >= 1 << 63:
        v -= 1 << 64
    return v


def snapshot_rows(
    delta: Snapshot,
    interval: int,
    scanned_provenance: Optional[Dict[str, str]] = None,
    n_hva_events: int = 0,
    n_memslot_events: int = 0,
) -> Dict[str, List[dict]]:
    """Rows of every aggregate table for one interval. ``delta`` is ``snap.delta(prev)``.
    Rows whose figures did not change in the interval are left out (zero rows carry nothing)."""
    if not delta.is_delta:
        raise ValueError("snapshot_rows needs an interval (snap.delta(prev)), not a cumulative snapshot")
    t_end = float(delta.wall_time)
    t_start = t_end - float(delta.elapsed_s)
    base = {"interval": interval, "t_start": t_start, "t_end": t_end, "elapsed_s": float(delta.elapsed_s)}
    vms = {v.vm_id: v for v in delta.vms}
    scanned_provenance = scanned_provenance or {}

    def vm_cols(vm_id: str, pid: int) -> dict:
        v = vms.get(vm_id)
        if v is None:
            return {"vm_id": vm_id, "pid": pid, "comm": "", "name": "", "memslots": -1, "memslots_provenance": "none",
                    "ordinal": 0, "memslots_max": -1}
        mx = getattr(v, "memslots_max", None)
        return {
            "vm_id": vm_id,
            "pid": pid or v.pid,
            "comm": v.comm,
            "name": v.name,
            "memslots": -1 if v.memslots is None else int(v.memslots),
            "memslots_provenance": v.memslots_provenance if v.memslots is not None else "none",
            "ordinal": int(getattr(v, "ordinal", 0) or 0),
            "memslots_max": -1 if mx is None else int(mx),
        }

    out: Dict[str, List[dict]] = {"intervals": [], "vms": [], "hva": [], "memslot": [], "by_memslots": []}
    for v in delta.vms:
        r = dict(base)
        r.update(vm_cols(v.vm_id, v.pid))
        r.update({"vcpus": -1 if v.vcpus is None else int(v.vcpus), "partial": bool(v.partial), "alive": bool(v.alive)})
        out["vms"].append(r)
    hva_total = 0
    for h in delta.hva:
        if h.count == 0 and h.lat_count == 0 and h.slots_count == 0:
            continue
        hva_total += h.count
        r = dict(base)
        r.update(vm_cols(h.vm_id, h.pid))
        sprov = scanned_provenance.get(h.op) or (h.slots_provenance if h.scanned_sum is not None else "none")
        r.update(
            {
                "op": h.op,
                "count": int(h.count),
                "lat_count": int(h.lat_count),
                "lat_sum_ns": int(h.lat_sum_ns),
                "lat_max_ns": int(h.lat_max_ns),
                "lat_provenance": str(h.lat_provenance),
                "slots_count": int(h.slots_count),
                "slots_sum": int(h.slots_sum),
                "slots_max": int(h.slots_max),
                "slots_provenance": str(h.slots_provenance),
                "scanned_sum": None if h.scanned_sum is None else int(h.scanned_sum),
                "scanned_provenance": str(sprov) if h.scanned_sum is not None else "none",
                "scanned_max": None if getattr(h, "scanned_max", None) is None else int(h.scanned_max),
                "underived": int(getattr(h, "underived", 0) or 0),
            }
        )
        r.update(zip(LAT_B, h.lat_hist.counts))
        r.update(zip(SLOTS_B, h.slots_hist.counts))
        r.update(zip(RANGE_B, h.range_hist.counts))
        out["hva"].append(r)
    for b in delta.by_memslots:
        if b.count == 0:
            continue
        r = dict(base)
        r.update(
            {
                "vm_id": b.vm_id,
                "pid": int(b.pid),
                "op": b.op,
                "bucket": int(b.bucket),
                "memslots_max": int(b.memslots_max),
                "count": int(b.count),
                "lat_count": int(b.lat_count),
                "lat_sum_ns": int(b.lat_sum_ns),
                "lat_provenance": str(b.lat_provenance),
                "slots_count": int(b.slots_count),
                "slots_sum": int(b.slots_sum),
                "slots_provenance": str(b.slots_provenance),
                "scanned_sum": None if b.scanned_sum is None else int(b.scanned_sum),
            }
        )
        out["by_memslots"].append(r)
    mem_total = 0
    for m in delta.memslot:
        if m.count == 0 and m.errors == 0:
            continue
        mem_total += m.count
        r = dict(base)
        r.update(vm_cols(m.vm_id, m.pid))
        r.update(
            {
                "change": m.change,
                "count": int(m.count),
                "errors": int(m.errors),
                "lat_sum_ns": int(m.lat_sum_ns),
                "lat_max_ns": int(m.lat_max_ns),
                "lat_provenance": str(m.lat_provenance),
                "change_provenance": str(m.change_provenance),
            }
        )
        r.update(zip(LAT_B, m.lat_hist.counts))
        out["memslot"].append(r)
    out["intervals"].append(
        {
            "interval": interval,
            "seq": int(delta.seq),
            "t_start": t_start,
            "t_end": t_end,
            "elapsed_s": float(delta.elapsed_s),
            "lost_events": int(delta.lost_events),
            "map_full": int(delta.map_full),
            "unattributed": int(delta.unattributed),
            "self_cpu_s": float(delta.self_cpu_s),
            "vms": len(delta.vms),
            "hva_ops": hva_total,
            "memslot_updates": mem_total,
            "hva_events": int(n_hva_events),
            "memslot_events": int(n_memslot_events),
            "bpf_run_ns": int(delta.cost.bpf_run_ns) if delta.cost.measured else None,
            "bpf_run_cnt": int(delta.cost.bpf_run_cnt) if delta.cost.measured else None,
            # seconds the statistics were on in the interval (sampled: a part of elapsed_s)
            "bpf_stats_s": float(delta.cost.on_seconds(delta.elapsed_s)) if delta.cost.measured else None,
            "late_s": float(delta.late_s),
        }
    )
    return out


_HVA_EV_FIELDS = [c for c in columns("hva_events") if c != "interval"]
_MEM_EV_FIELDS = [c for c in columns("memslot_events") if c != "interval"]
_WRAP = {"start", "end", "gpa", "hva", "size"}


class EventColumns:
    """Raw hva events as columns (numpy arrays), from the tracer's HvaEventBatch objects: no
    Python object per event on the way to disk. ``len()`` is the number of events."""

    def __init__(self, cols: Dict[str, np.ndarray]) -> None:
        self.cols = cols

    def __len__(self) -> int:
        return len(self.cols["ts_ns"])


def _hva_columns(batches: list, objs: list) -> EventColumns:
    cols = {}
    for f in _HVA_EV_FIELDS:
        parts = [np.asarray(b.column(f)) for b in batches]
        if objs:
            vals = [getattr(e, f) for e in objs]
            parts.append(np.asarray([_i64(v) for v in vals] if f in _WRAP else vals,
                                    dtype=object if isinstance(vals[0], str) else np.int64))
        cols[f] = np.concatenate(parts)
    return EventColumns(cols)


def event_columns(events: Sequence, table: str, interval: int) -> Dict[str, list]:
    """Column lists (not rows: cheaper for millions of events) for a batch of raw events."""
    if isinstance(events, EventColumns):
        cols = dict(events.cols)
        cols["interval"] = np.full(len(events), interval, dtype=np.int64)
        return cols
    fields = _HVA_EV_FIELDS if table == "hva_events" else _MEM_EV_FIELDS
    cols: Dict[str, list] = {"interval": [interval] * len(events)}
    for f in fields:
        vals = [getattr(e, f) for e in events]
        if f in _WRAP:
            vals = [_i64(v) for v in vals]
        cols[f] = vals
    return cols


def split_events(events: Iterable) -> Tuple[list, list]:
    """(hva events, memslot events); hva events as EventColumns when the tracer gave columns
    (HvaEventBatch)."""
    hva, mem, batches = [], [], []
    for e in events:
        if isinstance(e, HvaEvent):
            hva.append(e)
        elif isinstance(e, MemslotEvent):
            mem.append(e)
        elif isinstance(e, HvaEventBatch):
            batches.append(e)
    if batches:
        return _hva_columns(batches, hva), mem
    return hva, mem


def to_arrow(table: str, rows_or_cols) -> pa.Table:
    """rows (list of dicts) or columns (dict of lists) -> arrow table with the table's schema."""
    schema = SCHEMAS[table]
    if isinstance(rows_or_cols, dict):
        return pa.table({n: pa.array(rows_or_cols[n], type=schema.field(n).type) for n in schema.names}, schema=schema)
    return pa.Table.from_pylist(list(rows_or_cols), schema=schema)


def empty_frame(table: str) -> pd.DataFrame:
    return SCHEMAS[table].empty_table().to_pandas()


def frames_from_snapshots(
    snapshots: Sequence[Snapshot], scanned_provenance: Optional[Dict[str, str]] = None
) -> Dict[str, pd.DataFrame]:
    """Cumulative snapshots (in order) -> one tidy frame per aggregate table, interval numbers
    from 0. Pure; used by tests and by in-memory consumers."""
    rows: Dict[str, List[dict]] = {t: [] for t in AGG_TABLES}
    prev = None
    for i, snap in enumerate(snapshots):
        d = snap if snap.is_delta else snap.delta(prev)
        prev = snap
        for t, rs in snapshot_rows(d, i, scanned_provenance).items():
            rows[t].extend(rs)
    return {t: to_arrow(t, rs).to_pandas() for t, rs in rows.items()}


def events_frame(events: Sequence, table: str, interval: int = 0) -> pd.DataFrame:
    return to_arrow(table, event_columns(list(events), table, interval)).to_pandas()


def log2_buckets(values: np.ndarray) -> np.ndarray:
    """Vectorised consts' log2 bucket rule: 0 -> 0, v -> bit length of v."""
    v = np.asarray(values, dtype=np.int64)
    b = np.zeros(v.shape, dtype=np.int64)
    pos = v > 0
    b[pos] = np.floor(np.log2(v[pos])).astype(np.int64) + 1
    # guard against float rounding at exact powers of two
    b[pos] = np.where(v[pos] >= (np.int64(1) << b[pos]), b[pos] + 1, b[pos])
    b[pos] = np.where(v[pos] < (np.int64(1) << (b[pos] - 1)), b[pos] - 1, b[pos])
    return np.minimum(b, LOG2_BUCKETS - 1)


def hist_sum(df: pd.DataFrame, cols: List[str]) -> np.ndarray:
    """Summed histogram counts over the rows of ``df``."""
    if df.empty:
        return np.zeros(len(cols), dtype=np.int64)
    return df[cols].to_numpy(dtype=np.int64).sum(axis=0)


def hist_quantiles(counts, qs: Sequence[float]) -> List[Optional[float]]:
    h = Log2Hist.from_counts([int(c) for c in counts])
    return [h.quantile(q) for q in qs]
