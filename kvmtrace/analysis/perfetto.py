"""One recording as a Perfetto trace (``kvmtrace export --perfetto``), for the Perfetto UI and
trace_processor. Written with the TracePacket protos the ``perfetto`` package ships
(perfetto.protos.perfetto.trace.perfetto_trace_pb2), streamed: packets are serialised in small
batches, so memory stays bounded whatever the number of raw events.

Layout of the trace (TrackEvent, https://perfetto.dev/docs/reference/synthetic-track-event):

* one track per VM, named by its label (``web1[4242]#2``: the report's name, escaped), its
  description carrying vm id, pid, comm and guest name (escaped: names are data);
* under it, the VM's slices: one per hva operation (named after the op: unmap, age, ...) on
  tracks named "hva ops", one per memslot update (named "memslot <change>") on tracks named
  "memslot updates". Operations of one VM overlap in time (several threads, and in tracepoint
  mode the latency is the enclosing system call's), and slices on one Perfetto track must
  nest, so each kind spreads over as few tracks ("lanes", same name, merged into one by the UI)
  as its overlaps need. Each slice carries its figures as debug annotations: range (start, end,
  bytes), memslots visited and scanned, the VM's memslot count, tid, latency and provenance;
  memslot updates: slot, address space, gpa, size, hva, flags, result. An operation of unknown
  latency is an instant event;
* counter tracks per VM: "<op> ops/s" per hva op and "memslot <change>/s" per change type, one
  value per recorded interval (count / interval length, set at the interval's start), and one
  "lost events" counter (events per interval) for the whole recording.

Time: raw events carry CLOCK_MONOTONIC (bpf_ktime_get_ns), intervals wall-clock times. Trace
timestamps are CLOCK_MONOTONIC nanoseconds; intervals are placed with the recording's clock pair
(``clock`` in the metadata: wall and monotonic time of one snapshot). Recordings written
before the pair was stored: the offset is estimated from the raw events (each event was drained
before its interval's snapshot: the latest one bounds it), or, without raw events, intervals
stay on the wall clock. ``ExportSummary.clock`` says which.

Slices exist only in recordings made with ``record --events``; without raw events the trace
holds the counters only (``ExportSummary.slices`` is 0 and the command says so).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from time import monotonic as _now
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import pandas as pd

from ..errors import UsageError
from ..text import printable
from . import engine as E
from . import tables as T
from .recording import EventTable, Recording

SEQUENCE_ID = 0x6B76  # trusted_packet_sequence_id of every packet ("kv")
BATCH = 512  # packets per serialised Trace message (a Trace file is a concatenation of them)
HVA_LANES = "hva ops"
MEM_LANES = "memslot updates"
LOST = "lost events"
_STREAM_ROWS = 8192  # raw events per Arrow batch from the engine (progress is reported between batches)

CLOCK_RECORDED = "recorded clock pair"
CLOCK_ESTIMATED = "estimated from raw events (recording without a clock pair)"
CLOCK_WALL = "wall clock (recording without raw events or a clock pair)"

_HVA_COLS = ["ts_ns", "vm_id", "pid", "tid", "op", "start", "end", "latency_ns", "slots", "scanned",
             "memslots", "lat_provenance", "slots_provenance"]
_MEM_COLS = ["ts_ns", "vm_id", "pid", "tid", "change", "slot", "as_id", "gpa", "size", "hva", "flags",
             "result", "latency_ns", "lat_provenance", "change_provenance"]


def protos():
    """The Trace / TracePacket protos of the ``perfetto`` package, or a usage error naming the fix."""
    try:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2
    except ImportError as e:
        raise UsageError("the perfetto Python package is missing (kvmtrace writes Perfetto traces with its protos)",
                         "pip install perfetto (it is in kvmtrace's install_requires)") from e
    return perfetto_trace_pb2


@dataclass
class ExportSummary:
    vms: int = 0
    hva_slices: int = 0
    memslot_slices: int = 0
    counters: int = 0  # counter values written
    lanes: int = 0
    has_events: bool = False
    clock: str = CLOCK_RECORDED
    packets: int = 0
    bytes: int = 0

    @property
    def slices(self) -> int:
        return self.hva_slices + self.memslot_slices


class _Out:
    """TracePackets written to a binary file in batches. ``new()`` returns a fresh packet; it is
    queued and serialised with its batch once ``BATCH`` packets are queued (or at ``flush``)."""

    def __init__(self, f: BinaryIO, pb):
        self.f = f
        self.pb = pb
        self.queue: List = []
        self.packets = 0
        self.bytes = 0

    def new(self):
        if len(self.queue) >= BATCH:
            self.flush()
        p = self.pb.TracePacket()
        p.trusted_packet_sequence_id = SEQUENCE_ID
        self.queue.append(p)
        self.packets += 1
        return p

    def flush(self) -> None:
        if not self.queue:
            return
        t = self.pb.Trace()
        t.packet.extend(self.queue)
        data = t.SerializeToString()
        self.f.write(data)
        self.bytes += len(data)
        self.queue = []


def _annotate(ev, name: str, value) -> None:
    a = ev.debug_annotations.add()
    a.name = name
    if isinstance(value, str):
        a.string_value = value
    elif isinstance(value, float):
        a.double_value = value
    elif value < 0:
        a.int_value = int(value)
    else:
        a.uint_value = int(value)


def _pointer(ev, name: str, value: int) -> None:
    a = ev.debug_annotations.add()
    a.name = name
    a.pointer_value = int(value) & 0xFFFFFFFFFFFFFFFF


def _text(v) -> str:
    """A name or label from the recording as protobuf text: valid UTF-8, nothing a viewer acts on."""
    return printable("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)


class _Tracks:
    """Track descriptors, each written once before its first event."""

    def __init__(self, out: _Out, summary: ExportSummary):
        self.out = out
        self.summary = summary
        self.next_uuid = 1
        self.vm: Dict[Tuple[str, int], int] = {}
        self.vm_label: Dict[Tuple[str, int], str] = {}
        self.counter: Dict[tuple, int] = {}
        # (vm key, kind) -> lanes: busy heap of (end, lane), free heap of lanes, lane -> uuid
        self.lanes: Dict[tuple, list] = {}

    def _uuid(self) -> int:
        u = self.next_uuid
        self.next_uuid += 1
        return u

    def _descriptor(self, uuid: int, name: str, parent: Optional[int] = None, description: str = "", rank: int = 0):
        p = self.out.new()
        d = p.track_descriptor
        d.uuid = uuid
        d.name = name
        if parent is not None:
            d.parent_uuid = parent
            d.sibling_order_rank = rank
        if description:
            d.description = description
        return d

    def add_vm(self, key: Tuple[str, int], info: dict) -> int:
        if key in self.vm:
            return self.vm[key]
        from .report import vm_label

        uuid = self._uuid()
        label = info.get("vm_label") or vm_label("", "", key[1], 0)
        desc = (f"vm_id {_text(key[0])}, pid {key[1]}, comm {_text(info.get('comm', ''))}, "
                f"name {_text(info.get('name', ''))}")
        d = self._descriptor(uuid, _text(label), description=desc)
        d.child_ordering = d.EXPLICIT
        self.vm[key] = uuid
        self.vm_label[key] = _text(label)
        self.summary.vms += 1
        return uuid

    def counter_track(self, key: tuple, name: str, parent: Optional[int], unit: str, rank: int) -> int:
        if key in self.counter:
            return self.counter[key]
        uuid = self._uuid()
        d = self._descriptor(uuid, name, parent, rank=rank)
        d.counter.unit_name = unit
        self.counter[key] = uuid
        return uuid

    def lane(self, vm: Tuple[str, int], kind: str, ts: int, end: int) -> int:
        """A track of ``kind`` under the VM on which [ts, end) overlaps no other slice: the
        lowest-numbered free lane, or a new one."""
        st = self.lanes.get((vm, kind))
        if st is None:
            st = self.lanes[(vm, kind)] = [[], [], []]
        busy, free, uuids = st
        while busy and busy[0][0] <= ts:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane = len(uuids)
            uuid = self._uuid()
            d = self._descriptor(uuid, kind, self.vm[vm], rank=0 if kind == HVA_LANES else 1)
            d.sibling_merge_behavior = d.SIBLING_MERGE_BEHAVIOR_BY_TRACK_NAME
            uuids.append(uuid)
            self.summary.lanes += 1
        heapq.heappush(busy, (end, lane))
        return uuids[lane]


def event_tables(rec: Recording) -> Dict[str, EventTable]:
    """The recording's raw-event tables for the engine: located on disk (``Recording.events``),
    or held in memory (a rotated recording read as one, a recording built by hand)."""
    import pyarrow as pa

    out: Dict[str, EventTable] = {}
    last = int(rec["intervals"]["interval"].max()) if not rec["intervals"].empty else -1
    for name in T.EVENT_TABLES:
        if name in rec.events:
            out[name] = rec.events[name]
        elif name in rec.tables:
            df = rec.tables[name]
            df = df.astype({c: str for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)})
            out[name] = EventTable(name, rec.path, [], [], [pa.Table.from_pandas(df, preserve_index=False)], last)
    return out


def _clock(rec: Recording, con, events: Dict[str, EventTable]) -> Tuple[int, str]:
    """(offset in ns to add to a wall-clock time x 1e9 for CLOCK_MONOTONIC, how it is known)."""
    c = rec.meta.get("clock")
    if isinstance(c, dict):
        wall, mono = c.get("realtime_s"), c.get("monotonic_ns")
        if isinstance(wall, (int, float)) and not isinstance(wall, bool) and math.isfinite(wall) \
                and isinstance(mono, int) and not isinstance(mono, bool):
            return int(mono - round(wall * 1e9)), CLOCK_RECORDED
    if not events:
        return 0, CLOCK_WALL
    iv = rec["intervals"]
    ends = {int(i): float(t) for i, t in zip(iv["interval"], iv["t_end"])}
    best = None
    for name, et in events.items():
        rel = E.union_sql(con, [(0, et)], ["interval", "ts_ns"])
        if not rel:
            continue
        df = E._query(con, f"SELECT interval, max(ts_ns) AS ts FROM ({rel}) GROUP BY interval")
        for i, ts in zip(df["interval"].tolist(), df["ts"].tolist()):
            if int(i) in ends:
                off = int(ts) - round(ends[int(i)] * 1e9)
                best = off if best is None else max(best, off)
    if best is None:
        return 0, CLOCK_WALL
    return best, CLOCK_ESTIMATED


def _vm_infos(rec: Recording) -> Dict[Tuple[str, int], dict]:
    """(vm_id, pid) -> comm, name, vm_label, as the report names VMs (vms table first)."""
    from .report import _last_vm_info, _norm_keys

    info: Dict[Tuple[str, int], dict] = {}
    for t in ("memslot", "hva", "vms"):
        df = rec[t]
        if not df.empty:
            info.update(_last_vm_info(_norm_keys(df, ["vm_id", "pid"])))
    return info


def _counter_samples(rec: Recording, offset: int) -> List[tuple]:
    """(ts, kind, vm key, name, value) of every counter, sorted by time: per VM and op (and
    change type) count / interval length at each interval's start; lost events per interval."""
    iv = rec["intervals"].sort_values("interval")
    out: List[tuple] = []
    starts = {int(i): (int(round(float(t) * 1e9)) + offset, float(e))
              for i, t, e in zip(iv["interval"], iv["t_start"], iv["elapsed_s"])}
    for table, col, prefix in (("hva", "op", ""), ("memslot", "change", "memslot ")):
        df = rec[table]
        if df.empty:
            continue
        g = df.groupby([df["vm_id"].astype(str), df["pid"].astype("int64"), df[col].astype(str),
                        df["interval"].astype("int64")], sort=True)["count"].sum()
        keys = sorted({k[:3] for k in g.index})
        for vm_id, pid, name in keys:
            for i, (ts, el) in starts.items():
                if el <= 0:
                    continue
                n = int(g.get((vm_id, pid, name, i), 0))
                out.append((ts, 1, (vm_id, pid), f"{prefix}{name}", n / el))
    for i, lost in zip(iv["interval"], iv["lost_events"]):
        if int(i) in starts:
            out.append((starts[int(i)][0], 0, None, LOST, int(lost)))
    out.sort(key=lambda s: (s[0], s[1], s[2] or ("", 0), s[3]))
    return out


