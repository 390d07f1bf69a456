"""Writing report tables out: spreadsheet-safe CSV (one file per table) and JSON."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

import pandas as pd

from ..errors import UsageError
from .recording import escape_cell


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` whose text cells cannot be evaluated as formulas by a spreadsheet
    (cells starting with = + - @ tab or CR get a leading quote). Numbers stay numbers."""
    out = df.copy()
    for c in out.columns:
        s = out[c]
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype) or isinstance(s.dtype, pd.CategoricalDtype):
            out[c] = [escape_cell(v) if isinstance(v, str) else v for v in s.astype(object)]
    return out


def write_csv_tables(tables: Dict[str, pd.DataFrame], directory: str) -> List[str]:
    """One CSV per table in ``directory`` (created). Returns the paths written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {directory}: {e.strerror}", "choose a writable directory for --csv") from e
    paths = []
    for name, df in tables.items():
        p = os.path.join(directory, f"{name}.csv")
        safe_frame(df).to_csv(p, index=False, float_format="%.6g")
        paths.append(p)
    return paths


def write_csv(df: pd.DataFrame, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"cannot write {path}: no such directory {d}")
    safe_frame(df).to_csv(path, index=False, float_format="%.6g")
    return path


def write_text(path: str, text: str, option: str) -> str:
    """Write a report page (or any text output) to ``path``; an unwritable path is a usage error
    naming the option that gave it."""
    from ..errors import UsageError

    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}", f"choose a writable path for {option}") from e
    return path


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
