"""The one place where text from outside becomes text kvmtrace shows. A VMM chooses its own
comm (``prctl(PR_SET_NAME)``) and QEMU ``-name``; recordings, bench directories and paths carry
labels, host names, kernel strings and statuses written by someone else. All of it is data:

- ``decoded(s)``: valid Unicode to keep or serialise (undecodable bytes become U+FFFD); the
  characters themselves are kept (JSON, Parquet, the report's JSON keep the full name).
- ``printable(s)``: nothing a terminal, a spreadsheet or a browser acts on: C0 and C1 control
  characters, DEL, format and bidirectional controls (U+200E, U+202E, U+2066..., U+FEFF) and
  line/paragraph separators become visible escapes (``\\n``, ``\\x1b``, ``\\u202e``, as
  ``ps`` prints ``?``); an undecodable byte shows as ``\\xNN``. For messages, paths and CSV cells.
- ``display(s)``: ``printable`` capped at ``NAME_CAP`` terminal cells (and characters) with an
  ellipsis, for a name in a table, a header or a metric label.

Rich markup is never parsed in a name: renderers put names in ``rich.text.Text`` (which takes
text literally), never into a markup string. No third-party imports at module level."""

from __future__ import annotations

import unicodedata

NAME_CAP = 64  # terminal cells of a name in a table or header
ELLIPSIS = "…"

# Unicode categories a terminal (or a text layout) may act on rather than show
_ESCAPED = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def _as_str(s) -> str:
    if isinstance(s, (bytes, bytearray)):
        return bytes(s).decode("utf-8", "surrogateescape")
    return s if isinstance(s, str) else str(s)


def decoded(s) -> str:
    """``s`` (text, bytes or any object) as valid Unicode: undecodable bytes (bytes input, or
    the lone surrogates of ``surrogateescape``) become U+FFFD; every other character is kept."""
    if isinstance(s, (bytes, bytearray)):
        return bytes(s).decode("utf-8", "replace")
    s = _as_str(s)
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (from JSON, say)
        return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    cp = ord(c)
    if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte kept by surrogateescape
        return f"\\x{cp - 0xDC00:02x}"
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _piece(c: str) -> str:
    """One character as shown: itself, or its visible escape."""
    if c.isprintable() or unicodedata.category(c) not in _ESCAPED:
        return c
    return _escape(c)


def printable(s) -> str:
    """``s`` with every control, format and separator character made visible (see module)."""
    s = _as_str(s)
    if s.isprintable():
        return s
    return "".join(_piece(c) for c in s)


def _width(c: str) -> int:
    try:
        from rich.cells import get_character_cell_size
    except ImportError:  # pragma: no cover - rich is a dependency; the estimate is close
        return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 0 if unicodedata.combining(c) else 1
    return get_character_cell_size(c)


def display(s, cap: int = NAME_CAP) -> str:
    """``printable(s)`` at most ``cap`` terminal cells and ``cap`` characters wide; a longer
    name is cut (never inside an escape) and ends with "…"."""
    t = printable(s)
    if len(t) <= cap and sum(_width(c) for c in t) <= cap:
        return t
    out, n, w = [], 0, 0
    for c in _as_str(s):
        p = _piece(c)
        pw = sum(_width(x) for x in p)
        if n + len(p) > cap - 1 or w + pw > cap - 1:
            break
        out.append(p)
        n += len(p)
        w += pw
    return "".join(out) + ELLIPSIS


__all__ = ["NAME_CAP", "ELLIPSIS", "decoded", "printable", "display"]
