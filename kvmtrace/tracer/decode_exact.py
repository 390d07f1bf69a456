"""Decoder of the exact modes (kprobe, fentry): hva ops timed at entry/exit of their
kvm_mmu_notifier_* callback and their slots counted on the same thread, all aggregated in the
kernel and keyed by one VM lifetime: the ``struct kvm *``, its VMM's tgid and the VMM's ordinal
of the VM (n-th VM it created while traced, from kvm_arch_init_vm; 0 = older than the trace).
Memslot updates are timed around the region-setting function with the change type read by the
kernel (``ms_aggs``); hva ops are also aggregated per log2 bucket of the VM's memslot count at
the event (inside each (VM, op) value of ``aggs``), and the kernel keeps each live VM's memslot count (``vms``).

Input: raw records (through decode_common.Decoding) and records.MapContents; output: the parts
of a Snapshot. No bcc, no root: tests/test_decoders.py feeds it fakes.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotBucketStats, MemslotStats
from . import records as R
from .decode_common import CHANGES, EXACT_ATTACH, OPS, Parts, Stream, exact_vm_id

MAX_DEAD_VMS = 65536  # destroyed VMs remembered (their last memslot count), oldest dropped first


def _split(key: tuple) -> Tuple[int, int, int, int]:
    """(vm, op, owner[, ordinal]) -> (vm, op, owner, ordinal)."""
    return (key[0], key[1], key[2], key[3] if len(key) > 3 else 0)


class ExactDecoder:
    def __init__(self, plan, stream: Stream) -> None:
        self.plan = plan
        self.stream = stream
        self.ops = frozenset(p.op for p in plan.ops if p.kind == "hva" and p.attach in EXACT_ATTACH)
        # memslot count of a live VM is read (linear-scan kernels) or kept from observed
        # updates (interval tree) by the kernel: exact either way, or unknown (-1)
        self.lifetimes = bool(getattr(plan, "vm_lifetime", ()))
        # vm_id -> VmInfo fields of VMs whose creation or destruction was seen (stream lock)
        self.seen: Dict[str, dict] = {}
        self._dead = 0

    # ------------------------------------------------------------------ event stream
    def on_vm_life(self, ev) -> None:
        """kvm_arch_init_vm or kvm_arch_destroy_vm (``ev.vm_life.destroyed``) of the VM ``ev.vm``:
        its VMM, ordinal, memslot count (creation: 0, or -1 when the kernel cannot keep it;
        destruction: the final count) and the largest count seen."""
        st = self.stream
        v = ev.vm_life
        tgid, ordinal = int(v.owner), int(v.ordinal)
        vm = exact_vm_id(ev.vm, tgid, ordinal)
        if not v.destroyed:
            st.exact_ordinal[(ev.vm, tgid)] = ordinal
            st.remember(tgid)
            st.mirror.vm_created(vm)  # its memslots are all seen: the mirror is complete
            self.seen[vm] = {"ordinal": ordinal, "alive": True}
            return
        if st.exact_ordinal.get((ev.vm, tgid)) == ordinal:
            del st.exact_ordinal[(ev.vm, tgid)]
        info = {"ordinal": ordinal, "alive": False, "memslots_max": int(v.memslots_max)}
        if v.memslots >= 0:
            info.update(memslots=int(v.memslots), memslots_provenance="exact")
        self.seen[vm] = info
        self._dead += 1
        if self._dead > MAX_DEAD_VMS:  # bounded: forget the oldest destroyed VMs
            for k in [k for k, x in self.seen.items() if not x["alive"]][: self._dead - MAX_DEAD_VMS]:
                del self.seen[k]
            self._dead = MAX_DEAD_VMS

    def on_hva(self, ev) -> None:
        """One raw hva record (raw events kept; caller holds the stream lock): everything was
        measured in the kernel, with the VM's ordinal and its memslot count at the event."""
        st = self.stream
        h = ev.hva
        op = OPS.get(h.op, "unknown")
        vm = exact_vm_id(ev.vm, h.owner, h.ordinal)
        memslots = int(h.memslots)
        if memslots == R.NO_COUNT:  # not known in the kernel
            mc = st.mirror.count(vm)
            memslots = -1 if mc is None else mc
        p = self.plan.for_op(op)
        slots_ok = p is not None and p.slots == "exact"
        scanned_ok = p is not None and p.scanned == "exact"
        st.keep(HvaEvent(ev.ts, vm, int(h.owner), ev.tid, op, h.start, h.end, h.lat_ns,
                         h.slots if slots_ok else -1, h.scanned if scanned_ok else -1,
                         memslots, "exact", "exact" if slots_ok else "none"))

    # ------------------------------------------------------------------ maps
    def decode(self, maps: R.MapContents) -> Parts:
        """hva rows of the ops attached exactly (``aggs`` keys are (struct kvm *, op, VMM tgid,
        ordinal)), memslot rows from ``ms_aggs`` (keys (struct kvm *, change, VMM tgid,
        ordinal)), memslot-count buckets from ``buckets`` and VM facts from ``vms``."""
        out = Parts()
        lin = bool(self.plan.linear_scan)
        for key, a in sorted(maps.aggs.items()):
            kvm, opn, owner, ordinal = _split(key)
            op = OPS.get(opn, "unknown")
            if op not in self.ops:
                continue
            vm = exact_vm_id(kvm, owner, ordinal)
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
            for key, v in sorted(maps.ms_aggs.items()):
                kvm, change, owner, ordinal = _split(key)
                vm = exact_vm_id(kvm, owner, ordinal)
                out.vm_pids[vm] = owner
                out.memslot.append(MemslotStats(vm, owner, CHANGES.get(change, "unknown"), v.count,
                                                v.errors, Log2Hist.from_counts(v.lat), v.lat_sum,
                                                v.lat_max, "exact", "exact"))
        for (kvm, opn, owner, ordinal, bucket), b in sorted((maps.buckets or {}).items()):
            op = OPS.get(opn, "unknown")
            if op not in self.ops:
                continue
            op_plan = self.plan.for_op(op)
            slots_ok = op_plan is not None and op_plan.slots == "exact"
            scanned_ok = lin and op_plan is not None and op_plan.scanned == "exact"
            vm = exact_vm_id(kvm, owner, ordinal)
            out.vm_pids.setdefault(vm, owner)
            out.by_memslots.append(MemslotBucketStats(
                vm_id=vm, pid=owner, op=op, bucket=bucket, count=b.count, memslots_max=b.memslots_max,
                lat_count=b.count, lat_sum_ns=b.lat_sum,
                slots_count=b.count if slots_ok else 0, slots_sum=b.slots_sum if slots_ok else 0,
                scanned_sum=b.scanned_sum if scanned_ok else None,
                lat_provenance="exact", slots_provenance="exact" if slots_ok else "none",
            ))
        with self.stream.lock:
            seen = {vm: dict(v) for vm, v in self.seen.items()}
        for kvm, v in (maps.vms or {}).items():  # live VMs: what the kernel knows now
            vm = exact_vm_id(kvm, v.tgid, v.ordinal)
            info = seen.setdefault(vm, {"ordinal": v.ordinal, "alive": True})
            if v.memslots >= 0:
                info.update(memslots=v.memslots, memslots_provenance="exact")
            if v.memslots_max or v.memslots >= 0:
                info["memslots_max"] = max(v.memslots_max, v.memslots)
            out.vm_pids.setdefault(vm, v.tgid)
        for vm, info in seen.items():
            if vm not in out.vm_pids:
                continue  # no figures: not shown (as before VM lifetimes were observed)
            if info.get("ordinal"):
                info["partial"] = False  # created while traced: every memslot seen
            out.vm_info[vm] = info
        return out
