"""Decoder of tracepoint mode. Everything is derived in the kernel (kvmtrace.c, "Tracepoint
mode"): VMs are told apart by the descriptor KVM_CREATE_VM returned (a *gen* per VM lifetime),
each VM's memslot table lives in BPF maps, kept current from the memslot ioctls, which gives the
change type of every update and, per hva op, the slots it overlaps and the VM's memslot count at
that moment; the kernel aggregates per (VM, op) and per (VM, op, memslot-count bucket).
Userspace reads the maps once per interval; no hva record reaches it unless raw events are kept.

Input: records.MapContents (``tp``: records.TpMaps) and, with raw events, records; output: the
parts of a Snapshot. No bcc, no root: tests/test_decoders.py feeds it fakes.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Set, Tuple

from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotBucketStats, MemslotEvent, MemslotStats
from . import records as R
from .decode_common import CHANGES, OPS, Parts, Stream

U32 = 0xFFFFFFFF  # slots / memslots of an op the kernel could not derive


def tp_cflags(plan, btf_path: str = "/sys/kernel/btf/vmlinux") -> List[str]:
    """Extra -D flags of tracepoint mode: per-thread state in task-local storage where the kernel
    has BTF (task storage for tracing programs is 5.11+, tracepoint mode needs 5.13+), else an
    LRU hash keyed by thread id."""
    if not any(p.kind == "hva" and p.attach == "tracepoint" for p in plan.ops):
        return []
    return ["-DTP_TASK_STORAGE"] if os.path.exists(btf_path) else []


def seed_gen(tgid: int, fd: int) -> int:
    """The gen userspace gives a VM found running at attach (its descriptor in /proc)."""
    return R.SEED_GEN_BASE | (tgid << 24) | (fd & 0xFFFFFF)


def vm_id(gen: int, tgid: int) -> str:
    """Stable id of one VM lifetime: its VMM and the kernel's gen, or for a VM that predates
    the trace its descriptor number."""
    if gen >= R.SEED_GEN_BASE:
        return f"vm:{tgid}:fd{gen & 0xFFFFFF}"
    return f"vm:{tgid}:{gen}"


class TracepointDecoder:
    def __init__(self, plan, stream: Stream, pid: Optional[int] = None,
                 owns_vm: Callable[[int], bool] = lambda pid: False) -> None:
        self.plan = plan
        self.stream = stream
        self.pid = pid  # the session's --pid filter (None: every VMM); applied in the kernel
        self.ops = frozenset(p.op for p in plan.ops
                             if p.kind == "hva" and p.attach == "tracepoint")
        # kernels before 5.17 scan every used memslot per callback: scanned = the VM's count
        self.linear = bool(getattr(plan, "linear_scan", False))
        ms = plan.for_op("memslot_update")
        self.ms_tp = bool(ms and ms.attach == "tracepoint")
        # VMs seen and not yet retired (gen -> last row read). A retired VM is forgotten: its
        # final figures were in the snapshot of the reading that retired it, and no later one
        # holds it (snapshot.py: cost follows the live VMs, not every VM that ever ran).
        # ``retired_ops``: op number -> operations of every VM retired (bounded: one per op).
        self.vms: Dict[int, R.TpVmRow] = {}
        self.retired_ops: Dict[int, int] = {}
        self._dead_before: Set[int] = set()

    # ------------------------------------------------------------------ raw events (--events)
    def on_hva_fast(self, tgid: int, x: int, start: int, end: int) -> None:
        """Never called in tracepoint mode: without raw events no hva record is streamed."""

    def on_hva(self, ev) -> None:
        """One raw hva record (caller holds the stream lock): slots and the memslot count were
        derived in the kernel (all ones = underived); the latency arrives with the syscall end."""
        st = self.stream
        if not st.keep_events:
            return
        h = ev.hva
        op = OPS.get(h.op, "unknown")
        derived = h.slots != U32
        e = HvaEvent(ev.ts, vm_id(ev.vm, ev.tgid) if ev.vm else "", ev.tgid, ev.tid, op, h.start, h.end, -1,
                     int(h.slots) if derived else -1, -1, int(h.memslots) if h.memslots != U32 else -1, "none",
                     "derived" if derived else "none")
        st.pending[ev.tid].append(e)
        if len(st.pending) > 4096:  # threads that never end a syscall (kernel threads)
            for tid in list(st.pending)[:1024]:
                for x in st.pending.pop(tid):
                    st.keep(x)

    def on_memslot(self, ev) -> None:
        """One raw memslot update (caller holds the lock); its change type came from the kernel."""
        st = self.stream
        st.remember(ev.tgid)
        m = ev.memslot
        change = CHANGES.get(m.change, "unknown")
        st.keep(MemslotEvent(ev.ts, vm_id(ev.vm, ev.tgid), ev.tgid, ev.tid, change, m.slot & 0xFFFF,
                             m.slot >> 16, m.gpa, m.size, m.hva, m.flags, int(m.ret), m.lat_ns,
                             "syscall", "derived" if change != "unknown" else "none"))

    # ------------------------------------------------------------------ maps
    def decode(self, maps: R.MapContents, known_vmms: bool = True) -> Parts:
        """hva rows, memslot-bucket rows and VM facts of this reading."""
        out = Parts()
        tp = maps.tp
        if tp is None:
            return out
        self.vms.update(tp.vms)
        for (gen, opn, tgid), r in sorted(tp.aggs.items()):
            op = OPS.get(opn, "unknown")
            if op not in self.ops:
                continue
            a = r.agg
            if gen == 0:  # no known VMM (tgid 0: kswapd, another process's madvise, ...), or a
                # known VMM whose VM cannot be told (ambiguous: kvmtrace.c, on_hva_tp)
                out.unattributed += a.count
                if tgid:
                    out.ambiguous += a.count
                continue
            vm = vm_id(gen, tgid)
            out.vm_pids[vm] = tgid
            out.hva.append(HvaStats(
                vm_id=vm, pid=tgid, op=op, count=a.count,
                lat_hist=Log2Hist.from_counts(a.lat), lat_count=a.lat_count, lat_sum_ns=a.lat_sum,
                lat_max_ns=a.lat_max, lat_provenance="syscall" if a.lat_count else "none",
                slots_hist=Log2Hist.from_counts(a.slots), slots_count=a.slots_count,
                slots_sum=a.slots_sum, slots_max=a.slots_max,
                slots_provenance="derived" if a.slots_count else "none",
                scanned_sum=a.scanned_sum if self.linear else None,
                range_hist=Log2Hist.from_counts(a.range), underived=r.underived,
            ))
            for i, b in enumerate(r.buckets):
                if b.count:
                    out.by_memslots.append(MemslotBucketStats(
                        vm_id=vm, pid=tgid, op=op, bucket=i, count=b.count, memslots_max=b.nmax,
                        lat_count=b.lat_count, lat_sum_ns=b.lat_sum, slots_count=b.count,
                        slots_sum=b.slots_sum, scanned_sum=b.nsum if self.linear else None,
                        lat_provenance="syscall" if b.lat_count else "none", slots_provenance="derived"))
        for gen, v in self.vms.items():
            if self.pid is not None and v.tgid != self.pid:
                continue
            vm = vm_id(gen, v.tgid)
            out.vm_pids.setdefault(vm, v.tgid)
            out.vm_extra[vm] = dict(
                ordinal=v.ordinal, partial=v.partial,
                memslots=None if v.partial else v.n, memslots_max=None if v.partial else v.nmax,
                memslots_provenance="none" if v.partial else "derived",
                **({"alive": False} if v.dead else {}))
        return out

    def memslot(self, maps: R.MapContents, ms_user: dict) -> List[MemslotStats]:
        """Memslot updates per (VM, change type), counted and classified in the kernel; an update
        whose type cannot be known (a slot of a VM that predates the trace) is ``unknown``."""
        tp = maps.tp
        if tp is None or not self.ms_tp:
            return []
        out = []
        for (gen, ch, tgid), m in sorted(tp.ms.items()):
            change = CHANGES.get(ch, "unknown")
            out.append(MemslotStats(vm_id(gen, tgid), tgid, change, m.count, m.errors,
                                    Log2Hist.from_counts(m.lat), m.lat_sum, m.lat_max, "syscall",
                                    "derived" if change != "unknown" else "none"))
        return out

    def retire(self, maps: R.MapContents) -> Tuple[List[tuple], List[tuple], List[int]]:
        """VMs dead at this reading and the one before (no figure can change any more): this
        reading's snapshot holds their final figures, the session deletes the returned keys
        (aggs, ms, gens) from the maps and the decoder forgets them, which keeps the kernel's
        tables and every later snapshot bounded however many VMs come and go."""
        tp = maps.tp
        if tp is None:
            return [], [], []
        dead = {g for g, v in tp.vms.items() if v.dead}
        gone = sorted(dead & self._dead_before)
        self._dead_before = dead - set(gone)
        gs = set(gone)
        agg_keys = [k for k in tp.aggs if k[0] in gs]
        ms_keys = [k for k in tp.ms if k[0] in gs]
        for k in agg_keys:
            self.retired_ops[k[1]] = self.retired_ops.get(k[1], 0) + tp.aggs[k].agg.count
        for g in gone:
            self.vms.pop(g, None)
        return agg_keys, ms_keys, gone
