"""Writing report tables out: spreadsheet-safe CSV (one file per table) and JSON. Paths are
checked (``check_*``) before any work, files are written atomically and never replace an
existing file without ``force`` (kvmtrace/output.py holds the policy and the cell escaping)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import pandas as pd

from .. import output
from ..output import csv_text


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` whose text cells cannot be evaluated as formulas by a spreadsheet
    (cells starting with = + - @ tab or CR get a leading quote) and carry no control character
    (output.csv_text). Numbers stay numbers."""
    out = df.copy()
    for c in out.columns:
        s = out[c]
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype) or isinstance(s.dtype, pd.CategoricalDtype):
            out[c] = [csv_text(v) if isinstance(v, str) else v for v in s.astype(object)]
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


def _frame_to(path: str, df: pd.DataFrame, option: str) -> str:
    with output.AtomicFile(path, option, newline="") as f:
        safe_frame(df).to_csv(f, index=False, float_format="%.6g")
    return path


def write_csv_tables(tables: Dict[str, pd.DataFrame], directory: str, force: bool = False,
                     option: str = "--csv") -> List[str]:
    """One CSV per table in ``directory`` (created, one level). All or nothing: every table is
    written to a temporary file first and the files are renamed into place only when all are
    written; on a failure (full disk) nothing new is left behind. Returns the paths written."""
    output.check_new_dir(directory, option, csv_names(tables), force)
    created = not os.path.isdir(directory)
    output.make_dir(directory, option)
    staged = []
    try:
        for name, df in tables.items():
            path = os.path.join(directory, f"{name}.csv")
            tmp = _frame_to(path + ".part", df, option)
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _path in staged:
            _unlink(tmp)
        if created:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        raise
    return [path for _tmp, path in staged]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_csv(df: pd.DataFrame, path: str, force: bool = False, option: str = "--csv") -> str:
    output.check_new_file(path, option, force)
    return _frame_to(path, df, option)


def write_text(path: str, text: str, option: str, force: bool = False) -> str:
    """Write a report page (or any text output) to ``path``; an unwritable path is a usage error
    naming the option that gave it."""
    output.check_new_file(path, option, force)
    return output.write_text(path, text, option)


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
