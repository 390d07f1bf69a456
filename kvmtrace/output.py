"""Every file kvmtrace writes for a user goes through here: the checks made before any work
starts (the parent directory exists and is writable, the path is not a directory, an existing
file is replaced only with ``--force``), the atomic write (a temporary file renamed into place,
so a failure never leaves a half-written or emptied output), and the one CSV cell policy
(text cells a spreadsheet would evaluate as formulas get a leading quote; control characters
in a user's CSV are made visible by text.printable).

No third-party imports: the dashboard, the workload and the analysis all use it."""

from __future__ import annotations

import csv
import math
import os
from typing import Iterable, List, Optional, Sequence

from .errors import UsageError
from .text import printable

# a spreadsheet evaluates a cell starting with one of these as a formula
_DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(s: str) -> str:
    """Spreadsheet-safe text: a cell starting with = + - @ tab or CR is prefixed with a quote,
    so no spreadsheet evaluates it as a formula. A leading quote is doubled, which keeps the
    escaping reversible (``unescape_cell``)."""
    if s and (s[0] in _DANGEROUS or s[0] == "'"):
        return "'" + s
    return s


def unescape_cell(s: str) -> str:
    if s and s[0] == "'":
        return s[1:]
    return s


def csv_text(s: str) -> str:
    """A text cell of a CSV file for people (top --csv, report/compare/demo --csv): control
    characters made visible (no raw ESC, BEL or newline in a cell: text.printable), then
    spreadsheet-safe (escape_cell). Recordings keep their text whole: they use escape_cell."""
    return escape_cell(printable(s))


def csv_cell(v) -> str:
    """One CSV cell: "" for None/NaN, 1/0 for booleans, %.6g for floats, text by csv_text."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, str):
        return csv_text(v)
    return str(v)


class CsvWriter:
    """csv.writer whose rows are Python values, each turned into a cell by ``csv_cell`` (so
    no text value reaches a spreadsheet unescaped). The header row is written as given."""

    def __init__(self, f, lineterminator: str = "\r\n"):
        self._w = csv.writer(f, lineterminator=lineterminator)

    def header(self, columns: Sequence[str]) -> None:
        self._w.writerow(list(columns))

    def row(self, values: Iterable) -> None:
        self._w.writerow([csv_cell(v) for v in values])

    def rows(self, rows: Iterable[Iterable]) -> None:
        for r in rows:
            self.row(r)


def shown(path) -> str:
    """A path as it can be printed on any terminal (text.printable: control characters and
    undecodable bytes shown as escapes)."""
    return printable(os.fsdecode(path) if isinstance(path, bytes) else path)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "/"


def _check_parent(path: str, option: str, verb: str) -> str:
    """The parent directory of ``path`` exists and is writable (it is never created silently)."""
    parent = _parent(path)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot {verb} {option} {shown(path)}: no such directory {shown(parent)}",
                         f"create it first (mkdir -p {shown(parent)}) or choose an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot {verb} {option} {shown(path)}: directory {shown(parent)} is not writable",
                         "choose a writable directory")
    return parent


def check_new_file(path: str, option: str, force: bool = False) -> str:
    """Check before any work that ``path`` can be written as a new file (or, with ``force``,
    replace an existing one). The parent directory must exist: it is never created silently.
    Returns the path; raises UsageError naming ``option`` and the fix."""
    p = shown(path)
    if not path:
        raise UsageError(f"{option} needs a file name", f"give {option} a path, e.g. {option} out.csv")
    if os.path.isdir(path):
        raise UsageError(f"{option} {p} is a directory", f"give {option} a file name, e.g. {os.path.join(p, 'out.csv')}")
    parent = _check_parent(path, option, "write")
    if os.path.lexists(path):
        if not force:
            raise UsageError(f"{option} {p} already exists", f"choose another name, or add --force to replace it")
        if not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
            raise UsageError(f"cannot replace {option} {p}: permission denied", "choose a writable path")
    return path


def check_new_dir(path: str, option: str, names: Sequence[str] = (), force: bool = False) -> str:
    """Check before any work that ``path`` can hold output files ``names``: it either does not
    exist yet (its parent must: parents are never created silently) or is a directory in which
    none of ``names`` exists (unless ``force``)."""
    p = shown(path)
    if not path:
        raise UsageError(f"{option} needs a directory name", f"give {option} a path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {p} exists and is not a directory", f"give {option} a directory name")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {option} {p}: permission denied", "choose a writable directory")
        taken = [n for n in names if os.path.lexists(os.path.join(path, n))]
        if taken and not force:
            raise UsageError(f"{option} {p} already holds {', '.join(taken)}",
                             "choose another directory, or add --force to replace those files")
        return path
    _check_parent(path, option, "create")
    return path


def make_dir(path: str, option: str) -> str:
    """Create the output directory ``path`` (checked with ``check_new_dir``); one level only."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise UsageError(f"{option} {shown(path)} exists and is not a directory", f"give {option} a directory name")
    except OSError as e:
        raise UsageError(f"cannot create {option} {shown(path)}: {e.strerror}", "choose a writable directory") from None
    return path


class AtomicFile:
    """``with AtomicFile(path, option) as f:`` writes ``path.tmpPID`` and renames it over
    ``path`` only when the block succeeds; on any error the temporary file is removed and an
    OSError becomes one UsageError line. An existing file is never emptied or half-written."""

    def __init__(self, path: str, option: str, mode: str = "w", newline: Optional[str] = None):
        self.path = path
        self.option = option
        self.mode = mode
        self.newline = newline
        self.tmp = f"{path}.tmp{os.getpid()}"
        self._f = None

    def __enter__(self):
        try:
            self._f = open(self.tmp, self.mode, newline=self.newline) if "b" not in self.mode else open(self.tmp, self.mode)
        except OSError as e:
            raise self._error(e) from None
        return self._f

    def _error(self, e: OSError) -> UsageError:
        return UsageError(f"cannot write {self.option} {shown(self.path)}: {e.strerror or e}",
                          f"choose a writable path with free space for {self.option}")

    def __exit__(self, exc_type, exc, tb):
        err = None
        try:
            if exc_type is None:
                self._f.flush()
                os.fsync(self._f.fileno())
        except OSError as e:
            err = e
        finally:
            try:
                self._f.close()  # always: an open descriptor would keep a full filesystem busy
            except OSError as e:
                err = err or e
        if exc_type is None and err is None:
            try:
                os.replace(self.tmp, self.path)
                return False
            except OSError as e:
                err = e
        _remove(self.tmp)
        if err is None and isinstance(exc, OSError):
            err = exc
        if err is not None:
            raise self._error(err) from None
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_text(path: str, text: str, option: str) -> str:
    """Write ``text`` to ``path`` atomically (see AtomicFile)."""
    with AtomicFile(path, option) as f:
        f.write(text)
    return path


def write_csv_rows(path: str, columns: Sequence[str], rows: Iterable[Iterable], option: str) -> str:
    """A CSV file of ``columns`` and value ``rows``, written atomically through CsvWriter."""
    with AtomicFile(path, option, newline="") as f:
        w = CsvWriter(f)
        w.header(columns)
        w.rows(rows)
    return path


__all__: List[str] = [
    "escape_cell", "unescape_cell", "csv_text", "csv_cell", "CsvWriter", "shown", "check_new_file", "check_new_dir",
    "make_dir", "AtomicFile", "write_text", "write_csv_rows",
]
