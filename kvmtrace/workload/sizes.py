"""Byte sizes as users write them: 4096, 4k, 4K, 4KiB, 2M, 2MiB, 1G."""

from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text, what: str = "size") -> int:
    """Bytes from '4096', '4k', '2M', '2MiB', '1g' (binary units). Raises UsageError."""
    if isinstance(text, int):
        n = text
    else:
        m = _RE.match(str(text))
        if not m:
            raise UsageError(
                f"{what} {text!r} is not a size",
                "write a number of bytes with an optional binary suffix: 4096, 4k, 64k, 2M, 1G",
            )
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise UsageError(f"{what} must be positive, got {text!r}", "use e.g. 4k or 2M")
    return n


def format_size(n: int) -> str:
    """'4 KiB', '2 MiB', '1.5 GiB', '123 B'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
