"""Writing recordings: the Recorder that streams intervals into a recording directory, and its
per-table writers (Arrow IPC journal + compacted Parquet parts, or CSV). The layout and the
crash model are described in ``recording`` (the readers); what a recording guarantees after
each kind of failure: docs/recording-guarantees.md.

Every interval is committed in this order: the rows of every table are appended, flushed and
fsynced (``intervals`` last), then the metadata is rewritten atomically with the manifest
(``files``: every part, journal and CSV file with its row count, byte count, SHA-256 and the
intervals it covers). The metadata is the commit record: bytes a file holds beyond what the
manifest states were never committed. ``integrity.verify`` checks a recording against it.

Files are private by default (directories 0700, files 0600: raw events hold VMM host
addresses); ``share_group`` makes them readable by one group (0750 / 0640, group-owned).
Every file is created O_EXCL|O_NOFOLLOW relative to the recording directory's descriptor
(kvmtrace/output.py), temporary files under fresh random names; the directory is the invoking
user's and writable by nobody else (checked on the open descriptor), so nothing is ever written
through a link someone planted.
A small reserve file is kept while recording and freed when the disk fills, so the metadata
can still say ``incomplete``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import socket
import time
from dataclasses import asdict, is_dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import pyarrow as pa

from .. import __version__
from .. import output
from ..errors import KvmtraceError, UsageError
from ..text import printable as _printable
from . import tables as T
from .recording import FORMAT, FORMAT_VERSION, META_FILE, escape_cell

RESERVE_FILE = ".kvmtrace-reserve"
RESERVE_BYTES = 256 * 1024
PRIVATE = (0o700, 0o600)
SHARED = (0o750, 0o640)


def printable(s) -> str:
    """A path or label as text that can always be printed: undecodable bytes and control
    characters shown as escapes (text.printable, the one policy)."""
    return _printable(s)


def _fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass


class Access:
    """Who may read what the recorder creates: modes and an optional group."""

    def __init__(self, share_group: Optional[str] = None):
        self.gid = -1
        self.dir_mode, self.file_mode = PRIVATE
        if share_group:
            import grp

            try:
                self.gid = grp.getgrnam(share_group).gr_gid
            except KeyError:
                try:
                    self.gid = grp.getgrgid(int(share_group)).gr_gid
                except (ValueError, KeyError):
                    raise UsageError(
                        f"--share-group {printable(share_group)}: no such group",
                        "name an existing group (getent group) or leave the option out (private recording)",
                    ) from None
            self.dir_mode, self.file_mode = SHARED

    def apply(self, path: str, fd: Optional[int] = None, is_dir: bool = False) -> None:
        mode = self.dir_mode if is_dir else self.file_mode
        if fd is not None:
            os.fchmod(fd, mode)
            if self.gid >= 0:
                os.fchown(fd, -1, self.gid)
        else:
            os.chmod(path, mode)
            if self.gid >= 0:
                os.chown(path, -1, self.gid)

    def open_dir(self, path: str, option: str = "-o", dir_fd: Optional[int] = None) -> int:
        """Create (if missing) and open the directory ``path`` (relative to ``dir_fd``) with this
        access's mode and group; see output.open_dir. Returns its descriptor."""
        fd = output.open_dir(path, option, create=True, mode=self.dir_mode, dir_fd=dir_fd)
        try:
            self.apply(path, fd=fd, is_dir=True)
        except OSError:
            os.close(fd)
            raise
        return fd


_DEFAULT_ACCESS = None


def _access(a: Optional[Access]) -> Access:
    global _DEFAULT_ACCESS
    if a is not None:
        return a
    if _DEFAULT_ACCESS is None:
        _DEFAULT_ACCESS = Access()
    return _DEFAULT_ACCESS