def _event_sql(con, events: Dict[str, EventTable]) -> str:
    """One relation over the recording's raw hva and memslot events, in time order."""
    parts = []
    null = "CAST(NULL AS BIGINT)"
    nulls = "CAST(NULL AS VARCHAR)"
    if "hva_events" in events:
        rel = E.union_sql(con, [(0, events["hva_events"])], ["interval"] + _HVA_COLS)
        if rel:
            parts.append(f"""SELECT 0 AS kind, ts_ns, vm_id, pid, tid, op AS name, latency_ns, lat_provenance,
                "start", "end", slots, scanned, memslots, slots_provenance,
                {null} AS slot, {null} AS as_id, {null} AS gpa, {null} AS size, {null} AS hva,
                {null} AS flags, {null} AS result, {nulls} AS change_provenance FROM ({rel})""")
    if "memslot_events" in events:
        rel = E.union_sql(con, [(0, events["memslot_events"])], ["interval"] + _MEM_COLS)
        if rel:
            parts.append(f"""SELECT 1 AS kind, ts_ns, vm_id, pid, tid, change AS name, latency_ns, lat_provenance,
                {null} AS "start", {null} AS "end", {null} AS slots, {null} AS scanned, {null} AS memslots,
                {nulls} AS slots_provenance, slot, as_id, gpa, size, hva, flags, result, change_provenance
                FROM ({rel})""")
    if not parts:
        return ""
    return "SELECT * FROM (" + "\nUNION ALL\n".join(parts) + ") ORDER BY ts_ns, kind"


