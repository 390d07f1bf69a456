"""Every file kvmtrace writes for a user goes through here: the checks made before any work
starts (the parent directory exists and is writable, the path is not a directory, an existing
file is replaced only with ``--force``), the atomic write (a temporary file renamed into place,
so a failure never leaves a half-written or emptied output), and the one CSV cell policy
(text cells a spreadsheet would evaluate as formulas get a leading quote; control characters
in a user's CSV are made visible by text.printable).

No write follows a link or goes into someone else's directory: files are created O_EXCL|
O_NOFOLLOW relative to a directory descriptor, replaced only by a rename, and an existing output
directory must be the invoking user's and writable by nobody else (``check_dir_stat``); the
recorder, the rotation, every report and the workload use these functions.

No third-party imports: the dashboard, the workload and the analysis all use it."""

from __future__ import annotations

import csv
import errno
import math
import os
import secrets
import stat
from typing import Iterable, List, Optional, Sequence, Tuple

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


def csv_number(v: float) -> str:
    """A float as an exact CSV cell: "" for NaN, an integral value as an integer ("10255400",
    never "1.02554e+07"), anything else as ``repr`` (the shortest text that reads back as the
    same float). ``float(csv_number(v)) == v`` for every finite v."""
    if math.isnan(v):
        return ""
    if v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(float(v))


def csv_cell(v) -> str:
    """One CSV cell: "" for None/NaN, 1/0 for booleans, numbers exact (``csv_number``), text by csv_text."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return csv_number(v)
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


# ------------------------------------------------------------------ where and how files are made
#
# Every file is created with O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC relative to a directory
# descriptor (openat): a name that already exists, a symbolic link to a file of someone else
# or a fifo included, is never opened for writing. A file that replaces another is written
# under a fresh random temporary name and renamed onto its name: the rename replaces whatever
# the name holds (a planted link included) and never writes through it. Directories are opened
# with O_DIRECTORY|O_NOFOLLOW and checked on the open descriptor (fstat), so what is checked is
# what is written into, even if the path is swapped after the check.

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# A directory kvmtrace creates: nobody but its owner may add, remove or rename its entries,
# so it passes the check below when it is reused (``record --rotate`` after a restart).
DIR_MODE = 0o750
_TEMP_TRIES = 64


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_dir_stat(st: os.stat_result, path: str, option: str) -> None:
    """An existing output directory is written into only if the invoking user (euid) owns it
    and neither its group nor others may write to it: anyone else who can add or rename its
    entries could plant a link or swap a file under kvmtrace (which often runs as root)."""
    p = shown(path)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{option} {p} is a symbolic link",
                         f"give {option} the directory itself (readlink -f {p}) or a new path")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {p} exists and is not a directory", f"give {option} a new path")
    me = os.geteuid()
    if st.st_uid != me:
        who = _user(me).split(" ")[0]
        raise UsageError(f"{option} {p} is owned by {_user(st.st_uid)}, not by {_user(me)} (you)",
                         f"give {option} a new path (kvmtrace creates the directory), or chown {who} {p}")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise UsageError(f"{option} {p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})",
                         f"chmod go-w {p}, or give {option} a new path (kvmtrace creates the directory)")


def _no_slash(path: str) -> str:
    return path.rstrip("/") or "/"


def check_existing_dir(path: str, option: str) -> None:
    """``check_dir_stat`` on ``path`` itself (lstat: a symbolic link is refused)."""
    try:
        st = os.lstat(_no_slash(path))
    except OSError as e:
        raise UsageError(f"cannot use {option} {shown(path)}: {e.strerror}", f"give {option} a new path") from None
    check_dir_stat(st, path, option)


def open_dir(path: str, option: str, create: bool = False, mode: int = DIR_MODE,
             dir_fd: Optional[int] = None) -> int:
    """A descriptor of the output directory ``path`` (relative to ``dir_fd`` if given), created
    first with ``mode`` if ``create`` and it does not exist (one level: parents never are).
    Opened with O_DIRECTORY|O_NOFOLLOW and checked (``check_dir_stat``) on the descriptor."""
    p = shown(path)
    path = _no_slash(path)  # "link/" would resolve the link despite O_NOFOLLOW
    if create:
        try:
            os.mkdir(path, mode, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise UsageError(f"cannot create {option} {p}: {e.strerror}", "choose a writable location") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None:
                check_dir_stat(st, path, option)  # raises: a link, or not a directory
        raise UsageError(f"cannot open {option} {p}: {e.strerror}", "choose a writable directory") from None
    try:
        check_dir_stat(os.fstat(fd), path, option)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(path: str, option: str) -> int:
    """A descriptor of the directory a new output file ``path`` goes into. It may be any
    directory the user can write (the file's own name and temporary name are never followed,
    see AtomicFile), /tmp included; only the last part of ``path`` is created."""
    parent = _parent(path)
    try:
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot write {option} {shown(path)}: {shown(parent)}: {e.strerror}",
                         f"create it first (mkdir -p {shown(parent)}) or choose an existing directory") from None


def create_file(name: str, dir_fd: Optional[int], mode: int = 0o666, flags: int = 0) -> int:
    """Create ``name`` in ``dir_fd``: O_EXCL|O_NOFOLLOW, so an existing name (a link, a fifo, a
    file) raises FileExistsError instead of being opened."""
    return os.open(name, NEW_FILE | flags, mode, dir_fd=dir_fd)


def create_temp(name: str, dir_fd: Optional[int], mode: int = 0o666) -> Tuple[int, str]:
    """A new temporary file for ``name`` in ``dir_fd``: ``NAME.RANDOM.tmp``, created with
    O_EXCL|O_NOFOLLOW; a name someone planted is skipped for another random one. Returns
    (descriptor, temporary name)."""
    base = os.path.basename(name)
    for _ in range(_TEMP_TRIES):
        tmp = f"{base}.{secrets.token_hex(4)}.tmp"
        try:
            return create_file(tmp, dir_fd, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {base} after {_TEMP_TRIES} tries")


def place(tmp: str, name: str, dir_fd: Optional[int], replace: bool) -> None:
    """Give the finished temporary file ``tmp`` its ``name`` (both in ``dir_fd``). With
    ``replace`` a rename, which replaces whatever ``name`` holds (a link too: never written
    through); without, a hard link that fails with FileExistsError if ``name`` exists by now
    (no existing file is replaced without --force, even one that appeared during the work),
    then ``tmp`` is removed. On a filesystem without hard links: a check, then the rename."""
    if replace:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
            raise
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
    unlink_quiet(tmp, dir_fd)


def appeared(option: str, path: str) -> UsageError:
    """The error for an output name that did not exist when checked and does now."""
    return UsageError(f"{option} {shown(path)} already exists (it appeared while kvmtrace was working)",
                      "choose another name, or add --force to replace it")


def unlink_quiet(name: str, dir_fd: Optional[int] = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


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
    exist yet (its parent must: parents are never created silently) or is a directory the
    invoking user owns, nobody else may write (``check_dir_stat``), and in which none of
    ``names`` exists (unless ``force``)."""
    p = shown(path)
    if not path:
        raise UsageError(f"{option} needs a directory name", f"give {option} a path")
    if os.path.lexists(path):
        check_existing_dir(path, option)
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {option} {p}: permission denied", "choose a writable directory")
        taken = [n for n in names if os.path.lexists(os.path.join(path, n))]
        if taken and not force:
            raise UsageError(f"{option} {p} already holds {', '.join(taken)}",
                             "choose another directory, or add --force to replace those files")
        return path
    _check_parent(path, option, "create")
    return path


