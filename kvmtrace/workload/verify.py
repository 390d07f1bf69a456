"""What a tracer measured for the workload VM, next to the workload's own ground truth (the
figures `kvmtrace demo` prints). Pure: a cumulative snapshot and the truth dict in, rows and
lines out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..snapshot import Snapshot


@dataclass(frozen=True)
class Row:
    what: str  # op or change type
    traced: int
    truth: Optional[int]  # None: not exact (the kernel decides) or no ground truth
    latency: str  # "12.3 us (syscall)" or "-"
    slots: str = ""  # "1.00/1 (derived)" or "-" (hva ops only)

    @property
    def match(self) -> str:
        if self.truth is None:
            return ""
        return "equal" if self.traced == self.truth else f"{self.traced - self.truth:+d}"


def hva_rows(snap: Snapshot, pid: int, truth: Optional[dict]) -> List[Row]:
    mine = [h for h in snap.hva if h.pid == pid]
    want = (truth or {}).get("hva_ops") or {}
    out = []
    for op in sorted({h.op for h in mine} | set(want)):
        h = next((x for x in mine if x.op == op), None)
        lat = f"{h.lat_sum_ns / h.lat_count / 1000:.1f} us ({h.lat_provenance})" if h and h.lat_count else "-"
        sl = (f"{h.slots_sum / h.slots_count:.2f}/{h.slots_max} ({h.slots_provenance})"
              if h and h.slots_count else "-")
        out.append(Row(op, h.count if h else 0, want.get(op), lat, sl))
    return out


def memslot_rows(snap: Snapshot, pid: int, truth: Optional[dict]) -> List[Row]:
    mine = [m for m in snap.memslot if m.pid == pid]
    want = (truth or {}).get("memslot_updates") or {}
    out = []
    for ch in sorted({m.change for m in mine} | set(want)):
        m = [x for x in mine if x.change == ch]
        traced = sum(x.count for x in m)
        lat = f"{sum(x.lat_sum_ns for x in m) / traced / 1000:.1f} us ({m[0].lat_provenance})" if traced else "-"
        out.append(Row(ch, traced, want.get(ch), lat))
    return out


def summary_lines(snap: Snapshot, pid: int, truth: Optional[dict], truth_note: str = "") -> List[str]:
    """The demo's closing table: traced vs truth per op and per change type of VM ``pid``."""
    na = lambda v: "n/a" if v is None else v  # noqa: E731
    lines = ["", f"workload VM (pid {pid}): hva operations",
             f"  {'op':<11}{'traced':>10}{'truth':>10}  {'':<8}{'latency mean':>20}  {'slots visited mean/max':>24}"]
    for r in hva_rows(snap, pid, truth):
        lines.append(f"  {r.what:<11}{r.traced:>10}{na(r.truth):>10}  {r.match:<8}{r.latency:>20}  {r.slots:>24}")
    lines.append(f"workload VM (pid {pid}): memslot updates")
    for r in memslot_rows(snap, pid, truth):
        lines.append(f"  {r.what:<11}{r.traced:>10}{na(r.truth):>10}  {r.match:<8}{r.latency:>20}")
    lines.append("  truth: what the workload itself counted (n/a: the kernel decides, e.g. aging); "
                 "traced: what kvmtrace measured.")
    if truth_note:
        lines.append(f"  {truth_note}")
    if snap.lost_events:
        lines.append(f"  lost events: {snap.lost_events} (derived figures cover the events received)")
    return lines
