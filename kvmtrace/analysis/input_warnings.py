"""What an input recording's figures cannot be trusted for, as warnings every consumer carries.

``Recording.warnings`` (a list of one-line strings) is the shared interface: the reader adds
what it tolerated (damaged files, an unfinished recorder, a torn interval; recording.py,
integrity.py, rotation.py) and ``read_inputs`` adds what the figures themselves show
(``data_warnings``: lost raw events, a full in-kernel map, underived slot figures, no KVM
activity at all). ``code_of`` gives each line a stable code for programs (report JSON and CSV);
consumers decide by the code, never by matching the text.

A command given inputs that carry warnings prints its output first and then exits with
``InputWarnings.exit_code`` (4) unless the user accepts them (``report --accept-warnings``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

from ..errors import KvmtraceError

# code -> what it means (docs/report.schema.json lists the same)
CODES = {
    "damaged": "files of the recording are missing or corrupt: only the intact prefix is read",
    "crashed": "the recorder did not finish (it crashed, or is still running)",
    "incomplete": "the recording stopped early, or a torn last interval was dropped",
    "lost_events": "raw events were lost (kernel buffer full)",
    "map_full": "an in-kernel map was full: some operations were not counted or have no derived figure",
    "underived": "slots visited could not be derived for some operations",
    "empty": "no KVM activity seen: no hva operation and no memslot update of any VM",
    "retention": "older recordings of a rotation were deleted by --keep",
    "other": "anything else the reader tolerated",
}

# the one-line texts data_warnings writes start with these (code_of relies on it)
_LOST = "raw events lost"
_MAP_FULL = "in-kernel map full"
_UNDERIVED = "slots visited not derivable"
_EMPTY = "no KVM activity seen"

_PATTERNS: Sequence[Tuple[str, "re.Pattern[str]"]] = tuple(
    (code, re.compile(p, re.IGNORECASE)) for code, p in (
        ("lost_events", r"\b" + re.escape(_LOST)),
        ("map_full", r"\b" + re.escape(_MAP_FULL)),
        ("underived", r"\b" + re.escape(_UNDERIVED)),
        ("empty", r"\b" + re.escape(_EMPTY)),
        ("damaged", r"damaged|corrupt|are missing"),
        ("crashed", r"recorder did not finish"),
        ("incomplete", r"stopped early|torn last|not complete|skipped"),
        ("retention", r"deleted by --keep"),
    )
)


def code_of(text: str) -> str:
    """The stable code of one warning line (see CODES); "other" when none applies."""
    for code, pat in _PATTERNS:
        if pat.search(text):
            return code
    return "other"


@dataclass(frozen=True)
class InputWarning:
    """One warning of one input: which input (``source``), its ``code`` and the line itself."""

    source: str
    code: str
    text: str

    def as_dict(self) -> dict:
        return {"source": self.source, "code": self.code, "text": self.text}


def of_recordings(recs: Iterable) -> List[InputWarning]:
    """Every warning of every recording, in input order (empty lines are not warnings)."""
    return [InputWarning(r.source, code_of(w), w) for r in recs for w in r.warnings if w and str(w).strip()]


def _sum(df, col: str) -> int:
    if df is None or df.empty or col not in df:
        return 0
    return int(df[col].fillna(0).sum())


def data_warnings(rec) -> List[str]:
    """The warnings a recording's own figures call for (its tables, as read): raw events lost,
    in-kernel map full, slots visited not derivable, no KVM activity at all. Tables the caller
    did not read are not judged."""
    t = rec.tables
    out: List[str] = []
    iv = t["intervals"] if "intervals" in t else None
    lost = _sum(iv, "lost_events")
    if lost > 0:
        out.append(f"{_LOST}: {lost:,} (kernel buffer full); percentiles fall back to the in-kernel histograms "
                   "where raw events are missing (counts are complete)")
    full = _sum(iv, "map_full")
    if full > 0:
        out.append(f"{_MAP_FULL} {full:,} times: some operations were not counted or got no derived figure, so "
                   "counts may be below the truth")
    hva = t["hva"] if "hva" in t else None
    under = _sum(hva, "underived")
    if under > 0:
        out.append(f"{_UNDERIVED} for {under:,} of {_sum(hva, 'count'):,} hva operations (VM memslots that predate "
                   "the trace, or in-kernel tables full): counted, not guessed")
    mem = t["memslot"] if "memslot" in t else None
    if hva is not None and mem is not None and _sum(hva, "count") == 0 and _sum(mem, "count") == 0:
        vms = t["vms"] if "vms" in t else None
        n_vms = int(vms["vm_id"].nunique()) if vms is not None and not vms.empty else 0
        n_iv = int(len(iv)) if iv is not None else 0
        out.append(f"{_EMPTY}: no hva operation and no memslot update of any VM in {n_iv:,} intervals "
                   f"({n_vms:,} VM{'s' if n_vms != 1 else ''} seen, {_sum(iv, 'unattributed'):,} hva operations of non-VM tasks); check that the "
                   "VM ran while recording (start it after `kvmtrace: attached`)")
    return out


class InputWarnings(KvmtraceError):
    """The inputs carry warnings and the user did not accept them: exit status 4, the code
    every command uses for "inputs carry warnings"."""

    exit_code = 4


EXIT_WARNINGS = InputWarnings.exit_code


def check_accepted(warnings: Sequence[InputWarning], accept: bool, option: str = "--accept-warnings") -> None:
    """After the output is written: raise InputWarnings (exit 4) when there are warnings and
    they were not accepted."""
    if warnings and not accept:
        n = len(warnings)
        codes = ", ".join(sorted({w.code for w in warnings}))
        raise InputWarnings(f"the inputs carry {n} warning{'s' if n != 1 else ''} ({codes}), listed in the output",
                            f"check them; pass {option} to accept them and exit 0")
