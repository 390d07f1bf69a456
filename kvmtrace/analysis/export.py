"""Writing report tables out: spreadsheet-safe, exact CSV (one file per table) and JSON. Paths
are checked (``check_*``) before any work, files are written atomically and never replace an
existing file without ``force`` (kvmtrace/output.py holds the policy and the cell escaping).

Every CSV kvmtrace writes from a table (report --csv, compare --csv, demo --csv) goes through
``csv_frame``: integers as integers, other numbers at full precision (``output.csv_number``:
reads back as the same float), Unix times as ISO 8601 UTC with nanoseconds
(``TIME_COLUMNS``), empty cells for not applicable (NaN, and the -1 "unknown" of
``NA_IF_NEGATIVE``), booleans 1/0, text escaped for spreadsheets."""

from __future__ import annotations

import json
import math
import os
import time
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .. import output
from ..output import csv_cell, csv_number, csv_text

# columns in which a negative integer means "unknown / not applicable" (kvmtrace's tables keep
# -1 there: bench_slots and compare's slots outside bench runs, memslot and vCPU counts not known)
NA_IF_NEGATIVE = frozenset({"bench_slots", "slots", "memslots", "memslots_max", "memslots_min", "vcpus"})
# Unix times in seconds (floats): written as ISO 8601 UTC with nanoseconds
TIME_COLUMNS = frozenset({"start", "end", "t_start", "t_end"})


def iso_time(t: float) -> str:
    """A Unix time (float seconds) as ISO 8601 UTC with nanoseconds, "2026-12-07T20:41:50.123456768Z":
    the float's exact value to the nearest ns, so reading it back (integer ns / 1e9) gives the
    same float. Out of the calendar's range: the number itself (``csv_number``)."""
    ns = round(Fraction(t) * 10**9)
    s, frac = divmod(ns, 10**9)
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"
    except (OverflowError, OSError, ValueError):
        return csv_number(t)


def _cell(v, na_if_negative: bool, is_time: bool) -> str:
    if v is None or v is pd.NA or v is pd.NaT:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return csv_cell(bool(v))
    if isinstance(v, (int, np.integer)):
        return "" if na_if_negative and v < 0 else str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f) or (na_if_negative and f < 0):
            return ""
        return iso_time(f) if is_time and math.isfinite(f) else csv_number(f)
    if isinstance(v, str):
        return csv_text(v)
    return csv_text(str(v))