class _Out:
    """A file written sequentially that knows its length and SHA-256 (what the manifest states).
    ``seal`` makes further writes no-ops (an abandoned writer cannot add bytes). Created new
    (O_EXCL|O_NOFOLLOW) as ``name`` in the directory ``dir_fd``, or with ``temp`` under a fresh
    random temporary name for ``name`` (``self.name`` says which)."""

    def __init__(self, name: str, dir_fd: int, access: Access, temp: bool = False):
        if temp:
            fd, name = output.create_temp(name, dir_fd, access.file_mode)
        else:
            fd = output.create_file(name, dir_fd, access.file_mode)
        try:
            access.apply(name, fd=fd)
        except OSError:
            os.close(fd)
            output.unlink_quiet(name, dir_fd)
            raise
        self.name = name
        self.dir_fd = dir_fd
        self.f = os.fdopen(fd, "wb")
        self.h = hashlib.sha256()
        self.n = 0
        self.sealed = False
        self.closed = False

    def write(self, b) -> int:
        if self.sealed:
            return len(b)
        b = bytes(b)
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        if not self.sealed:
            self.f.flush()

    def sync(self, fsync: bool) -> None:
        self.f.flush()
        if fsync:
            os.fsync(self.f.fileno())

    def digest(self) -> str:
        return self.h.copy().hexdigest()

    def close(self) -> None:  # pyarrow closes its sink; the real close is ``finish``
        self.closed = True

    def finish(self) -> None:
        self.sealed = True
        self.closed = True
        if not self.f.closed:
            try:
                self.f.close()
            except OSError:
                pass

    def rollback(self, nbytes: int, digest_state) -> None:
        """Drop everything written after ``nbytes`` (a failed or interrupted interval)."""
        self.sealed = True
        try:
            self.f.flush()
        except OSError:
            pass
        try:
            os.ftruncate(self.f.fileno(), nbytes)  # the descriptor: never a path someone swapped
            self.f.seek(nbytes)
        except (OSError, ValueError):
            pass
        self.n = nbytes
        self.h = digest_state


