"""Decoder of tracepoint mode: hva ops seen by their kvm:* tracepoints, keyed in the kernel by
the VMM's tgid; latency bounded by the enclosing syscall (measured in the kernel); slots
visited derived here, event by event, from the mirrored memslot table (mirror.py); memslot
updates seen by the ioctl tracepoints, change type derived from the mirror.

Input: raw records (through decode_common.Decoding) and records.MapContents; output: the parts
of a Snapshot. No bcc, no root: tests/test_decoders.py feeds it fakes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotStats
from . import records as R
from .decode_common import OPS, Agg, Parts, Stream


class TracepointDecoder:
    def __init__(self, plan, stream: Stream, pid: Optional[int] = None,
                 owns_vm: Callable[[int], bool] = lambda pid: False) -> None:
        self.plan = plan
        self.stream = stream
        self.pid = pid  # the session's --pid filter (None: every VMM)
        self.owns_vm = owns_vm
        self.ops = frozenset(p.op for p in plan.ops
                             if p.kind == "hva" and p.attach == "tracepoint")
        ms = plan.for_op("memslot_update")
        self.ms_tp = bool(ms and ms.attach == "tracepoint")
        self.derived: Dict[Tuple[str, str], Agg] = defaultdict(Agg)
        self._vm: Dict[int, str] = {}

    # ------------------------------------------------------------------ event stream
    def on_hva_fast(self, tgid: int, x: int, start: int, end: int) -> None:
        """Hot path (no raw events kept): slots visited of one hva range, aggregated."""
        vm = self._vm.get(tgid)
        if vm is None:
            vm = self._vm[tgid] = f"pid:{tgid}"
        st = self.stream
        with st.lock:
            if vm not in st.mirror.created_in_trace:
                return  # partial mirror: no derived figure (see on_hva)
            key = (vm, OPS.get(x, "unknown"))
            agg = self.derived.get(key)
            if agg is None:
                agg = self.derived[key]
            agg.add(st.mirror.overlap(vm, start, end))

    def on_hva(self, ev) -> None:
        """One hva record (caller holds the stream lock); the raw event waits for the end of
        its syscall, which brings its latency."""
        st = self.stream
        h = ev.hva
        op = OPS.get(h.op, "unknown")
        vm = f"pid:{ev.tgid}"
        memslots = st.mirror.count(vm)
        if st.mirror.partial(vm):
            slots = -1  # memslots predate the trace: the mirror would undercount, so no figure
        else:
            slots = st.mirror.overlap(vm, h.start, h.end)
            self.derived[(vm, op)].add(slots)
        if st.keep_events:
            e = HvaEvent(ev.ts, vm, ev.tgid, ev.tid, op, h.start, h.end, -1, slots, -1,
                         -1 if memslots is None else memslots, "none",
                         "derived" if slots >= 0 else "none")
            st.pending[ev.tid].append(e)
            if len(st.pending) > 4096:  # threads that never end a syscall (kernel threads)
                for tid in list(st.pending)[:1024]:
                    for x in st.pending.pop(tid):
                        st.keep(x)

    # ------------------------------------------------------------------ maps
    def decode(self, maps: R.MapContents, known_vmms: bool = True) -> Parts:
        """hva rows of the ops attached to tracepoints: ``aggs`` keys are (tgid, op, 0).
        ``known_vmms``: also name every VMM known now (VMs without figures yet; not done when
        exact ops name the VMs by their struct kvm)."""
        st = self.stream
        with st.lock:
            derived = {k: (a.count, a.sum, a.max, tuple(a.hist)) for k, a in self.derived.items()}
            known = dict(st.known_vmm)
        out = Parts()
        rows = sorted((k, v) for k, v in maps.aggs.items() if OPS.get(k[1], "unknown") in self.ops)
        if self.ops:
            # VMM tgids: the kernel's own set (added at KVM_CREATE_VM, never lost like an event
            # can be), those seen at start, and any other tgid with figures that owns a VM fd now
            for p in maps.vmm or ():
                known.setdefault(p, 1)
            for (tgid, _op, _owner), _a in rows:
                if tgid not in known and self.owns_vm(tgid):
                    known[tgid] = 1
                    with st.lock:
                        st.known_vmm.setdefault(tgid, 1)
        for (tgid, opn, _owner), a in rows:
            op = OPS.get(opn, "unknown")
            if self.pid is None and tgid not in known:
                out.unattributed += a.count
                continue
            vm = f"pid:{tgid}"
            slots = derived.get((vm, op), (0, 0, 0, None))
            out.vm_pids[vm] = tgid
            out.hva.append(HvaStats(
                vm_id=vm, pid=tgid, op=op, count=a.count,
                lat_hist=Log2Hist.from_counts(a.lat), lat_count=a.lat_count, lat_sum_ns=a.lat_sum,
                lat_max_ns=a.lat_max, lat_provenance="syscall",
                slots_hist=Log2Hist(slots[3]) if slots[3] else Log2Hist(),
                slots_count=slots[0], slots_sum=slots[1], slots_max=slots[2],
                slots_provenance="derived" if slots[0] else "none",
                scanned_sum=None, range_hist=Log2Hist.from_counts(a.range),
            ))
        if known_vmms:
            for p in known:
                if self.pid is None or p == self.pid:
                    out.vm_pids.setdefault(f"pid:{p}", p)
        return out

    def memslot(self, maps: R.MapContents, ms_user: dict) -> List[MemslotStats]:
        """Memslot ioctls counted in the kernel (``ms_count``) but absent from the stream's
        figures: their change type was not observed (event lost, or a no-op request)."""
        if not self.ms_tp or maps.ms_count is None:
            return []
        per_pid_total: Dict[int, int] = defaultdict(int)
        for (_vm, _change), (cnt, _err, _tot, _mx, _h, pid, _prov) in ms_user.items():
            per_pid_total[pid] += cnt
        out = []
        for pid, n in maps.ms_count.items():
            missing = n - per_pid_total.get(pid, 0)
            if missing > 0 and (self.pid is None or pid == self.pid):
                out.append(MemslotStats(f"pid:{pid}", pid, "unknown", missing, 0,
                                        Log2Hist(), 0, 0, "none", "none"))
        return out
