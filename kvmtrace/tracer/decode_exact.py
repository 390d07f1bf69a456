"""Decoder of the exact modes (kprobe, fentry): hva ops timed at entry/exit of their
kvm_mmu_notifier_* callback and their slots counted on the same thread, all aggregated in the
kernel and keyed by the ``struct kvm *`` and its VMM's tgid; memslot updates timed around the
region-setting function with the change type read by the kernel (``ms_aggs``).

Input: raw records (through decode_common.Decoding) and records.MapContents; output: the parts
of a Snapshot. No bcc, no root: tests/test_decoders.py feeds it fakes.
"""

from __future__ import annotations

from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotStats
from . import records as R
from .decode_common import CHANGES, EXACT_ATTACH, OPS, Parts, Stream, exact_vm_id


class ExactDecoder:
    def __init__(self, plan, stream: Stream) -> None:
        self.plan = plan
        self.stream = stream
        self.ops = frozenset(p.op for p in plan.ops if p.kind == "hva" and p.attach in EXACT_ATTACH)

    # ------------------------------------------------------------------ event stream
    def on_hva(self, ev) -> None:
        """One raw hva record (raw events kept; caller holds the stream lock): everything was
        measured in the kernel; ``ev.e`` carries the VM's VMM tgid, ``ev.d`` slots visited (low
        32 bits) and scanned (high 32 bits)."""
        st = self.stream
        op = OPS.get(ev.x, "unknown")
        vm = exact_vm_id(ev.vm, ev.e)
        memslots = st.mirror.count(vm)
        p = self.plan.for_op(op)
        slots_ok = p is not None and p.slots == "exact"
        scanned_ok = p is not None and p.scanned == "exact"
        st.keep(HvaEvent(ev.ts, vm, int(ev.e), ev.tid, op, ev.a, ev.b, ev.c,
                         (ev.d & 0xFFFFFFFF) if slots_ok else -1, (ev.d >> 32) if scanned_ok else -1,
                         -1 if memslots is None else memslots, "exact", "exact" if slots_ok else "none"))

    # ------------------------------------------------------------------ maps
    def decode(self, maps: R.MapContents) -> Parts:
        """hva rows of the ops attached exactly (``aggs`` keys are (struct kvm *, op, VMM tgid))
        and memslot rows from ``ms_aggs`` (keys (struct kvm *, change, VMM tgid))."""
        out = Parts()
        lin = bool(self.plan.linear_scan)
        for (kvm, opn, owner), a in sorted(maps.aggs.items()):
            op = OPS.get(opn, "unknown")
            if op not in self.ops:
                continue
            vm = exact_vm_id(kvm, owner)
            op_plan = self.plan.for_op(op)
            slots = (0, 0, 0, None)
            if op_plan is not None and op_plan.slots == "exact":  # one figure per operation
                slots = (a.count, a.slots_sum, a.slots_max, a.slots)
            scanned = None
            if lin and op_plan is not None and op_plan.scanned == "exact":
                scanned = a.scanned_sum
            out.vm_pids[vm] = owner
            out.hva.append(HvaStats(
                vm_id=vm, pid=owner, op=op, count=a.count,
                lat_hist=Log2Hist.from_counts(a.lat), lat_count=a.count, lat_sum_ns=a.lat_sum,
                lat_max_ns=a.lat_max, lat_provenance="exact",
                slots_hist=Log2Hist.from_counts(slots[3]) if slots[3] else Log2Hist(),
                slots_count=slots[0], slots_sum=slots[1], slots_max=slots[2],
                slots_provenance="exact" if slots[0] else "none",
                scanned_sum=scanned, range_hist=Log2Hist.from_counts(a.range),
            ))
        if maps.ms_aggs is not None:  # exact memslot programs built
            for (kvm, change, owner), v in sorted(maps.ms_aggs.items()):
                vm = exact_vm_id(kvm, owner)
                out.vm_pids[vm] = owner
                out.memslot.append(MemslotStats(vm, owner, CHANGES.get(change, "unknown"), v.count,
                                                v.errors, Log2Hist.from_counts(v.lat), v.lat_sum,
                                                v.lat_max, "exact", "exact"))
        return out