def write_json_atomic(path: str, obj, fsync: bool = True, access: Optional[Access] = None,
                      dir_fd: Optional[int] = None) -> None:
    """Write JSON to ``path`` (a name in ``dir_fd`` if given) atomically: a new temporary file
    (O_EXCL|O_NOFOLLOW, a random name), fsync, rename onto ``path``. Readers see the old or the
    new file, never a part; a link at either name is replaced, never written through. The tmp
    file is removed if writing fails (e.g. disk full)."""
    if dir_fd is None:
        parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return write_json_atomic(os.path.basename(path), obj, fsync, access, parent)
        finally:
            os.close(parent)
    text = json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"
    out = _Out(path, dir_fd, _access(access), temp=True)
    try:
        try:
            out.write(text.encode("utf-8", "surrogateescape"))
            out.sync(fsync)
        finally:
            out.finish()
        os.replace(out.name, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        output.unlink_quiet(out.name, dir_fd)
        raise


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


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """One record batch per interval (callers skip empty tables): combined chunks give one."""
    return table.combine_chunks().to_batches()[0]


class _JournalTable:
    """One table in Parquet format: Arrow IPC journal + compacted Parquet parts. ``files`` is
    this table's part of the manifest (relative path -> rows, bytes, sha256, intervals)."""

    def __init__(self, rec: "Recorder", name: str):
        self.rec = rec
        self.name = name
        self.dir = os.path.join(rec.path, name)
        self.dfd = rec.access.open_dir(name, dir_fd=rec.dfd)
        rec._fds.append(self.dfd)
        self.schema = T.SCHEMAS[name]
        self.k = 0
        self._out: Optional[_Out] = None
        self._w = None
        self.window = 0  # first interval of the current compaction window
        self.jrows = 0
        self.rows = 0
        self.files: Dict[str, dict] = {}
        self._committed: Optional[Tuple[int, object, int]] = None  # bytes, hash state, rows

    def _rel(self, kind: str, k: int) -> str:
        ext = "arrows" if kind == "journal" else "parquet"
        return f"{self.name}/{kind}-{k:06d}.{ext}"

    @staticmethod
    def _base(rel: str) -> str:
        return rel.rsplit("/", 1)[1]  # its name in this table's directory (``self.dfd``)

    def append(self, table: pa.Table, interval: int) -> None:
        if table.num_rows == 0:
            return
        if self._w is None:
            self._out = _Out(self._base(self._rel("journal", self.k)), self.dfd, self.rec.access)
            self._w = pa.ipc.new_stream(pa.PythonFile(self._out, mode="w"), self.schema)
            self.jrows = 0
        self._w.write_batch(_one_batch(table))
        self._out.sync(self.rec.fsync)
        self.jrows += table.num_rows
        self.rows += table.num_rows

    def manifest(self, upto: int) -> Dict[str, dict]:
        """Manifest entries: the parts, and the open journal as written so far."""
        m = dict(self.files)
        if self._out is not None:
            m[self._rel("journal", self.k)] = {
                "rows": self.jrows, "bytes": self._out.n, "sha256": self._out.digest(), "intervals": [self.window, upto],
            }
        return m

    def committed(self) -> None:
        if self._out is not None:
            self._committed = (self._out.n, self._out.h.copy(), self.jrows)

    def rollback(self) -> None:
        """Forget the rows appended since the last commit (the file is cut back to the
        committed length); later rows go to a new journal."""
        if self._out is None:
            return
        if self._committed is None:
            self._out.rollback(0, hashlib.sha256())
            self._out.finish()
            output.unlink_quiet(self._out.name, self.dfd)
            self._out = self._w = None
            return
        n, h, rows = self._committed
        self.rows -= self.jrows - rows
        self.jrows = rows
        self._out.rollback(n, h)  # sealed: the next interval compacts it first (``stale``)

    @property
    def stale(self) -> bool:
        return self._out is not None and self._out.sealed

    def compact(self, upto: int) -> Optional[Tuple[str, str, str, dict]]:
        """Write the journal as a Parquet part (tmp, fsync). Returns (tmp, part, journal, entry)
        for ``commit_compaction``, or None when the window has no journal."""
        if self._out is None:
            return None
        import pyarrow.parquet as pq

        if not self._out.sealed:
            self._w.close()  # end-of-stream marker
        self._out.finish()
        self._w = None
        src = self._out.name
        self._out = None
        self._committed = None
        dst = self._base(self._rel("part", self.k))
        out = _Out(dst, self.dfd, self.rec.access, temp=True)
        tmp = out.name
        self.rec._tmp.add((self.dfd, tmp))
        rows = 0
        try:
            writer = pq.ParquetWriter(pa.PythonFile(out, mode="w"), self.schema, compression="zstd")
            m = os.fdopen(os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dfd), "rb")
            with m:  # a Python file: pyarrow paths must be UTF-8, ours need not be
                reader = pa.ipc.open_stream(pa.PythonFile(m, mode="r"))
                pending: List[pa.RecordBatch] = []
                n = 0
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        break
                    pending.append(batch)
                    n += batch.num_rows
                    if n >= 1_000_000:
                        writer.write_table(pa.Table.from_batches(pending, self.schema))
                        rows += n
                        pending, n = [], 0
                if pending:
                    writer.write_table(pa.Table.from_batches(pending, self.schema))
                    rows += n
            writer.close()
            out.sync(self.rec.fsync)
        finally:
            out.finish()
        entry = {"rows": rows, "bytes": out.n, "sha256": out.digest(), "intervals": [self.window, upto]}
        return tmp, dst, src, entry

    def commit_compaction(self, tmp: str, dst: str, entry: dict, upto: int) -> None:
        os.replace(tmp, dst, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        self.rec._tmp.discard((self.dfd, tmp))
        self.files.pop(self._rel("journal", self.k), None)
        self.files[self._rel("part", self.k)] = entry
        self.k += 1
        self.window = upto + 1

    def empty_part(self) -> None:
        """A table without rows still gets an (empty) part: an empty directory does not
        survive git, archives or copies that skip empty directories."""
        if self.k or self._out is not None:
            return
        import pyarrow.parquet as pq

        rel = self._rel("part", 0)
        out = _Out(self._base(rel), self.dfd, self.rec.access)
        try:
            pq.write_table(self.schema.empty_table(), pa.PythonFile(out, mode="w"))
            out.sync(self.rec.fsync)
        finally:
            out.finish()
        self.files[rel] = {"rows": 0, "bytes": out.n, "sha256": out.digest(), "intervals": [0, -1]}
        self.k = 1

    def abandon(self) -> None:
        if self._out is not None:
            self._out.finish()


class _CsvTable:
    def __init__(self, rec: "Recorder", name: str):
        self.rec = rec
        self.rel = f"{name}.csv"
        self.columns = T.columns(name)
        self.text = [c in T.TEXT_COLUMNS for c in self.columns]
        self._out = _Out(self.rel, rec.dfd, rec.access)
        self.rows = 0
        self._buf = io.StringIO()
        self._w = csv.writer(self._buf, lineterminator="\n")
        self._emit([self.columns])
        self._committed = (self._out.n, self._out.h.copy(), 0)

    def _emit(self, rows) -> None:
        self._buf.seek(0)
        self._buf.truncate()
        self._w.writerows(rows)
        self._out.write(self._buf.getvalue().encode("utf-8", "surrogateescape"))
        self._out.sync(self.rec.fsync)

    def append(self, table: pa.Table, interval: int) -> None:
        if table.num_rows == 0:
            return
        cols = [table.column(c).to_pylist() for c in self.columns]
        self._emit(
            [("" if v is None else (escape_cell(v) if t else v)) for v, t in zip(row, self.text)] for row in zip(*cols)
        )
        self.rows += table.num_rows

    def manifest(self, upto: int) -> Dict[str, dict]:
        return {self.rel: {"rows": self.rows, "bytes": self._out.n, "sha256": self._out.digest(), "intervals": [0, upto]}}

    def committed(self) -> None:
        self._committed = (self._out.n, self._out.h.copy(), self.rows)

    def rollback(self) -> None:
        n, h, rows = self._committed
        self.rows = rows
        self._out.rollback(n, h)
        self._out.sealed = False  # a CSV file can continue after the cut

    def compact(self, upto: int):
        return None

    def empty_part(self) -> None:
        pass

    def abandon(self) -> None:
        self._out.finish()


class _DeferSignals:
    """While the recorder commits or closes, SIGINT/SIGTERM/SIGHUP wait until it is done (a
    second Ctrl-C must not cut a part in half). Only in the main thread; elsewhere a no-op."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self.pending = []
        self.old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            try:
                self.old[sig] = signal.signal(sig, lambda s, f: self.pending.append(s))
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc):
        import signal

        for sig, h in self.old.items():
            signal.signal(sig, h)
        pending, self.pending = self.pending, []
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # delivered now, to the handler the caller had
        return False


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "Disk quota" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class RecordingFailed(KvmtraceError):
    """Writing the recording failed (disk full, I/O error); what was committed is kept."""


def check_output_path(path: str) -> None:
    """Refuse a path that exists (and is not an empty directory the invoking user owns and
    nobody else may write, output.check_dir_stat) or whose parent is missing, before anything
    is created or attached."""
    shown = printable(path)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path) or os.listdir(path):
            raise UsageError(f"{shown} already exists", "choose a new path for the recording (it becomes a directory)")
        output.check_existing_dir(path, "-o")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(
            f"{shown}: parent directory {printable(parent)} does not exist",
            f"create it first (mkdir -p {printable(parent)}) or choose another path",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create {shown}: {printable(parent)} is not writable", "choose a writable location")


class Recorder:
    """Streams intervals into a recording directory. Use as a context manager; ``write`` once
    per interval with ``snap.delta(prev)`` and the raw events received in that interval.
    ``close`` (or leaving the ``with``) compacts and marks the recording complete; a failure to
    write (disk full) stops the recorder with ``RecordingFailed`` and status ``incomplete``,
    keeping every committed interval."""

    def __init__(
        self,
        path: str,
        fmt: str = "parquet",
        meta: Optional[dict] = None,
        events: bool = False,
        compact_every: int = 300,
        fsync: bool = True,
        plan=None,
        share_group: Optional[str] = None,
        reserve: int = RESERVE_BYTES,
        dir_fd: Optional[int] = None,
    ):
        """``dir_fd``: the descriptor of the directory ``path`` is created in (``record
        --rotate``: its own checked directory); ``path`` is then shown, its last part used."""
        if fmt not in ("parquet", "csv"):
            raise UsageError(f"unknown recording format {fmt!r}", "use --format parquet or --format csv")
        self.access = Access(share_group)
        check_output_path(path)
        self._fds: List[int] = []
        try:
            self.dfd = self.access.open_dir(os.path.basename(path) if dir_fd is not None else path, "-o", dir_fd)
        except OSError as e:
            raise UsageError(f"cannot create {printable(path)}: {e.strerror}", "choose a writable location") from e
        self._fds.append(self.dfd)
        self.path = path
        self.fmt = fmt
        self.events = events
        self.compact_every = max(1, int(compact_every))
        self.fsync = fsync
        self.interval = 0
        self.lost_events = 0
        self.totals = {"hva_ops": 0, "memslot_updates": 0, "hva_events": 0, "memslot_events": 0}
        self._scanned_prov = scanned_provenance_from_plan(plan)
        self._tmp: set = set()
        self._committed_files: Dict[str, dict] = {}
        self._failed: Optional[RecordingFailed] = None
        self._tables = None
        self._meta_path = META_FILE  # names in self.dfd
        self._reserve = RESERVE_FILE
        names = T.AGG_TABLES + (T.EVENT_TABLES if events else ())
        # "intervals" last: an interval is complete once its intervals row is written.
        order = [n for n in names if n != "intervals"] + ["intervals"]
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
            "totals": dict(self.totals),
            "files": {},
        }
        self.meta.update(m)
        try:
            if reserve:
                out = _Out(self._reserve, self.dfd, self.access)
                try:
                    out.write(b"\0" * int(reserve))
                    out.sync(fsync)
                finally:
                    out.finish()
            cls = _JournalTable if fmt == "parquet" else _CsvTable
            self._tables = {n: cls(self, n) for n in order}
            self._commit()
        except OSError as e:
            self._fail(e, "starting")
        except BaseException:
            self._close_fds()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._failed is not None:
            return False
        self.close(status="complete" if exc_type is None or exc_type is KeyboardInterrupt else "failed")
        return False

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _manifest(self) -> Dict[str, dict]:
        m: Dict[str, dict] = {}
        for tab in self._tables.values():
            m.update(tab.manifest(self.interval - 1))
        return m

    def _commit(self) -> None:
        self.meta["files"] = self._manifest()
        write_json_atomic(self._meta_path, self.meta, self.fsync, self.access, self.dfd)
        self._committed_files = dict(self.meta["files"])
        for tab in self._tables.values():
            tab.committed()

    def _fail(self, e: BaseException, doing: str):
        """Stop recording after a write error: cut every file back to what the metadata
        commits, remove tmp files, free the reserve and mark the recording incomplete."""
        full = _disk_full(e)
        for tab in (self._tables or {}).values():
            tab.rollback()
            tab.abandon()
        for dfd, t in list(self._tmp):
            output.unlink_quiet(t, dfd)
        self._tmp.clear()
        output.unlink_quiet(self._reserve, self.dfd)
        why = "disk full" if full else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        self.meta.update(status="incomplete", error=f"{doing}: {why}")
        self.meta["files"] = dict(self._committed_files)
        try:
            write_json_atomic(self._meta_path, self.meta, self.fsync, self.access, self.dfd)
        except OSError:
            pass  # the previous metadata still commits every interval up to the last one
        self._close_fds()
        kept = f"intervals 0..{self.interval - 1} kept" if self.interval else "no interval recorded"
        self._failed = RecordingFailed(
            f"{why} while {doing} {printable(self.path)}: recording stopped, status incomplete ({kept})",
            "free space (df -h) or record to another filesystem; `kvmtrace report` reads what was kept"
            if full else "check the filesystem (dmesg); `kvmtrace report` reads what was kept",
        )
        raise self._failed from None

    def write(self, delta, events: Iterable = ()) -> int:
        """Record one interval; returns its number. ``events``: HvaEvent / MemslotEvent objects."""
        if self._failed is not None:
            raise self._failed
        if self._tables is None:
            raise RuntimeError("recorder is closed")
        if not delta.is_delta:
            raise ValueError("Recorder.write needs snap.delta(prev)")
        i = self.interval
        hva_ev, mem_ev = T.split_events(events) if self.events else ([], [])
        rows = T.snapshot_rows(delta, i, self._scanned_prov, len(hva_ev), len(mem_ev))
        data = {}
        for name in self._tables:
            if name == "hva_events":
                data[name] = T.to_arrow(name, T.event_columns(hva_ev, name, i))
            elif name == "memslot_events":
                data[name] = T.to_arrow(name, T.event_columns(mem_ev, name, i))
            else:
                data[name] = T.to_arrow(name, rows[name])
        if any(getattr(t, "stale", False) for t in self._tables.values()):
            with _DeferSignals():
                self._compact()  # a journal cut back after an interrupted interval: close it
        saved = (self.interval, self.lost_events, dict(self.totals), dict(self.meta))
        with _DeferSignals():
            try:
                for name, tab in self._tables.items():
                    tab.append(data[name], i)
                self.interval += 1
                self.lost_events += int(delta.lost_events)
                ir = rows["intervals"][0]
                for k in self.totals:
                    self.totals[k] += ir[k]
                self.meta.update(
                    end=float(delta.wall_time), intervals=self.interval, lost_events=self.lost_events,
                    totals=dict(self.totals),
                )
                if "clock" not in self.meta:  # wall and monotonic time of one instant (raw events are monotonic)
                    self.meta["clock"] = {"realtime_s": float(delta.wall_time), "monotonic_ns": int(delta.mono_ns)}
                self._commit()
            except BaseException as e:
                self.interval, self.lost_events, self.totals, self.meta = saved
                for tab in self._tables.values():
                    tab.rollback()
                if isinstance(e, OSError):
                    self._fail(e, "writing")
                raise
            if self.interval % self.compact_every == 0:
                self._compact()
        return i

    def _compact(self) -> None:
        upto = self.interval - 1
        done = []
        try:
            for tab in self._tables.values():
                r = tab.compact(upto)
                if r is not None:
                    done.append((tab, r))
            for tab, (tmp, dst, src, entry) in done:
                tab.commit_compaction(tmp, dst, entry, upto)
            if self.fsync:
                for tab, _ in done:
                    _fsync_dir(tab.dfd)
            self._commit()
            for tab, (tmp, dst, src, entry) in done:
                os.unlink(src, dir_fd=tab.dfd)
        except OSError as e:
            self._fail(e, "compacting")

    def update_meta(self, **kw) -> None:
        self.meta.update(kw)
        try:
            write_json_atomic(self._meta_path, self.meta, self.fsync, self.access, self.dfd)
        except OSError as e:
            self._fail(e, "writing")

    def bytes_on_disk(self) -> int:
        n = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                if f == RESERVE_FILE:
                    continue
                try:
                    n += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return n

    def close(self, status: str = "complete", **meta) -> None:
        """Compact, check that every file the manifest lists is there, then mark the recording
        ``status``. Signals wait until this is done."""
        if self._tables is None or self._failed is not None:
            return
        with _DeferSignals():
            self._compact()
            try:
                for tab in self._tables.values():
                    tab.empty_part()
                self.meta.update(meta)
                self.meta["files"] = self._manifest()
                missing = [f for f, e in self.meta["files"].items()
                           if os.stat(f, dir_fd=self.dfd, follow_symlinks=False).st_size != e["bytes"]]
                if missing:
                    status = "incomplete"
                    self.meta["error"] = "closing: files differ from the manifest: " + ", ".join(missing)
                self.meta["status"] = status
                if self.meta.get("end") is None:
                    self.meta["end"] = time.time()
                write_json_atomic(self._meta_path, self.meta, self.fsync, self.access, self.dfd)
            except OSError as e:
                self._fail(e, "closing")
            self._tables = None
            output.unlink_quiet(self._reserve, self.dfd)
            self._close_fds()

    def _close_fds(self) -> None:
        """The directory descriptors (the recording's and its tables'): closed once done."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