def _float_cells(v: np.ndarray, na_if_negative: bool) -> List[str]:
    """``output.csv_number`` over a float array, vectorised (a report can have millions of cells)."""
    out = np.full(len(v), "", dtype=object)
    ok = ~np.isnan(v)
    if na_if_negative:
        ok &= ~(v < 0)
    whole = ok & np.isfinite(v) & (np.abs(np.where(ok, v, 0)) < 1e16)
    whole &= np.where(whole, v, 0) == np.floor(np.where(whole, v, 0))
    out[whole] = v[whole].astype(np.int64).astype(str)
    rest = ok & ~whole
    out[rest] = [repr(x) for x in v[rest].tolist()]
    return out.tolist()


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every cell as its exact CSV text (see the module docstring)."""
    cols = {}
    for i, c in enumerate(df.columns):
        na, t = c in NA_IF_NEGATIVE, c in TIME_COLUMNS
        col = df.iloc[:, i]
        if pd.api.types.is_integer_dtype(col.dtype) and not isinstance(col.dtype, pd.CategoricalDtype) \
                and not col.hasnans:  # the common case, without a Python call per cell
            text = col.astype("int64").astype(str)
            cols[i] = text.where(~(col < 0), "").tolist() if na else text.tolist()
        elif pd.api.types.is_float_dtype(col.dtype) and not t:
            cols[i] = _float_cells(col.to_numpy(dtype=np.float64), na)
        else:
            cols[i] = [_cell(v, na, t) for v in col.astype(object).tolist()]
    out = pd.DataFrame(cols, index=range(len(df)), dtype=object)
    out.columns = list(df.columns)
    return out


def csv_names(tables: Sequence[str]) -> List[str]:
    return [f"{name}.csv" for name in tables]


def check_csv_dir(directory: Optional[str], tables: Sequence[str], force: bool = False, option: str = "--csv") -> None:
    """Before any work: ``directory`` can receive one CSV per table (see output.check_new_dir)."""
    if directory:
        output.check_new_dir(directory, option, csv_names(tables), force)


def check_file(path: Optional[str], option: str, force: bool = False) -> None:
    """Before any work: ``path`` can be written (see output.check_new_file)."""
    if path:
        output.check_new_file(path, option, force)


def _frame_to(path: str, df: pd.DataFrame, option: str, replace: bool = True) -> str:
    with output.AtomicFile(path, option, newline="", replace=replace) as f:
        csv_frame(df).to_csv(f, index=False)
    return path


def write_csv_tables(tables: Dict[str, pd.DataFrame], directory: str, force: bool = False,
                     option: str = "--csv") -> List[str]:
    """One CSV per table in ``directory`` (created 0750, one level; an existing one must be the
    invoking user's, see output.check_dir_stat). All or nothing: every table is written to a
    temporary file first (O_EXCL|O_NOFOLLOW, through the directory's descriptor) and the files
    are renamed into place only when all are written; on a failure (full disk) nothing new is
    left behind. Returns the paths written."""
    output.check_new_dir(directory, option, csv_names(tables), force)
    created = not os.path.lexists(directory)
    dfd = output.open_dir(directory, option, create=True)
    staged = []
    placed = []
    try:
        for name, df in tables.items():
            fd, tmp = output.create_temp(f"{name}.csv", dfd)
            staged.append((tmp, f"{name}.csv"))
            with os.fdopen(fd, "w", newline="") as f:
                csv_frame(df).to_csv(f, index=False)
                f.flush()
                os.fsync(f.fileno())
        for tmp, name in staged:
            try:
                output.place(tmp, name, dfd, replace=force)
            except FileExistsError:
                raise output.appeared(option, os.path.join(directory, name)) from None
            placed.append(name)
    except BaseException as e:
        for tmp, _name in staged:
            output.unlink_quiet(tmp, dfd)
        if not force:
            for name in placed:  # new files only (never replaced): all or nothing
                output.unlink_quiet(name, dfd)
        if created:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise output.UsageError(f"cannot write {option} {output.shown(directory)}: {e.strerror or e}",
                                    f"choose a writable directory with free space for {option}") from None
        raise
    finally:
        os.close(dfd)
    return [os.path.join(directory, name) for _tmp, name in staged]


def write_csv(df: pd.DataFrame, path: str, force: bool = False, option: str = "--csv") -> str:
    output.check_new_file(path, option, force)
    return _frame_to(path, df, option, replace=force)


def write_text(path: str, text: str, option: str, force: bool = False) -> str:
    """Write a report page (or any text output) to ``path``; an unwritable path is a usage error
    naming the option that gave it."""
    output.check_new_file(path, option, force)
    return output.write_text(path, text, option, replace=force)


def snapshot_frame(snap) -> pd.DataFrame:
    """The hva and memslot tables of one cumulative snapshot in one frame (column ``table``
    says which), as `kvmtrace demo --csv` writes it."""
    from .tables import frames_from_snapshots

    frames = frames_from_snapshots([snap])
    parts = []
    for table in ("hva", "memslot"):
        df = frames[table].copy()
        df.insert(0, "table", table)
        parts.append(df)
    return pd.concat(parts, ignore_index=True, sort=False)


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def dumps(doc) -> str:
    """JSON text with NaN/inf as null (strict JSON)."""
    return json.dumps(_clean(doc), indent=1, allow_nan=False, default=str)
