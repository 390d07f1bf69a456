"""The one number formatter of kvmtrace: the live view, the plain outputs, reports and
comparisons all show durations, rates and counts through these pure functions. Unknown
values (None, NaN, unparsable) are shown as "-"."""

from __future__ import annotations

import math
from typing import Optional

DASH = "-"


def _num(v) -> Optional[float]:
    """v as a float, or None for missing, unparsable and NaN values."""
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt_rate(v: Optional[float]) -> str:
    """Compact rate for the live view: 0, 0.5, 12, 123, 1.2k, 12k, 123k, 1.2M."""
    if v is None:
        return DASH
    if v == 0:
        return "0"
    if v < 10:
        return f"{v:.1f}"
    if v < 1000:
        return f"{v:.0f}"
    for div, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
        x = v / div
        if x < 10:
            return f"{x:.1f}{suffix}"
        if x < 1000:
            return f"{x:.0f}{suffix}"
    return f"{v / 1e12:.0f}T"


def fmt_ns(v, style: str = "compact") -> str:
    """Duration from nanoseconds. ``compact`` (the live view's narrow columns): 870ns, 1.2µs,
    12µs, 123µs, 1.5ms, 2.0s. ``report`` (report and compare tables): three significant digits
    and a space: 870 ns, 1.21 µs, 509 ms, 2 s."""
    v = _num(v)
    if v is None:
        return DASH
    if style == "report":
        for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.3g} {unit}"
        return f"{v:.0f} ns"
    if v < 0:
        return "-" + fmt_ns(-v)
    if math.isinf(v):
        return "inf"
    for div, unit in ((1.0, "ns"), (1e3, "µs"), (1e6, "ms")):
        x = v / div
        if x < 1000:
            if div == 1.0 or x >= 10:
                return f"{x:.0f}{unit}"
            return f"{x:.1f}{unit}"
    x = v / 1e9
    return f"{x:.1f}s" if x < 10 else f"{x:.0f}s"


def fmt_s(v, style: str = "compact") -> str:
    """Duration from seconds (see fmt_ns)."""
    v = _num(v)
    return DASH if v is None else fmt_ns(v * 1e9, style)


def fmt_mean(v: Optional[float]) -> str:
    if v is None:
        return DASH
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_int(v: Optional[int]) -> str:
    return DASH if v is None else str(int(v))


def fmt_count(v: int) -> str:
    """Compact count for histogram rows: 12, 1234, 12.3k, 1.2M."""
    if v < 10000:
        return str(v)
    return fmt_rate(float(v))


def fmt_duration(s: float) -> str:
    """Elapsed time: 42s, 3m05s, 1h02m."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def plain_num(v: Optional[float], digits: int = 1) -> str:
    """Uncompacted number for script output (awk-friendly): '-' when unknown."""
    if v is None:
        return DASH
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"