def export_perfetto(rec: Recording, f: BinaryIO, progress: Optional[Callable[[int, int], None]] = None) -> ExportSummary:
    """Write ``rec`` as a Perfetto trace to the binary file ``f`` (see the module doc).
    ``progress(done, total)`` is called about once a second while raw events are written."""
    pb = protos()
    summary = ExportSummary()
    out = _Out(f, pb)
    tracks = _Tracks(out, summary)
    TE = pb.TrackEvent
    events = event_tables(rec)
    summary.has_events = bool(events)
    con = E.connect() if events else None
    try:
        offset, summary.clock = _clock(rec, con, events)
        infos = _vm_infos(rec)
        for key in sorted(infos):
            tracks.add_vm(key, infos[key])
        root = tracks._uuid()
        tracks._descriptor(root, _text(f"kvmtrace {rec.source}"),
                           description=_text(f"host {rec.meta.get('host', '')}, kernel {rec.meta.get('kernel', '')}"))
        samples = _counter_samples(rec, offset)
        names = sorted({(s[2], s[3]) for s in samples if s[2] is not None})
        for rank, (vm, name) in enumerate(names):
            tracks.add_vm(vm, infos.get(vm, {}))
            tracks.counter_track(("vm", vm, name), f"{name}/s", tracks.vm[vm], "ops/s", rank + 2)
        tracks.counter_track(("rec", LOST), LOST, root, "events", 0)
        si = 0

        def counters_upto(ts: Optional[int]) -> None:
            nonlocal si
            while si < len(samples) and (ts is None or samples[si][0] <= ts):
                s = samples[si]
                si += 1
                uuid = tracks.counter[("vm", s[2], s[3]) if s[2] is not None else ("rec", LOST)]
                p = out.new()
                p.timestamp = s[0]
                e = p.track_event
                e.type = TE.TYPE_COUNTER
                e.track_uuid = uuid
                if isinstance(s[4], int):
                    e.counter_value = s[4]
                else:
                    e.double_counter_value = s[4]
                summary.counters += 1

        ends: List[tuple] = []  # (end ts, order, track uuid): slices still open

        def ends_upto(ts: Optional[int]) -> None:
            while ends and (ts is None or ends[0][0] <= ts):
                end, _, uuid = heapq.heappop(ends)
                counters_upto(end)
                p = out.new()
                p.timestamp = end
                e = p.track_event
                e.type = TE.TYPE_SLICE_END
                e.track_uuid = uuid

        sql = _event_sql(con, events) if con is not None else ""
        if sql:
            iv = rec["intervals"]
            total = int(iv["hva_events"].sum() + iv["memslot_events"].sum())
            done = 0
            last_report = _now()
            reader = _stream(con, sql, _STREAM_ROWS)
            order = 0
            for batch in reader:
                cols = batch.to_pydict()
                for row in zip(*(cols[c] for c in batch.schema.names)):
                    (kind, ts, vm_id, pid, tid, name, lat, lprov, start, end, slots, scanned, memslots, sprov,
                     slot, as_id, gpa, size, hva, flags, result, cprov) = row
                    ts, pid = int(ts), int(pid)
                    ends_upto(ts)
                    counters_upto(ts)
                    vm = (str(vm_id), pid)
                    if vm not in tracks.vm:
                        tracks.add_vm(vm, infos.get(vm, {}))
                    known = lat is not None and lat >= 0
                    stop = ts + int(lat) if known else ts
                    uuid = tracks.lane(vm, HVA_LANES if kind == 0 else MEM_LANES, ts, stop)
                    p = out.new()
                    p.timestamp = ts
                    e = p.track_event
                    e.track_uuid = uuid
                    e.type = TE.TYPE_SLICE_BEGIN if known else TE.TYPE_INSTANT
                    if kind == 0:
                        e.name = _text(name)
                        e.categories.append("hva")
                        _annotate(e, "op", _text(name))
                        _pointer(e, "start", start)
                        _pointer(e, "end", end)
                        _annotate(e, "range_bytes", int(end) - int(start))
                        _annotate(e, "slots_visited", int(slots) if slots is not None and slots >= 0 else "unknown")
                        _annotate(e, "slots_scanned", int(scanned) if scanned is not None and scanned >= 0
                                  else "not measured")
                        _annotate(e, "memslots", int(memslots) if memslots is not None and memslots >= 0 else "unknown")
                        _annotate(e, "slots_provenance", _text(sprov))
                        summary.hva_slices += 1
                    else:
                        e.name = _text(f"memslot {name}")
                        e.categories.append("memslot")
                        _annotate(e, "change", _text(name))
                        _annotate(e, "slot", int(slot))
                        _annotate(e, "as_id", int(as_id))
                        _pointer(e, "gpa", gpa)
                        _annotate(e, "size", int(size))
                        _pointer(e, "hva", hva)
                        _annotate(e, "flags", int(flags))
                        _annotate(e, "result", int(result))
                        _annotate(e, "change_provenance", _text(cprov))
                        summary.memslot_slices += 1
                    _annotate(e, "latency_ns", int(lat) if known else "unknown")
                    _annotate(e, "lat_provenance", _text(lprov))
                    _annotate(e, "tid", int(tid))
                    if known:
                        order += 1
                        heapq.heappush(ends, (stop, order, uuid))
                    done += 1
                if progress is not None and _now() - last_report >= 1.0:
                    progress(done, total)
                    last_report = _now()
            if progress is not None and done and _now() - last_report < 1.0 and done != total:
                progress(done, total)
        ends_upto(None)
        counters_upto(None)
        out.flush()
    finally:
        if con is not None:
            con.close()
    summary.packets, summary.bytes = out.packets, out.bytes
    return summary


def _stream(con, sql: str, rows: int):
    """The query's rows as Arrow record batches, streamed (DuckDB sorts out of core, spilling
    beyond the engine's memory limit). Damage found while scanning: one DataFileError."""
    import duckdb
    import pyarrow as pa

    from ..errors import DataFileError

    try:
        rel = con.sql(sql)
        reader = (rel.to_arrow_reader if hasattr(rel, "to_arrow_reader") else rel.record_batch)(rows)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield batch
    except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException):
        raise  # kvmtrace's own SQL is wrong: a bug, not bad input
    except duckdb.OutOfMemoryException as e:
        raise UsageError(f"raw-event scan ran out of memory: {str(e).splitlines()[0]}",
                         f"raise KVMTRACE_ENGINE_MEMORY (now {E.MEMORY_LIMIT}) or free space in the "
                         "temporary directory (the engine spills there)") from e
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        raise DataFileError(f"raw events unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                            "the recording was damaged after it was written (a Parquet part's data); "
                            "restore it from a copy") from e
