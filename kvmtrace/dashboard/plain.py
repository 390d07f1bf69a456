"""Script-friendly outputs of ``kvmtrace top``, like kvm_stat's ``-1``, ``-l`` and ``-L``:
the plain table (``--once``, batch mode, final summary), one log line per interval (``--log``)
and per-interval CSV rows (``--csv``). No colour, no cursor codes, uncompacted numbers
(latency in integer ns), ``-`` for unknown values, comment lines start with ``#``."""

from __future__ import annotations

import csv
import datetime
import os
import stat
from typing import List, Mapping, Optional, Sequence

from ..errors import DataFileError, UsageError
from ..output import CsvWriter, check_new_file, open_append, shown
from ..snapshot import Snapshot
from ..text import display
from ..fmt import plain_num
from .model import ALL_CHANGES, ALL_OPS, OTHER_CHANGE, View, ViewOptions, VmRow, build_view
from .view import attach_summary, cost_cells, cost_text, cpu_percent, late_text


def _ns(v: Optional[float]) -> str:
    return "-" if v is None else str(int(round(v)))


def _name(r: VmRow) -> str:
    name = display(r.name or "?").replace(" ", "_")  # visible escapes, capped: one awk field
    return name if r.alive else name + "(exited)"


TOTAL_VM = "all_VMs"  # the vm cell of the totals row ("total  all_VMs"): one awk field


def _memslots(r: VmRow) -> str:
    if r.memslots is None:
        return "-"
    return f"~{r.memslots}" if r.memslots_partial else str(r.memslots)


def table_columns(view: View) -> List[str]:
    cols = ["pid", "vm", "memslots", "vcpus"]
    cols += [f"{op}/s" for op in view.ops]
    cols += ["p50_ns", "p99_ns", "lat_prov", "slots_mean", "slots_max", "slots_prov"]
    if view.show_scanned:
        cols.append("scanned_mean")
    cols += [f"{ch}/s" for ch in view.changes]
    return cols


def table_cells(view: View, r: VmRow, total: bool = False) -> List[str]:
    vm = TOTAL_VM if total else _name(r)
    c = ["total" if total else str(r.pid), vm, _memslots(r)]
    c.append(plain_num(r.vcpus))
    c += [plain_num(r.rates.get(op)) for op in view.ops]
    c += [_ns(r.p50), _ns(r.p99), r.lat_provenance, plain_num(r.slots_mean), plain_num(r.slots_max), r.slots_provenance]
    if view.show_scanned:
        c.append(plain_num(r.scanned_mean))
    c += [plain_num(r.upd_rates.get(ch)) for ch in view.changes]
    return c


