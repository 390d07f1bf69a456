"""Userspace mirror of each VM's memslot table, built from the memslot updates the tracer
observes, in the order the kernel reported them (one ordered ring buffer).

In tracepoint mode it is where *derived* figures come from: the change type of an update
(create / delete / move / flags_only, as KVM decides it in kvm_set_memory_region from the old
and new slot) and the memslots an hva range overlaps. A VM whose slots existed before the trace
started is marked partial: its mirror misses those slots, so derived figures undercount.

Pure Python, no bcc: unit-tested directly.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..consts import Change


@dataclass(frozen=True)
class Slot:
    as_id: int
    slot: int
    gpa: int
    size: int
    hva: int
    flags: int


class SlotTable:
    """One VM's memslots, with sorted hva starts and ends so that the number of slots a range
    overlaps is two binary searches: N - #(end <= start) - #(start >= end). Exact for any set
    of intervals, overlapping ones included (aliases, several address spaces)."""

    def __init__(self) -> None:
        self.slots: Dict[Tuple[int, int], Slot] = {}
        self._starts: List[int] = []
        self._ends: List[int] = []

    def __len__(self) -> int:
        return len(self.slots)

    def _add(self, s: Slot) -> None:
        self.slots[(s.as_id, s.slot)] = s
        insort(self._starts, s.hva)
        insort(self._ends, s.hva + s.size)

    def _remove(self, key: Tuple[int, int]) -> None:
        s = self.slots.pop(key)
        del self._starts[bisect_left(self._starts, s.hva)]
        del self._ends[bisect_left(self._ends, s.hva + s.size)]

    def overlap(self, start: int, end: int) -> int:
        """Number of memslots whose hva range [hva, hva+size) overlaps [start, end)."""
        if end <= start or not self._starts:
            return 0
        ended_before = bisect_right(self._ends, start)  # slot end <= start
        start_after = len(self._starts) - bisect_left(self._starts, end)  # slot start >= end
        return len(self._starts) - ended_before - start_after

    def classify(self, as_id: int, slot: int, gpa: int, size: int, flags: int) -> Optional[Change]:
        """The change KVM makes for this request against the current table (None = no-op).
        Mirrors kvm_set_memory_region: size 0 deletes; a new id creates; a new guest address
        moves; otherwise a flags change is flags-only."""
        old = self.slots.get((as_id, slot))
        if size == 0:
            return Change.DELETE if old is not None else None
        if old is None:
            return Change.CREATE
        if gpa != old.gpa:
            return Change.MOVE
        if flags != old.flags:
            return Change.FLAGS_ONLY
        return None

    def apply(self, as_id: int, slot: int, gpa: int, size: int, hva: int, flags: int) -> Optional[Change]:
        """Apply a *successful* update; returns its change type."""
        change = self.classify(as_id, slot, gpa, size, flags)
        key = (as_id, slot)
        if change is None:
            return None
        if key in self.slots:
            self._remove(key)
        if change != Change.DELETE:
            self._add(Slot(as_id, slot, gpa, size, hva, flags))
        return change


class Mirror:
    """Slot tables of every VM the tracer has seen, keyed by the tracer's VM key."""

    def __init__(self) -> None:
        self.tables: Dict[object, SlotTable] = {}
        self.created_in_trace: set = set()

    def table(self, vm) -> SlotTable:
        t = self.tables.get(vm)
        if t is None:
            t = self.tables[vm] = SlotTable()
        return t

    def vm_created(self, vm) -> None:
        """A VM created while tracing: its table is complete."""
        self.tables[vm] = SlotTable()
        self.created_in_trace.add(vm)

    def partial(self, vm) -> bool:
        return vm not in self.created_in_trace

    def update(self, vm, slot_field: int, gpa: int, size: int, hva: int, flags: int, ok: bool):
        """Returns (change or None, derived_ok). A failed update changes nothing; its change
        type is what it would have been."""
        as_id, slot = slot_field >> 16, slot_field & 0xFFFF
        t = self.table(vm)
        if not ok:
            return t.classify(as_id, slot, gpa, size, flags)
        return t.apply(as_id, slot, gpa, size, hva, flags)

    def overlap(self, vm, start: int, end: int) -> int:
        t = self.tables.get(vm)
        return 0 if t is None else t.overlap(start, end)

    def count(self, vm) -> Optional[int]:
        t = self.tables.get(vm)
        return None if t is None else len(t)
