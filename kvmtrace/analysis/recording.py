"""Recordings on disk: the layout and the readers (the writer, ``Recorder``, is in ``recorder``).

A recording is a directory::

    PATH/kvmtrace-recording.json        metadata (format, version, host, kernel, label, probe plan
                                        with provenance, start/end, lost events, status, tables)
    Parquet format:
    PATH/<table>/journal-NNNNNN.arrows  Arrow IPC stream, one record batch per interval, flushed
                                        (and fsynced) after every interval
    PATH/<table>/part-NNNNNN.parquet    the journal with the same number, compacted into Parquet
    CSV format:
    PATH/<table>.csv                    rows appended and flushed after every interval

Why a journal and not one ParquetWriter per table: a Parquet file is unreadable until its footer
is written at close, so a crash would lose everything. An Arrow IPC stream is readable up to its
last complete record batch, so a crash loses at most the interval being written. Every
``compact_every`` intervals (and at close) the journal is rewritten as a Parquet part
(``part-K.parquet.tmp``, fsync, atomic rename, then the journal is removed). A crash between the
rename and the removal leaves both files: readers take the part and ignore the journal of the
same number. Memory stays bounded by one interval (writing) or one record batch (compacting),
however long the recording runs.

The ``intervals`` table is written last in every interval; readers keep only rows of intervals
that reached it, so all tables agree on which intervals are complete.

Tables and columns: ``tables.SCHEMAS``. Metadata is rewritten atomically (tmp + rename) after
every interval, so it always states how far the recording got.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence

import pandas as pd
import pyarrow as pa

from .. import __version__
from ..errors import DataFileError
from ..output import escape_cell, unescape_cell  # noqa: F401 (the one cell policy; the recorder imports it here)
from . import integrity
from . import tables as T

FORMAT = "kvmtrace-recording"
FORMAT_VERSION = 1
META_FILE = "kvmtrace-recording.json"
BENCH_FORMAT = "kvmtrace-bench"
BENCH_VERSION = 1
BENCH_FILE = "kvmtrace-bench.json"

_WRITER_NAMES = ("Recorder", "write_json_atomic", "plan_to_dict", "scanned_provenance_from_plan")


def __getattr__(name):
    """The writer moved to ``recorder``; ``from .recording import Recorder`` keeps working."""
    if name in _WRITER_NAMES:
        from . import recorder

        return getattr(recorder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------- reading


class EventTable:
    """One raw-event table of a recording, NOT loaded: the files that hold it and the last
    complete interval. The engine (analysis/engine.py) scans it out of core; ``to_arrow`` /
    ``load`` materialise it for small recordings and users' own analysis."""

    def __init__(self, name: str, directory: str, parquet: List[str], journals: List[str], arrow: List[pa.Table],
                 last: int):
        self.name = name
        self.directory = directory
        self.parquet = parquet  # Parquet parts, scanned from disk
        self.journals = journals  # Arrow journals of an unfinished recording (their tables are in arrow)
        self.arrow = arrow  # in-memory (memory-mapped journals, CSV) tables
        self.last = last

    def to_arrow(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        import pyarrow.compute as pc

        schema = T.SCHEMAS[self.name]
        cols = list(columns) if columns else None
        parts = [integrity.read_part(f, cols) for f in self.parquet]
        parts += [t.select(cols) if cols else t for t in self.arrow]
        want = schema if not cols else pa.schema([schema.field(c) for c in cols])
        t = pa.concat_tables(parts) if parts else want.empty_table()
        if t.num_rows and "interval" in t.column_names:
            t = t.filter(pc.less_equal(t.column("interval"), self.last))
        return t

    def load(self, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """The whole table as one DataFrame (text columns categorical). Memory grows with the
        number of events: reports never call this; the engine scans the files instead."""
        return _to_pandas(self.to_arrow(columns), True)


class _Tables(Mapping):
    """A recording's tables by name: aggregate tables are DataFrames; event tables are loaded
    (``EventTable.load``) on first access only, so reading a recording costs no event memory."""

    def __init__(self, frames: Dict[str, pd.DataFrame], events: Dict[str, EventTable],
                 columns: Optional[Dict[str, Sequence[str]]] = None):
        self._frames = dict(frames)
        self._events = events
        self._columns = columns or {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._frames and name in self._events:
            cols = self._columns.get(name)
            if cols:
                cols = list(dict.fromkeys(["interval"] + list(cols)))
            self._frames[name] = self._events[name].load(cols)
        return self._frames[name]

    def __setitem__(self, name: str, df: pd.DataFrame) -> None:
        self._frames[name] = df

    def __iter__(self):
        return iter(list(dict.fromkeys(list(self._frames) + list(self._events))))

    def __len__(self) -> int:
        return len(set(self._frames) | set(self._events))

    def __contains__(self, name) -> bool:
        return name in self._frames or name in self._events


class Recording:
    """A recording read back: ``meta`` (dict) and one DataFrame per table (``tables``; raw-event
    tables are loaded only when accessed, ``events`` holds them unloaded for the engine).
    ``source`` names it in merged reports; ``bench`` holds scenario/slots/workload for bench
    runs; ``warnings`` says what was tolerated (unfinished recording, torn last interval)."""

    def __init__(self, path: str, meta: dict, tables, warnings: List[str],
                 events: Optional[Dict[str, EventTable]] = None):
        self.path = path
        self.meta = meta
        self.events: Dict[str, EventTable] = events or {}
        self.tables = tables if isinstance(tables, _Tables) else _Tables(tables, self.events)
        self.warnings = warnings
        self.source = meta.get("label") or os.path.basename(os.path.normpath(path))
        self.bench: Optional[dict] = None

    @property
    def host(self) -> str:
        return str(self.meta.get("host") or "")

    @property
    def has_events(self) -> bool:
        return "hva_events" in self.tables

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


_PART = re.compile(r"^(part|journal)-(\d{6})\.(parquet|arrows)$")


def _committed(checked: Optional[integrity.Checked], table: str, path: str) -> Optional[int]:
    return checked.committed(f"{table}/{os.path.basename(path)}") if checked is not None else None


def _read_journal(path: str, schema: pa.Schema, warnings: List[str], name: str = "",
                  committed: Optional[int] = None) -> pa.Table:
    """An Arrow journal, memory-mapped (its batches reference the page cache, not the heap).
    ``committed``: the bytes the manifest committed (checksummed already); bytes beyond them,
    the interval being written at a crash, are not parsed."""
    batches = []
    try:
        if os.path.getsize(path) == 0:
            return schema.empty_table()
        data = pa.memory_map(os.fsencode(path), "r").read_buffer()
    except OSError as e:
        raise DataFileError(f"{path}: cannot read: {e.strerror}") from e
    if committed is not None and data.size > committed:
        warnings.append(f"{os.path.basename(path)}: torn last interval dropped (recorder stopped mid-write; "
                        f"{data.size - committed:,} bytes beyond the commit)")
        data = data.slice(0, committed)
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(data))
    except pa.ArrowInvalid as e:
        raise DataFileError(f"{path}: not an Arrow stream ({e})", "the recording is damaged or not a kvmtrace recording") from e
    legacy = name and reader.schema.names == T.legacy_names(name) != schema.names  # older columns: upgraded below
    if not reader.schema.equals(schema) and not legacy:
        raise DataFileError(f"{path}: columns differ from this kvmtrace's {FORMAT} v{FORMAT_VERSION}")
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError, EOFError):
            warnings.append(f"{os.path.basename(path)}: torn last interval dropped (recorder stopped mid-write)")
            break
    if legacy:
        return T.upgrade(name, pa.Table.from_batches(batches, reader.schema))
    return pa.Table.from_batches(batches, schema)


def _table_files(directory: str, name: str, checked: Optional[integrity.Checked] = None) -> List[Dict[str, str]]:
    """The parts and journals of one table in number order; a part wins over the journal of
    the same number (crash between compaction's rename and the journal's removal). With
    ``checked``, files from the first damaged interval on are left out, never opened."""
    tdir = os.path.join(directory, name)
    if not os.path.isdir(tdir):
        raise DataFileError(f"{directory}: table {name!r} is missing", "the recording is incomplete or damaged")
    found: Dict[int, Dict[str, str]] = {}
    for fn in os.listdir(tdir):
        m = _PART.match(fn)
        if m and (checked is None or checked.readable(f"{name}/{fn}")):
            found.setdefault(int(m.group(2)), {})[m.group(1)] = os.path.join(tdir, fn)
    return [found[k] for k in sorted(found)]


def _read_parquet_table(directory: str, name: str, columns: Optional[Sequence[str]], warnings: List[str],
                        checked: Optional[integrity.Checked] = None) -> pa.Table:
    schema = T.SCHEMAS[name]
    parts = []
    for f in _table_files(directory, name, checked):
        if "part" in f:
            t = integrity.read_part(f["part"], columns)
            want = schema if not columns else pa.schema([schema.field(c) for c in columns])
            if not columns:
                t = T.upgrade(name, t)  # a recording written before columns were added
            if not t.schema.equals(want):
                raise DataFileError(f"{f['part']}: columns differ from this kvmtrace's {FORMAT} v{FORMAT_VERSION}")
        else:
            t = _read_journal(f["journal"], schema, warnings, name, _committed(checked, name, f["journal"]))
            if columns:
                t = t.select(list(columns))
        parts.append(t)
    if not parts:
        s = schema if not columns else pa.schema([schema.field(c) for c in columns])
        return s.empty_table()
    return pa.concat_tables(parts)


def _parquet_event_table(directory: str, name: str, warnings: List[str],
                         checked: Optional[integrity.Checked] = None) -> "tuple[EventTable, Optional[int]]":
    """An event table of a Parquet recording without reading its rows: every part's footer is
    checked (schema, readable) and gives the largest interval (column statistics); journals are
    memory-mapped. Returns the table (``last`` still unset) and its largest interval. DuckDB
    later scans the parts: with a manifest, only parts that passed their checksum."""
    schema = T.SCHEMAS[name]
    parquet, journals, arrow = [], [], []
    mx: Optional[int] = None
    for f in _table_files(directory, name, checked):
        if "part" in f:
            meta = integrity.part_footer(f["part"])
            try:
                got = meta.schema.to_arrow_schema()
            except (pa.ArrowException, ValueError) as e:
                raise integrity.part_error(f["part"], e) from e
            if not got.equals(schema):
                raise DataFileError(f"{f['part']}: columns differ from this kvmtrace's {FORMAT} v{FORMAT_VERSION}")
            if meta.num_rows:
                parquet.append(f["part"])
                col = schema.get_field_index("interval")
                for g in range(meta.num_row_groups):
                    st = meta.row_group(g).column(col).statistics
                    if st is None or not st.has_min_max:
                        mx = _parquet_max_interval(f["part"], mx)
                        break
                    mx = st.max if mx is None else max(mx, st.max)
        else:
            t = _read_journal(f["journal"], schema, warnings, name, _committed(checked, name, f["journal"]))
            journals.append(f["journal"])
            if t.num_rows:
                arrow.append(t)
                import pyarrow.compute as pc

                m = pc.max(t.column("interval")).as_py()
                mx = m if mx is None else max(mx, m)
    return EventTable(name, directory, parquet, journals, arrow, -1), mx


def _parquet_max_interval(path: str, mx: Optional[int]) -> Optional[int]:
    import pyarrow.compute as pc

    m = pc.max(integrity.read_part(path, ["interval"]).column("interval")).as_py()
    return m if mx is None else max(mx, m)


def _read_csv_table(directory: str, name: str, columns: Optional[Sequence[str]], warnings: List[str],
                    checked: Optional[integrity.Checked] = None) -> pa.Table:
    import pyarrow.csv as pcsv

    schema = T.SCHEMAS[name]
    path = os.path.join(directory, f"{name}.csv")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise DataFileError(f"{directory}: table {name!r} is missing ({name}.csv)", "the recording is incomplete") from e
    limit = checked.committed(f"{name}.csv") if checked is not None else None
    if limit is not None and len(data) > limit:  # the interval being written at a crash: never committed
        warnings.append(f"{name}.csv: torn last interval dropped (recorder stopped mid-write; "
                        f"{len(data) - limit:,} bytes beyond the commit)")
        data = data[:limit]
    header = ",".join(schema.names).encode()
    first = data.split(b"\n", 1)[0]
    legacy = first == ",".join(T.legacy_names(name)).encode() != header  # older columns: upgraded below
    if first != header and not legacy:
        raise DataFileError(f"{path}: columns differ from this kvmtrace's {FORMAT} v{FORMAT_VERSION}")
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        warnings.append(f"{name}.csv: torn last line dropped (recorder stopped mid-write)")
    try:
        t = pcsv.read_csv(
            io.BytesIO(data),
            convert_options=pcsv.ConvertOptions(
                column_types={f.name: f.type for f in schema if not legacy or f.name in T.legacy_names(name)},
                include_columns=list(columns) if columns else None,
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataFileError(f"{path}: unreadable CSV ({e})", "the recording is damaged") from e
    for c in t.column_names:
        if c in T.TEXT_COLUMNS:
            vals = [unescape_cell(v) for v in t.column(c).to_pylist()]
            t = t.set_column(t.schema.get_field_index(c), c, pa.array(vals, pa.string()))
    return T.upgrade(name, t) if legacy and not columns else t


def read_meta(path: str) -> dict:
    """Metadata of a recording directory, checked for format and version."""
    if not os.path.exists(path):
        raise DataFileError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        size = os.path.getsize(path)
        what = "an empty file" if size == 0 else "a file"
        raise DataFileError(
            f"{path}: {what}, not a kvmtrace recording (a recording is a directory holding {META_FILE})",
            "pass the directory written by `kvmtrace record -o` or `kvmtrace bench -o`",
        )
    mp = os.path.join(path, META_FILE)
    if not os.path.exists(mp):
        what = "an empty directory" if not os.listdir(path) else "a directory without " + META_FILE
        raise DataFileError(
            f"{path}: {what}, not a kvmtrace recording",
            "pass the directory written by `kvmtrace record -o` or `kvmtrace bench -o`",
        )
    try:
        with open(mp, "rb") as f:  # bytes: a file that is not UTF-8 is invalid JSON, not a traceback
            text = f.read()
    except OSError as e:
        raise DataFileError(f"{mp}: cannot read: {e.strerror}") from e
    if not text.strip():
        raise DataFileError(f"{mp}: empty metadata file", "the recording is damaged")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DataFileError(f"{mp}: truncated or invalid JSON ({e})", "the recording is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataFileError(f"{path}: not a kvmtrace recording (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise DataFileError(
            f"{path}: recording format version {v}, this kvmtrace ({__version__}) reads version {FORMAT_VERSION}",
            "use the kvmtrace version that wrote it (recorded by kvmtrace " + str(meta.get("kvmtrace_version")) + ")",
        )
    integrity.check_meta(path, meta)
    return meta


_CATEGORICAL = {"vm_id", "op", "change", "lat_provenance", "slots_provenance", "change_provenance"}


def _to_pandas(t: pa.Table, categorical: bool) -> pd.DataFrame:
    if categorical:
        import pyarrow.compute as pc

        for i, f in enumerate(t.schema):
            if f.name in _CATEGORICAL and pa.types.is_string(f.type):
                t = t.set_column(i, f.name, pc.dictionary_encode(t.column(i)))
    return t.to_pandas()


def read_recording(
    path: str,
    tables: Optional[Sequence[str]] = None,
    event_columns: Optional[Dict[str, Sequence[str]]] = None,
) -> Recording:
    """Read a recording directory. ``tables`` limits which tables are read (default: all).
    Aggregate tables are read into DataFrames; raw-event tables are not read at all but located
    (``Recording.events``: files, last complete interval) for the engine, and loaded only if
    ``recording[name]`` is accessed (then limited to ``event_columns``, text columns categorical)."""
    meta = read_meta(path)
    warnings: List[str] = []
    # the files are checked against the manifest before anything parses them: a damaged file,
    # and every file after it, is never opened by pyarrow or DuckDB (integrity.py, module doc)
    checked = integrity.check(path, meta)
    if checked.cut == 0:
        raise integrity.refuse(path, checked.problems)
    present = list((meta.get("tables") or {}).keys()) or list(T.AGG_TABLES)
    for n in present:
        if n not in T.SCHEMAS:
            raise DataFileError(f"{path}: unknown table {n!r} in metadata", "written by a different kvmtrace version?")
    want = [n for n in present if tables is None or n in tables or n == "intervals"]
    storage = meta.get("storage", "parquet")
    reader = _read_parquet_table if storage == "parquet" else _read_csv_table
    if storage not in ("parquet", "csv"):
        raise DataFileError(f"{path}: unknown storage {storage!r}")
    out: Dict[str, pd.DataFrame] = {}
    arrow: Dict[str, pa.Table] = {}
    events: Dict[str, EventTable] = {}
    ev_max: Dict[str, Optional[int]] = {}
    import pyarrow.compute as pc

    for n in want:
        if n in T.EVENT_TABLES:
            if storage == "parquet":
                events[n], ev_max[n] = _parquet_event_table(path, n, warnings, checked)
            else:
                t = reader(path, n, None, warnings, checked)
                events[n] = EventTable(n, path, [], [], [t] if t.num_rows else [], -1)
                ev_max[n] = pc.max(t.column("interval")).as_py() if t.num_rows else None
            continue
        try:
            arrow[n] = reader(path, n, None, warnings, checked)
        except (pa.ArrowException, OSError, ValueError, KeyError) as e:  # any damage: one error, no traceback
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataFileError(f"{path}: table {n!r} is unreadable ({first})", "the recording is damaged") from e
    # verified against the manifest; raw-event files are checked there by size and checksum, and
    # cut below to the intervals that survive
    arrow = integrity.verify(path, meta, arrow, warnings, checked)
    iv = arrow["intervals"]
    if iv.num_rows == 0:
        raise DataFileError(f"{path}: recording holds no complete interval", "record for at least one interval")
    last = max(iv.column("interval").to_pylist())
    for n in want:
        if n in events:
            events[n].last = last
            mx = ev_max[n]
        else:
            t = arrow[n]
            mx = pc.max(t.column("interval")).as_py() if n != "intervals" and t.num_rows else None
            if mx is not None and mx > last:
                t = t.filter(pc.less_equal(t.column("interval"), last))
            out[n] = _to_pandas(t, False)
        if mx is not None and mx > last:
            warnings.append(f"{n}: rows of interval {mx} dropped (interval not complete)")
    if meta.get("status") == "recording":
        warnings.append(f"{path}: recorder did not finish (crash or still running); using intervals 0..{last}")
    return Recording(path, meta, _Tables(out, events, event_columns), warnings, events)


# --------------------------------------------------------------------------------- bench dirs


def is_bench_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, BENCH_FILE))


def read_bench_index(path: str) -> dict:
    p = os.path.join(path, BENCH_FILE)
    try:
        with open(p) as f:
            idx = json.load(f)
    except ValueError as e:
        raise DataFileError(f"{p}: truncated or invalid JSON ({e})", "the bench directory is damaged") from e
    if not isinstance(idx, dict) or idx.get("format") != BENCH_FORMAT:
        raise DataFileError(f"{path}: not a kvmtrace bench directory")
    if idx.get("format_version") != BENCH_VERSION:
        raise DataFileError(
            f"{path}: bench format version {idx.get('format_version')}, this kvmtrace reads version {BENCH_VERSION}"
        )
    return idx


def _rotation():
    from . import rotation  # directories of rotated recordings (record --rotate)

    return rotation


def find_recordings(path: str) -> List[str]:
    """The recordings and bench directories inside ``path`` (a directory of recordings: rotated
    recordings, or a fleet dataset such as ``ROOT/host=H/date=D/NAME``; see
    docs/recording-format.md), in path order. A recording's own subdirectories are not searched."""
    found: List[str] = []
    for root, dirs, files in os.walk(path):
        if META_FILE in files or BENCH_FILE in files:
            found.append(root)
            dirs[:] = []
            continue
        dirs.sort()
    return sorted(found)


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Each path as given if it is a recording or bench directory (or not a directory: the
    reader then says what is wrong with it); a directory holding recordings -> those."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p) and not os.path.exists(os.path.join(p, META_FILE)) and not is_bench_dir(p):
            inner = find_recordings(p)
            if inner:
                out.extend(inner)
                continue
        out.append(p)
    return out


def read_inputs(paths: Sequence[str], **kw) -> List[Recording]:
    """Recordings, bench directories and directories holding recordings (searched recursively)
    -> list of Recording (bench runs carry ``.bench``). Sources get unique names: a recording
    found inside a directory is named by its path below that directory."""
    recs: List[Recording] = []
    for top in paths:
        if _rotation().is_rotation_dir(top):  # record --rotate: one recording
            recs.append(_rotation().read_rotated(top, **kw))
            continue
        for p in expand_inputs([top]):
            if is_bench_dir(p):
                idx = read_bench_index(p)
                runs = idx.get("runs") or []
                if not runs:
                    raise DataFileError(f"{p}: bench directory holds no completed run")
                for run in runs:
                    r = read_recording(os.path.join(p, run["recording"]), **kw)
                    r.bench = {
                        "scenario": run.get("scenario", ""),
                        "slots": run.get("slots"),
                        "iterations": run.get("iterations"),
                        "workload": run.get("workload") or {},
                        "bench_dir": p,
                    }
                    r.source = f"{run.get('scenario')}/{run.get('slots')}"
                    recs.append(r)
            else:
                r = read_recording(p, **kw)
                if os.path.normpath(p) != os.path.normpath(top) and not r.meta.get("label"):
                    r.source = os.path.relpath(p, top)
                recs.append(r)
    from .input_warnings import data_warnings

    seen: Dict[str, int] = {}
    for r in recs:
        r.warnings.extend(data_warnings(r))  # what the figures show: lost events, map full, underived, empty
        integrity.printable_names(r)
        n = seen.get(r.source, 0)
        seen[r.source] = n + 1
        if n:
            r.source = f"{r.source}#{n + 1}"
    return recs