def _align(rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = []
        for i, (cell, w) in enumerate(zip(row, widths)):
            cells.append(cell.ljust(w) if i == 1 else cell.rjust(w))
        out.append("  ".join(cells).rstrip())
    return out


def plain_header(cum: Snapshot, delta: Snapshot, meta: Mapping, plan, what: str) -> List[str]:
    cpu = cpu_percent(delta)
    return [
        f"# kvmtrace top {what}: host {display(meta.get('host') or '?')} kernel {display(meta.get('kernel') or '?')}"
        f" interval_s {delta.elapsed_s:.3f} elapsed_s {cum.elapsed_s:.3f}",
        "# " + attach_summary(plan),
        f"# lost_events {delta.lost_events} map_full {delta.map_full} unattributed {delta.unattributed}"
        f" kvmtrace_cpu {'-' if cpu is None else f'{cpu:.1f}%'}"
        + "".join(f" · {t}" for t in (cost_text(delta), late_text(delta)) if t),
    ]


def plain_table(
    cum: Snapshot,
    delta: Optional[Snapshot],
    meta: Mapping,
    plan,
    opts: ViewOptions,
    summary: bool = False,
) -> str:
    """The plain table of one interval (or, with ``summary``, of the whole run: rates are
    counts divided by the time since attach, percentiles from the cumulative histograms)."""
    view = build_view(cum, delta, plan, opts, summary=summary)
    d = cum.delta(None) if (summary or delta is None) else delta
    lines = plain_header(cum, d, meta, plan, "summary since start" if summary else "interval")
    if not view.rows:
        if view.vms_running and opts.filtered:
            lines.append(f"no VMs match {opts.filter_text()} ({view.vms_running} running)")
        else:
            lines.append("no VMs running" if not summary else "no VMs seen")
        return "\n".join(lines)
    rows = [table_columns(view)] + [table_cells(view, r) for r in view.rows]
    rows.append(table_cells(view, view.total, total=True))
    lines += _align(rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- --log


SAMPLED_NOTE = ("# bpf_ns/ev, bpf_cpu%: kvmtrace's in-kernel cost, sampled (BPF run-time statistics on "
                "part of each second; '-' for an interval without a window): --self-cost full counts every run")


class LogFormatter:
    """One line per interval with the totals over the shown VMs (``--log``); the header is
    printed first and, on a terminal, again every ``repeat`` lines (as kvm_stat does)."""

    def __init__(self, ops: Sequence[str], changes: Sequence[str] = ALL_CHANGES, repeat: int = 0):
        self.ops = tuple(ops)
        self.changes = tuple(changes)
        self.repeat = repeat
        self.lines = 0
        self.cols = ["time", "vms"] + [f"{op}/s" for op in self.ops]
        self.cols += ["p50_ns", "p99_ns", "slots_mean", "slots_max"]
        self.cols += [f"{ch}/s" for ch in self.changes]
        self.cols += ["lost", "map_full", "unattr/s", "cpu%", "bpf_ns/ev", "bpf_cpu%"]
        self.widths = [max(len(c), 8) for c in self.cols]

    def _fmt(self, cells: Sequence[str]) -> str:
        return " ".join(c.rjust(w) for c, w in zip(cells, self.widths))

    def header(self) -> str:
        return self._fmt(self.cols)

    def cells(self, view: View, delta: Snapshot, label: str) -> List[str]:
        t = view.total
        e = delta.elapsed_s
        c = [label, str(len(view.rows))]
        c += [plain_num(t.rates.get(op)) for op in self.ops]
        c += [_ns(t.p50), _ns(t.p99), plain_num(t.slots_mean), plain_num(t.slots_max)]
        c += [plain_num(t.upd_rates.get(ch, 0.0 if e > 0 else None)) for ch in self.changes]
        cpu = cpu_percent(delta)
        c += [
            str(delta.lost_events),
            str(delta.map_full),
            plain_num(delta.unattributed / e if e > 0 else None),
            plain_num(cpu),
        ]
        c += cost_cells(delta)
        return c

    def lines_for(self, cum: Snapshot, delta: Snapshot, plan, opts: ViewOptions, summary: bool = False) -> List[str]:
        """The line of one interval (with the header when due); with ``summary`` the final line
        over the whole run, labelled ``total``."""
        view = build_view(cum, delta, plan, opts, summary=summary)
        d = cum.delta(None) if summary else delta
        if summary:
            label = "total"
        else:
            label = datetime.datetime.fromtimestamp(cum.wall_time).strftime("%H:%M:%S")
        out = []
        if self.lines == 0 or (self.repeat and self.lines % self.repeat == 0 and not summary):
            out.append(self.header())
            if self.lines == 0 and d.cost.measured and d.cost.sampled:
                out.append(SAMPLED_NOTE)
        line = self._fmt(self.cells(view, d, label))
        out.append(line + (f"  {late_text(d)}" if late_text(d) else ""))
        self.lines += 1
        return out


# ---------------------------------------------------------------------------- --csv

CSV_CHANGES = ALL_CHANGES + (OTHER_CHANGE,)  # other: change type not known (not observed)


def csv_columns() -> List[str]:
    cols = ["wall_time", "seq", "interval_s", "vm_id", "pid", "name", "alive", "memslots", "memslots_partial", "vcpus"]
    for op in ALL_OPS:
        cols += [f"{op}_count", f"{op}_per_s"]
    cols += ["lat_p50_ns", "lat_p99_ns", "lat_provenance"]
    cols += ["slots_count", "slots_mean", "slots_max", "slots_provenance", "scanned_mean"]
    for ch in CSV_CHANGES:
        cols += [f"{ch}_count", f"{ch}_per_s"]
    cols += ["memslot_errors", "lost_events", "map_full", "unattributed", "kvmtrace_cpu_s"]
    return cols


def csv_rows(cum: Snapshot, delta: Snapshot, plan, opts: ViewOptions) -> List[list]:
    """One row of values per shown VM for one interval (cells are made by output.csv_cell:
    text escaped for spreadsheets). Op columns are always all of consts.Op (zero when not
    traced or filtered out by --op), so files stay appendable across runs."""
    view = build_view(cum, delta, plan, opts)
    e = delta.elapsed_s
    out = []
    for r in view.rows:
        v = [
            cum.wall_time,  # Unix s, every digit (output.csv_number)
            cum.seq,
            round(e, 6),
            r.vm_id,
            r.pid,
            r.name,
            r.alive,
            r.memslots,
            r.memslots_partial,
            r.vcpus,
        ]
        for op in ALL_OPS:
            n = r.counts.get(op, 0)
            v += [n, (n / e) if e > 0 else None]
        p50, p99 = r.p50, r.p99
        v += [None if p50 is None else round(p50), None if p99 is None else round(p99), r.lat_provenance]
        v += [r.slots_count, r.slots_mean, r.slots_max, r.slots_provenance, r.scanned_mean]
        for ch in CSV_CHANGES:
            n = r.upd_counts.get(ch, 0)
            v += [n, (n / e) if e > 0 else None]
        v += [r.upd_errors, delta.lost_events, delta.map_full, delta.unattributed, round(delta.self_cpu_s, 6)]
        out.append(v)
    return out


class CsvSink:
    """Appends per-interval rows to a CSV file; writes the header only when the file is new
    or empty, and refuses a file whose header is not kvmtrace top's (appending to an earlier
    ``top --csv`` file is the one case where an existing output is written to)."""

    def __init__(self, path: str):
        self.path = path
        self.check(path)
        try:  # O_EXCL|O_NOFOLLOW for a new file; an existing one: O_NOFOLLOW|O_APPEND, checked on the descriptor
            fd, created = open_append(path, "--csv")
        except DataFileError:
            raise
        except UsageError as e:
            raise DataFileError(e.message, e.remedy) from None
        try:
            existing = 0 if created else os.fstat(fd).st_size
            if existing:
                self._check_header(fd, path)  # the file appended to is the file checked
            self._f = os.fdopen(fd, "a", newline="")
        except BaseException:
            os.close(fd)
            raise
        self._w = CsvWriter(self._f)
        if not existing:
            self._w.header(csv_columns())
            self._f.flush()

    @staticmethod
    def _check_header(fd: int, path: str) -> None:
        try:
            head = os.pread(fd, 1 << 16, 0).split(b"\n", 1)[0].decode("utf-8", "strict")
            first = next(csv.reader([head]), [])
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
            raise DataFileError(f"--csv {shown(path)} is not a kvmtrace top CSV file ({getattr(e, 'strerror', None) or e})",
                                "give --csv a new file name, or remove the file") from None
        if first != csv_columns():
            raise DataFileError(
                f"{shown(path)} is not a kvmtrace top CSV file (its header differs)",
                "give --csv a new file name, or remove the file",
            )

    @staticmethod
    def check(path: str) -> int:
        """Before tracing starts: ``path`` is a new file in an existing directory, or an
        earlier ``top --csv`` file (returns its size): a regular file (not a link) that the
        invoking user owns and nobody else may write. Raises DataFileError/UsageError."""
        if not os.path.lexists(path):
            try:
                check_new_file(path, "--csv")
            except DataFileError:
                raise
            except UsageError as e:
                raise DataFileError(e.message, e.remedy) from None
            return 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if os.path.islink(path):
                raise DataFileError(f"--csv {shown(path)} is a symbolic link", "give --csv a new file name") from None
            raise DataFileError(f"cannot read --csv {shown(path)}: {e.strerror}",
                                "give --csv a new file name") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DataFileError(f"--csv {shown(path)} is not a regular file", "give --csv a new file name")
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_nlink != 1:
                raise DataFileError(f"--csv {shown(path)} is not yours alone (owner uid {st.st_uid}, mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}, {st.st_nlink} links): kvmtrace appends only to "
                                    f"its own earlier top CSV file", "give --csv a new file name")
            if st.st_size:
                CsvSink._check_header(fd, path)
            return st.st_size
        finally:
            os.close(fd)

    def write(self, cum: Snapshot, delta: Snapshot, plan, opts: ViewOptions) -> int:
        rows = csv_rows(cum, delta, plan, opts)
        try:
            self._w.rows(rows)
            self._f.flush()
        except OSError as e:  # full disk, removed medium: one line, not a traceback
            raise DataFileError(f"cannot write --csv {shown(self.path)}: {e.strerror or e}",
                                "free space or choose another --csv path; rows of earlier intervals are kept") from None
        return len(rows)

    def close(self):
        try:
            self._f.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
