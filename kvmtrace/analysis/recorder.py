"""Writing recordings: the Recorder that streams intervals into a recording directory, and its
per-table writers (Arrow IPC journal + compacted Parquet parts, or CSV). The layout and the
crash model are described in ``recording`` (the readers); what a recording guarantees after
each kind of failure: docs/recording-guarantees.md.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from dataclasses import asdict, is_dataclass
from typing import Dict, Iterable, List, Optional

import pyarrow as pa

from .. import __version__
from ..errors import UsageError
from . import tables as T
from .recording import FORMAT, FORMAT_VERSION, META_FILE, escape_cell


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj, fsync: bool = True) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_to_dict(plan) -> Optional[dict]:
    """ProbePlan (or anything dataclass-like) -> JSON-able dict, provenance included."""
    if plan is None:
        return None
    if is_dataclass(plan):
        return asdict(plan)
    if isinstance(plan, dict):
        return plan
    return {"repr": repr(plan)}


def scanned_provenance_from_plan(plan) -> Dict[str, str]:
    out = {}
    for p in getattr(plan, "ops", ()) or ():
        out[p.op] = str(getattr(p, "scanned", "none"))
    return out


# --------------------------------------------------------------------------------- writing


class _JournalTable:
    """One table in Parquet format: Arrow IPC journal + compacted Parquet parts."""

    def __init__(self, directory: str, name: str, fsync: bool):
        self.dir = os.path.join(directory, name)
        os.makedirs(self.dir, exist_ok=True)
        self.schema = T.SCHEMAS[name]
        self.fsync = fsync
        self.k = 0
        self._f = None
        self._w = None
        self.rows = 0

    def _journal(self, k: int) -> str:
        return os.path.join(self.dir, f"journal-{k:06d}.arrows")

    def _part(self, k: int) -> str:
        return os.path.join(self.dir, f"part-{k:06d}.parquet")

    def append(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._w is None:
            self._f = open(self._journal(self.k), "wb")
            self._w = pa.ipc.new_stream(self._f, self.schema)
        self._w.write_table(table)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.rows += table.num_rows

    def compact(self) -> None:
        if self._w is None:
            return
        import pyarrow.parquet as pq

        self._w.close()
        self._f.close()
        self._w = self._f = None
        src, dst = self._journal(self.k), self._part(self.k)
        tmp = dst + ".tmp"
        with pa.memory_map(src) as m:
            reader = pa.ipc.open_stream(m)
            writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
            pending: List[pa.RecordBatch] = []
            n = 0
            for batch in reader:
                pending.append(batch)
                n += batch.num_rows
                if n >= 1_000_000:
                    writer.write_table(pa.Table.from_batches(pending, self.schema))
                    pending, n = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, self.schema))
            writer.close()
        if self.fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
        if self.fsync:
            _fsync_dir(self.dir)
        os.unlink(src)
        self.k += 1

    def close(self) -> None:
        self.compact()
        if self.k == 0:
            # a table without rows still gets a (empty) part: an empty directory does not survive
            # git, archives or copies that skip empty directories, and readers want every table
            import pyarrow.parquet as pq

            pq.write_table(self.schema.empty_table(), self._part(0))
            self.k = 1


class _CsvTable:
    def __init__(self, directory: str, name: str, fsync: bool):
        self.path = os.path.join(directory, f"{name}.csv")
        self.columns = T.columns(name)
        self.text = [c in T.TEXT_COLUMNS for c in self.columns]
        self.fsync = fsync
        self._f = open(self.path, "w", newline="")
        self._w = csv.writer(self._f, lineterminator="\n")
        self._w.writerow(self.columns)
        self._f.flush()
        self.rows = 0

    def append(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        cols = [table.column(c).to_pylist() for c in self.columns]
        for row in zip(*cols):
            self._w.writerow(
                [
                    ("" if v is None else (escape_cell(v) if t else v))
                    for v, t in zip(row, self.text)
                ]
            )
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.rows += table.num_rows

    def compact(self) -> None:
        pass

    def close(self) -> None:
        self._f.close()


class Recorder:
    """Streams intervals into a recording directory. Use as a context manager; ``write`` once
    per interval with ``snap.delta(prev)`` and the raw events received in that interval.
    ``close`` (or leaving the ``with``) compacts and marks the recording complete."""

    def __init__(
        self,
        path: str,
        fmt: str = "parquet",
        meta: Optional[dict] = None,
        events: bool = False,
        compact_every: int = 300,
        fsync: bool = True,
        plan=None,
    ):
        if fmt not in ("parquet", "csv"):
            raise UsageError(f"unknown recording format {fmt!r}", "use --format parquet or --format csv")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise UsageError(f"{path} already exists", "choose a new path for the recording (it becomes a directory)")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {path}: {e.strerror}", "choose a writable location") from e
        self.path = path
        self.fmt = fmt
        self.events = events
        self.compact_every = max(1, int(compact_every))
        self.fsync = fsync
        self.interval = 0
        self.lost_events = 0
        self.totals = {"hva_ops": 0, "memslot_updates": 0, "hva_events": 0, "memslot_events": 0}
        self._scanned_prov = scanned_provenance_from_plan(plan)
        names = T.AGG_TABLES + (T.EVENT_TABLES if events else ())
        cls = _JournalTable if fmt == "parquet" else _CsvTable
        # "intervals" last: an interval is complete once its intervals row is written.
        order = [n for n in names if n != "intervals"] + ["intervals"]
        self._tables = {n: cls(path, n, fsync) for n in order}
        now = time.time()
        m = dict(meta or {})
        self.meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kvmtrace_version": __version__,
            "storage": fmt,
            "host": m.pop("host", socket.gethostname()),
            "kernel": m.pop("kernel", os.uname().release),
            "label": m.pop("label", ""),
            "start": m.pop("start", now),
            "end": None,
            "status": "recording",
            "intervals": 0,
            "lost_events": 0,
            "events": bool(events),
            "probe_plan": plan_to_dict(plan) if plan is not None else m.pop("probe_plan", None),
            "tables": {n: T.columns(n) for n in order},
        }
        self.meta.update(m)
        self._meta_path = os.path.join(path, META_FILE)
        write_json_atomic(self._meta_path, self.meta, fsync)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(status="complete" if exc_type is None or exc_type is KeyboardInterrupt else "failed")

    def write(self, delta, events: Iterable = ()) -> int:
        """Record one interval; returns its number. ``events``: HvaEvent / MemslotEvent objects."""
        if self._tables is None:
            raise RuntimeError("recorder is closed")
        if not delta.is_delta:
            raise ValueError("Recorder.write needs snap.delta(prev)")
        i = self.interval
        hva_ev, mem_ev = T.split_events(events) if self.events else ([], [])
        rows = T.snapshot_rows(delta, i, self._scanned_prov, len(hva_ev), len(mem_ev))
        for name, tab in self._tables.items():
            if name == "hva_events":
                data = T.to_arrow(name, T.event_columns(hva_ev, name, i))
            elif name == "memslot_events":
                data = T.to_arrow(name, T.event_columns(mem_ev, name, i))
            else:
                data = T.to_arrow(name, rows[name])
            tab.append(data)
        self.interval += 1
        self.lost_events += int(delta.lost_events)
        ir = rows["intervals"][0]
        for k in self.totals:
            self.totals[k] += ir[k]
        if self.interval % self.compact_every == 0:
            for tab in self._tables.values():
                tab.compact()
        self.meta.update(
            end=float(delta.wall_time), intervals=self.interval, lost_events=self.lost_events, totals=dict(self.totals)
        )
        write_json_atomic(self._meta_path, self.meta, self.fsync)
        return i

    def update_meta(self, **kw) -> None:
        self.meta.update(kw)
        write_json_atomic(self._meta_path, self.meta, self.fsync)

    def bytes_on_disk(self) -> int:
        n = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                try:
                    n += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return n

    def close(self, status: str = "complete", **meta) -> None:
        if self._tables is None:
            return
        for tab in self._tables.values():
            tab.close()
        self._tables = None
        self.meta.update(meta)
        self.meta["status"] = status
        if self.meta.get("end") is None:
            self.meta["end"] = time.time()
        write_json_atomic(self._meta_path, self.meta, self.fsync)
