"""Does a recording add up? ``verify`` checks what was read against the metadata (the commit
record written by ``recorder.Recorder``) and returns the longest consistent prefix of intervals.

Two layers:

- files: every part, journal and CSV file the manifest (``meta["files"]``) lists must be there
  with at least its committed length and the SHA-256 of its committed bytes; a complete part
  must match exactly. A file that fails makes every interval from the first one it covers
  unusable (the damage cannot be located inside it).
- tables: the ``intervals`` table numbers its rows 0, 1, 2, ...; per interval it states how
  many hva ops, memslot updates, VMs and raw events the other tables hold, and those must add
  up (no row lost, duplicated or moved to another interval); counts are never negative; the
  metadata totals equal the sums of the intervals read.

The result is reported, never hidden: a warning states the exact loss (intervals, hva ops,
memslot updates, raw events, per the metadata totals); nothing usable -> ``DataFileError``.
Recordings without a manifest (written before it existed) get the table checks only.

The files are checked BEFORE anything parses them (``check_files``; the reader then skips every
file from the first damaged interval on), and a Parquet part is only ever opened through
``open_part`` / ``read_part`` / ``part_footer``: an Arrow-native file read in the calling thread.
Why (issue 20): the reader used to give pyarrow a Python file object (``pq.read_table(fh)``).
pyarrow reads such a file through a dataset scan, an Acero plan whose pre-buffered reads hold
buffers owned by Python, and tears the plan down on one of its pool threads. When a part was
damaged (bytes appended: "Parquet magic bytes not found in footer") the error reached the user
at once and the interpreter began to exit while the pool thread was still tearing down; it
dropped the last reference to a Python buffer during ``Py_FinalizeEx``, asked for the GIL, was
ended with ``pthread_exit`` inside a ``noexcept`` destructor, and ``std::terminate`` aborted the
process ("terminate called without an active exception", SIGABRT after the right error; gdb:
``PyGILState_Ensure`` <- ``arrow::py::PyBuffer::~PyBuffer`` <- ``ReadRangeCache::LazyImpl`` <-
``parquet::SerializedFile`` <- ``acero::SourceNode::~SourceNode`` <- ``ExecPlanImpl`` on an
``arrow::internal::ThreadPool`` worker). An Arrow-native file read with ``pre_buffer=False,
use_threads=False`` leaves no task and no Python object behind, whether the read succeeds or
fails; and a file that fails its checksum is not handed to pyarrow or DuckDB at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from ..errors import DataFileError
from ..text import decoded as _text  # valid Unicode; every output makes it printable (text.py)

_DAMAGED_FIX = "the recording was damaged after it was written"

_FILE = re.compile(r"^(?:([a-z_]+)/(part|journal)-(\d{6})\.(parquet|arrows)|([a-z_]+)\.csv)$")
_TOTALS = ("hva_ops", "memslot_updates", "hva_events", "memslot_events")
# per interval: (table, intervals column it must add up to, how: a column summed or None = rows)
_CROSS = (
    ("hva", "hva_ops", "count"),
    ("memslot", "memslot_updates", "count"),
    ("vms", "vms", None),
    ("hva_events", "hva_events", None),
    ("memslot_events", "memslot_events", None),
)
_NONNEG = {
    "intervals": ("lost_events", "map_full", "unattributed", "vms", "hva_ops", "memslot_updates", "hva_events",
                  "memslot_events"),
    "hva": ("count", "lat_count", "slots_count"),
    "memslot": ("count", "errors"),
}


def _int(v, what: str, path: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise DataFileError(f"{path}: metadata field {what} is {_text(repr(v))[:60]}, not an integer >= {minimum}",
                            "the recording's metadata is damaged")
    return v


def check_meta(path: str, meta: dict) -> None:
    """Types of the metadata fields the readers rely on (a damaged or hand-edited file gives
    one error, never a traceback later)."""
    for k in ("host", "kernel", "label", "storage", "status"):
        if k in meta and meta[k] is not None and not isinstance(meta[k], str):
            raise DataFileError(f"{path}: metadata field {k} is not text", "the recording's metadata is damaged")
    for k in ("start", "end"):
        v = meta.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise DataFileError(f"{path}: metadata field {k} is not a time", "the recording's metadata is damaged")
    if "intervals" in meta:
        _int(meta["intervals"], "intervals", path)
    if "lost_events" in meta:
        _int(meta["lost_events"], "lost_events", path)
    tabs = meta.get("tables")
    if tabs is not None and not isinstance(tabs, dict):
        raise DataFileError(f"{path}: metadata field tables is not a mapping", "the recording's metadata is damaged")
    tot = meta.get("totals")
    if tot is not None:
        if not isinstance(tot, dict):
            raise DataFileError(f"{path}: metadata field totals is not a mapping", "the recording's metadata is damaged")
        for k in _TOTALS:
            if k in tot:
                _int(tot[k], f"totals.{k}", path)
    files = meta.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise DataFileError(f"{path}: metadata field files is not a mapping", "the recording's metadata is damaged")
        if not isinstance(tabs, dict) or not tabs:
            raise DataFileError(f"{path}: metadata field tables is missing", "the recording's metadata is damaged")
        for rel, e in files.items():
            m = _FILE.match(rel) if isinstance(rel, str) else None
            if not m:
                raise DataFileError(f"{path}: manifest names {_text(rel)[:80]!r}, not a file of a recording",
                                    "the recording's metadata is damaged")
            if (m.group(1) or m.group(5)) not in tabs:
                raise DataFileError(f"{path}: manifest lists {rel}, a table the metadata does not list",
                                    "the recording's metadata is damaged")
            if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or not isinstance(e.get("intervals"), list) \
                    or len(e["intervals"]) != 2:
                raise DataFileError(f"{path}: manifest entry {rel} is malformed", "the recording's metadata is damaged")
            _int(e.get("rows"), f"files.{rel}.rows", path)
            _int(e.get("bytes"), f"files.{rel}.bytes", path)
            _int(e["intervals"][0], f"files.{rel}.intervals", path)
            _int(e["intervals"][1], f"files.{rel}.intervals", path, minimum=-1)


def open_part(path: str) -> pa.NativeFile:
    """A Parquet part as an Arrow-native file (never a Python file object: see the module doc).
    The path goes as bytes, so a path that is not UTF-8 opens too."""
    return pa.OSFile(os.fsencode(path))


def part_error(path: str, e: BaseException) -> DataFileError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DataFileError(f"{_text(path)}: truncated or corrupt Parquet part ({first})", _DAMAGED_FIX)


def part_footer(path: str):
    """The footer (``pyarrow.parquet.FileMetaData``) of a part, or one ``DataFileError``."""
    import pyarrow.parquet as pq

    try:
        with open_part(path) as f:
            return pq.ParquetFile(f, pre_buffer=False).metadata
    except (pa.ArrowException, OSError, ValueError, EOFError) as e:  # pyarrow raises several types
        raise part_error(path, e) from e


def read_part(path: str, columns=None) -> pa.Table:
    """A whole part (or ``columns`` of it), read in the calling thread; one ``DataFileError``
    for any damage."""
    import pyarrow.parquet as pq

    try:
        with open_part(path) as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=list(columns) if columns else None,
                                                             use_threads=False)
    except (pa.ArrowException, OSError, ValueError, EOFError, KeyError) as e:
        raise part_error(path, e) from e


def _sha256_prefix(p: str, n: int) -> str:
    h = hashlib.sha256()
    left = n
    with open(p, "rb") as f:
        while left > 0:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def check(path: str, meta: dict) -> Checked:
    """``check_files`` for the readers, run before they parse any file."""
    return Checked(meta, *check_files(path, meta))


def check_files(path: str, meta: dict) -> Tuple[Optional[int], List[str]]:
    """(first interval made unusable by a damaged or missing file or None, problems)."""
    files = meta.get("files") or {}
    complete = meta.get("status") == "complete"
    cut: Optional[int] = None
    problems: List[str] = []
    for rel, e in sorted(files.items()):
        p = os.path.join(path, rel)
        lo = int(e["intervals"][0])
        bad = None
        m = _FILE.match(rel)
        is_part = m.group(2) == "part"
        try:
            st = os.stat(p)
            size = st.st_size if stat.S_ISREG(st.st_mode) else -1  # a FIFO or device: never opened
        except OSError:
            size = None
        if size is None and m.group(2) == "journal":
            # compacted after the last metadata update: the part of the same number holds it
            part = os.path.join(path, m.group(1), f"part-{m.group(3)}.parquet")
            try:
                if part_footer(part).num_rows >= e["rows"]:
                    continue
            except DataFileError:  # missing or unreadable part: reported below as the journal's loss
                pass
        if size is None:
            bad = f"{rel} is missing ({e['rows']:,} rows)"
        elif size < 0:
            bad = f"{rel} is not a regular file"
        elif size < e["bytes"]:
            bad = f"{rel} is shorter than written ({size:,} of {e['bytes']:,} bytes)"
        elif (is_part or complete) and size != e["bytes"]:
            bad = f"{rel} is longer than written ({size:,} bytes, {e['bytes']:,} written)"
        else:
            try:
                if _sha256_prefix(p, e["bytes"]) != e["sha256"]:
                    bad = f"{rel} does not match its checksum (changed after it was written)"
            except OSError as err:
                bad = f"{rel} is unreadable ({err.strerror})"
        if bad:
            problems.append(bad)
            cut = lo if cut is None else min(cut, lo)
    stray = _unlisted(path, meta, files, complete)
    if stray:
        problems.append(f"{', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''} not written by this recording's "
                        "recorder (copied in? move it out)")
        cut = 0
    return cut, problems


class Checked:
    """What ``check_files`` found, as the readers use it: ``cut`` (the first interval a damaged,
    missing or stray file made unusable, None if none), ``problems`` (what was wrong), and per
    file whether it may be parsed and how many of its bytes were committed."""

    def __init__(self, meta: dict, cut: Optional[int], problems: List[str]):
        self.files = meta.get("files") or {}
        self.cut, self.problems = cut, problems

    def _entry(self, rel: str) -> Optional[dict]:
        e = self.files.get(rel)
        m = _FILE.match(rel)
        if e is None and m and m.group(1):  # the part of a listed journal (compacted before the commit), or back
            e = self.files.get(f"{m.group(1)}/journal-{m.group(3)}.arrows" if m.group(2) == "part"
                               else f"{m.group(1)}/part-{m.group(3)}.parquet")
        return e

    def readable(self, rel: str) -> bool:
        """Whether a reader may parse ``rel`` (``table/part-NNNNNN.parquet``, ``table/journal-...``,
        ``table.csv``): only files that begin before the cut. Their intervals are what remains; a
        damaged file, and every file after it, is never handed to pyarrow or DuckDB."""
        if self.cut is None:
            return True
        e = self._entry(rel)
        return e is not None and int(e["intervals"][0]) < self.cut  # unlisted: the interval being written

    def committed(self, rel: str) -> Optional[int]:
        """Bytes of ``rel`` the manifest committed (None: not listed). Bytes beyond them were
        never committed (the interval being written at a crash): readers do not parse them."""
        e = self.files.get(rel)
        return None if e is None else int(e["bytes"])


def refuse(path: str, problems: List[str]) -> DataFileError:
    """The error for a recording with no usable interval before its damage."""
    return DataFileError(
        f"{_text(path)}: damaged recording: {'; '.join(problems) or 'no interval adds up'}; no interval before the damage",
        "restore the recording from a copy; nothing in it can be trusted",
    )


def _unlisted(path: str, meta: dict, files: dict, complete: bool) -> List[str]:
    """Parts and journals in a table directory that the manifest does not account for (readers
    would count their rows). Allowed: a part whose journal is listed (compacted just before a
    crash) and, in an unfinished recording, a journal after the listed ones (the interval being
    written)."""
    if not files or meta.get("storage", "parquet") != "parquet":
        return []
    out = []
    for table in (meta.get("tables") or {}):
        tdir = os.path.join(path, table)
        try:
            names = os.listdir(tdir)
        except OSError:
            continue
        listed = {int(m.group(3)) for rel in files for m in [_FILE.match(rel)] if m and m.group(1) == table}
        for fn in sorted(names):
            rel = f"{table}/{fn}"
            m = _FILE.match(rel)
            if not m or rel in files:
                continue
            k = int(m.group(3))
            if m.group(2) == "part" and f"{table}/journal-{k:06d}.arrows" in files:
                continue
            if m.group(2) == "journal" and f"{table}/part-{k:06d}.parquet" in files:
                continue  # compacted, not yet deleted: readers take the part
            if m.group(2) == "journal" and not complete and k > max(listed, default=-1):
                continue
            out.append(rel)
    return out


def _per_interval(interval: np.ndarray, n: int, weights=None) -> np.ndarray:
    keep = (interval >= 0) & (interval < n)
    out = np.zeros(n, dtype=np.int64)
    if weights is None:
        np.add.at(out, interval[keep], 1)
    else:
        np.add.at(out, interval[keep], weights[keep])
    return out


def _ints(t: pa.Table, c: str) -> np.ndarray:
    return np.asarray(t.column(c).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def check_tables(arrow: Dict[str, pa.Table], limit: int) -> Tuple[int, List[str]]:
    """Length of the longest prefix of intervals (at most ``limit``) where every table adds up,
    and what ended it."""
    iv = arrow["intervals"]
    nums = _ints(iv, "interval")
    n = 0
    while n < len(nums) and n < limit and nums[n] == n:
        n += 1
    problems: List[str] = []
    if n < len(nums) and n < limit:
        problems.append(f"intervals table: row {n} is interval {nums[n]}, expected {n} (rows missing, duplicated or reordered)")
    if n == 0:
        return 0, problems
    inside = nums[(nums >= 0) & (nums < n)]
    dup = np.nonzero(np.bincount(inside, minlength=n) != 1)[0]
    if len(dup):
        k = int(dup[0])
        problems.append(f"intervals table: interval {k} appears {int((inside == k).sum())} times (rows duplicated)")
        n = k
        if n == 0:
            return 0, problems
    first_bad = n
    why = {}
    for t, cols in _NONNEG.items():
        if t not in arrow or arrow[t].num_rows == 0:
            continue
        tab = arrow[t]
        ivals = _ints(tab, "interval")
        for c in cols:
            if c not in tab.column_names:
                continue
            neg = ivals[_ints(tab, c) < 0]
            neg = neg[(neg >= 0)]
            if len(neg):
                k = int(neg.min())
                if k < first_bad:
                    first_bad, why[k] = k, f"{t}: negative {c} in interval {k}"
    head_iv = {c: _ints(iv, c)[:n] for c in ("hva_ops", "memslot_updates", "vms", "hva_events", "memslot_events")
               if c in iv.column_names}
    for t, ivcol, how in _CROSS:
        if t not in arrow or ivcol not in head_iv:
            continue
        tab = arrow[t]
        ivals = _ints(tab, "interval")
        got = _per_interval(ivals, n, None if how is None else _ints(tab, how))
        diff = np.nonzero(got != head_iv[ivcol])[0]
        if len(diff):
            k = int(diff[0])
            if k < first_bad:
                first_bad = k
                what = "rows" if how is None else f"sum of {how}"
                why[k] = f"{t}: interval {k} holds {what} {int(got[k]):,}, the intervals table says {int(head_iv[ivcol][k]):,}"
    if first_bad < n:
        problems.append(why[first_bad])
    return first_bad, problems


def _sum(iv: pa.Table, c: str, n: int) -> int:
    if c not in iv.column_names:
        return 0
    return int(_ints(iv, c)[:n].sum())


def verify(path: str, meta: dict, arrow: Dict[str, pa.Table], warnings: List[str],
           checked: Optional[Checked] = None) -> Dict[str, pa.Table]:
    """Check a recording read into ``arrow`` (table name -> Arrow table) against ``meta``;
    returns the tables cut to the longest consistent prefix of intervals, adds a warning with
    the exact loss if anything was cut, raises ``DataFileError`` when nothing is usable.
    ``checked``: what ``check`` already said (the reader checks the files before it parses
    them and reads only those ``Checked.readable`` allows), else it is run here."""
    import pyarrow.compute as pc

    check_meta(path, meta)
    committed = meta.get("intervals") if "files" in meta else None
    limit = committed if committed is not None else arrow["intervals"].num_rows
    if checked is None:
        checked = check(path, meta)
    file_cut, file_problems = checked.cut, list(checked.problems)
    if file_cut is not None:
        limit = min(limit, file_cut)
    n, table_problems = check_tables(arrow, limit)
    problems = file_problems + table_problems
    iv = arrow["intervals"]
    if committed is not None and not problems and n == committed:
        tot = meta.get("totals") or {}
        for k in _TOTALS:
            if k in tot and _sum(iv, k, n) != tot[k]:
                problems.append(f"intervals table sums to {_sum(iv, k, n):,} {k}, the metadata totals say {tot[k]:,}")
        if "lost_events" in meta and _sum(iv, "lost_events", n) != meta["lost_events"]:
            problems.append(f"intervals table sums to {_sum(iv, 'lost_events', n):,} lost events, "
                            f"the metadata says {meta['lost_events']:,}")
        if problems:
            n = 0
    if meta.get("status") == "incomplete":
        warnings.append(f"{_text(path)}: recording stopped early ({_text(meta.get('error') or 'unknown error')}); "
                        f"every interval it committed is here")
    short = committed is not None and n < committed
    if short and not problems:
        problems.append(f"only {n} of the {committed} committed intervals are readable")
    if not problems:
        return _cut(arrow, n, pc) if n < iv.num_rows else arrow
    shown = _text(path)
    if n == 0:
        raise refuse(path, problems)
    if problems:
        tot = meta.get("totals") or {}
        loss = []
        if committed is not None:
            loss.append(f"intervals {n}..{committed - 1} of {committed}")
        for k, label in (("hva_ops", "hva ops"), ("memslot_updates", "memslot updates"),
                         ("hva_events", "hva events"), ("memslot_events", "memslot events")):
            if k in tot:
                lost = tot[k] - _sum(iv, k, n)
                if lost:
                    loss.append(f"{lost:,} of {tot[k]:,} {label}")
        warnings.append(
            f"{shown}: DAMAGED recording, reading intervals 0..{n - 1} only ({'; '.join(problems)}); "
            f"lost: {', '.join(loss) or 'the intervals after ' + str(n - 1)}"
        )
    return _cut(arrow, n, pc)


def _cut(arrow: Dict[str, pa.Table], n: int, pc) -> Dict[str, pa.Table]:
    out = {}
    for name, t in arrow.items():
        if t.num_rows and pc.max(t.column("interval")).as_py() >= n:
            t = t.filter(pc.less(t.column("interval"), n))
        out[name] = t
    return out


def printable_names(rec) -> None:
    """Names a report prints (source, path, label, host, warnings) made valid Unicode: a path or
    label that is not UTF-8 shows U+FFFD instead of failing the report. The characters are kept
    (JSON carries them); the text and HTML outputs escape them through text.py."""
    rec.source = _text(rec.source)
    rec.path = _text(rec.path)
    rec.warnings = [_text(w) for w in rec.warnings]
    for k in ("label", "host", "kernel"):
        if isinstance(rec.meta.get(k), str):
            rec.meta[k] = _text(rec.meta[k])