def make_dir(path: str, option: str, mode: int = DIR_MODE) -> str:
    """Create the output directory ``path`` (checked with ``check_new_dir``) with ``mode``; one
    level only. An existing one is checked again (``check_dir_stat``)."""
    os.close(open_dir(path, option, create=True, mode=mode))
    return path


class AtomicFile:
    """``with AtomicFile(path, option) as f:`` writes a new temporary file next to ``path``
    (O_EXCL|O_NOFOLLOW, a random name) and renames it onto ``path`` only when the block
    succeeds; on any error the temporary file is removed and an OSError becomes one UsageError
    line. An existing file is never emptied or half-written, and no link at ``path`` or at a
    temporary name is ever written through (the rename replaces a link at ``path``). With
    ``replace=False`` a name that exists when the block ends is not replaced (see ``place``).
    """

    def __init__(self, path: str, option: str, mode: str = "w", newline: Optional[str] = None,
                 replace: bool = True):
        self.path = path
        self.replace = replace
        self.option = option
        self.mode = mode
        self.newline = newline
        self.name = os.path.basename(path)
        self.tmp: Optional[str] = None
        self._dfd: Optional[int] = None
        self._f = None

    def __enter__(self):
        self._dfd = open_parent(self.path, self.option)
        try:
            fd, self.tmp = create_temp(self.name, self._dfd)
            if "b" in self.mode:
                self._f = os.fdopen(fd, self.mode)
            else:
                self._f = os.fdopen(fd, self.mode, newline=self.newline)
        except OSError as e:
            os.close(self._dfd)
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
        try:
            if exc_type is None and err is None:
                try:
                    place(self.tmp, self.name, self._dfd, self.replace)
                    return False
                except OSError as e:
                    err = e
            unlink_quiet(self.tmp, self._dfd)
        finally:
            os.close(self._dfd)
        if isinstance(err, FileExistsError) and not self.replace:
            raise appeared(self.option, self.path) from None
        if err is None and isinstance(exc, OSError):
            err = exc
        if err is not None:
            raise self._error(err) from None
        return False


def open_append(path: str, option: str) -> Tuple[int, bool]:
    """Open ``path`` to append to it: a new file (O_EXCL|O_NOFOLLOW), or an existing regular
    file (O_NOFOLLOW) that the invoking user owns, nobody else may write and has no other hard
    link. Returns (descriptor opened O_RDWR|O_APPEND, created)."""
    p = shown(path)
    dfd = open_parent(path, option)
    name = os.path.basename(path)
    try:
        try:
            return create_file(name, dfd, 0o666, os.O_APPEND), True
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDWR | os.O_APPEND | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"{option} {p} is a symbolic link", f"give {option} a new file name") from None
            raise UsageError(f"cannot write {option} {p}: {e.strerror}", "check the path and its permissions") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{option} {p} is not a regular file", f"give {option} a new file name")
        if st.st_uid != os.geteuid():
            raise UsageError(f"{option} {p} is owned by {_user(st.st_uid)}, not by {_user(os.geteuid())} (you)",
                             f"give {option} a new file name")
        if st.st_mode & 0o022:
            raise UsageError(f"{option} {p} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                             f"chmod go-w {p}, or give {option} a new file name")
        if st.st_nlink != 1:
            raise UsageError(f"{option} {p} has {st.st_nlink} hard links", f"give {option} a new file name")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_text(path: str, text: str, option: str, replace: bool = True) -> str:
    """Write ``text`` to ``path`` atomically (see AtomicFile)."""
    with AtomicFile(path, option, replace=replace) as f:
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
    "make_dir", "AtomicFile", "write_text", "write_csv_rows", "check_dir_stat", "check_existing_dir", "open_dir",
    "open_parent", "create_file", "create_temp", "place", "appeared", "unlink_quiet", "open_append", "DIR_MODE",
]
