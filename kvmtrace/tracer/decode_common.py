"""What both decoders share: the state fed by the ordered event stream (mirrored memslot tables,
raw events kept, memslot updates aggregated in userspace, VMMs seen), the dispatch of one raw
kernel record to the decoder of its mode, and the merge of the decoders' parts into the parts
of one Snapshot.

Pure Python (no bcc, no root): the session hands raw records (bytes) and MapContents
(records.py) in; tests do the same with fakes (tests/test_decoders.py).

    dec = Decoding(plan, keep_events=False)
    dec.on_raw(record_bytes)           # from the ring buffer consumer thread
    parts = dec.decode(map_contents)   # once per interval
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

from ..consts import LOG2_BUCKETS, MS_CHANGE_DERIVE, Change, Op
from ..snapshot import HVA_EVENT_FIELDS, HvaEventBatch, Log2Hist, MemslotEvent, MemslotStats, VmInfo, log2_bucket
from . import records as R
from .mirror import Mirror

OPS = {int(o): o.label for o in Op}
CHANGES = {int(c): c.label for c in Change}
CHANGES[len(Change)] = "unknown"
EXACT_ATTACH = ("kprobe", "fentry")
_HVA = R.BODY_STRUCT["hva"]

ProcInfo = Callable[[int], Tuple[str, str, Optional[int], bool]]


def exact_vm_id(kvm: int, pid: int, ordinal: int = 0) -> str:
    """VM id in exact modes: the struct kvm address, its VMM and the VMM's ordinal of the VM
    (n-th VM it created while traced), since an address freed by one VM can be reused by the
    next; a VM older than the trace (ordinal 0) is ``kvm:ADDR:PID``."""
    return f"kvm:{kvm:#x}:{pid}" + (f"#{ordinal}" if ordinal else "")


def no_proc(pid: int) -> Tuple[str, str, Optional[int], bool]:
    """A host without /proc facts (tests): every process is gone and nameless."""
    return "", "", None, False


class Agg:
    """Userspace-side aggregate for one (vm, op|change)."""

    __slots__ = ("count", "errors", "sum", "max", "hist", "pid", "prov")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.sum = 0
        self.max = 0
        self.hist = [0] * LOG2_BUCKETS
        self.pid = 0
        self.prov = "none"

    def add(self, v: int, n: int = 1) -> None:
        self.count += n
        self.sum += v * n
        if v > self.max:
            self.max = v
        self.hist[log2_bucket(v)] += n


@dataclass
class Parts:
    """A decoder's share of one Snapshot: stats rows, the VMs they name (vm_id -> VMM pid) and
    hva operations that belong to no known VMM."""

    hva: list = field(default_factory=list)
    memslot: list = field(default_factory=list)
    vm_pids: Dict[str, int] = field(default_factory=dict)
    unattributed: int = 0  # ambiguous included
    ambiguous: int = 0  # ops of a known VMM process whose VM cannot be told
    by_memslots: list = field(default_factory=list)  # MemslotBucketStats
    vm_extra: Dict[str, dict] = field(default_factory=dict)  # vm_id -> VmInfo fields the decoder knows
    # exact modes: per VM what the kernel knows of it (VmInfo fields: ordinal, memslots,
    # memslots_max, memslots_provenance, partial, alive)
    vm_info: Dict[str, dict] = field(default_factory=dict)


@dataclass
class SnapshotParts:
    """Everything of a Snapshot that comes from the kernel's records and maps."""

    vms: Tuple[VmInfo, ...]
    hva: tuple
    memslot: tuple
    lost_events: int
    map_full: int
    unattributed: int
    by_memslots: tuple = ()
    ignored_ioctls: int = 0
    ambiguous: int = 0


class Stream:
    """State built from the ordered event stream, shared by the decoders; guarded by ``lock``
    (the consumer thread writes, ``decode`` reads)."""

    def __init__(self, keep_events: bool = False, max_events: int = 2_000_000,
                 proc_info: ProcInfo = no_proc) -> None:
        self.lock = threading.Lock()
        self.keep_events = keep_events
        self.max_events = max_events
        self.proc_info = proc_info
        self.mirror = Mirror()
        self.ms: Dict[Tuple[str, str], Agg] = defaultdict(Agg)
        self.events: deque = deque()
        self.batches: list = []  # HvaEventBatch (columnar raw events, on_batch)
        self.batch_rows = 0
        self.pending: Dict[int, list] = defaultdict(list)
        self.events_dropped = 0
        self.known_vmm: Dict[int, int] = {}
        self.proc_cache: Dict[int, Tuple[str, str]] = {}
        self.proc_fresh: set = set()  # pids named since the last decode (their VM may not be in the maps yet)
        # exact modes: (struct kvm *, VMM tgid) -> ordinal of the live VM (from VM lifetime events)
        self.exact_ordinal: Dict[Tuple[int, int], int] = {}

    def keep(self, e) -> None:
        if not self.keep_events:
            return
        if len(self.events) + self.batch_rows >= self.max_events:
            self.events_dropped += 1
            return
        self.events.append(e)

    def keep_batch(self, cols: dict) -> None:
        """Columnar raw hva events (caller holds the lock); rows beyond max_events dropped
        and counted."""
        n = len(cols["ts_ns"])
        room = self.max_events - len(self.events) - self.batch_rows
        if n > room:
            self.events_dropped += n - max(room, 0)
            if room <= 0:
                return
            cols = {k: v[:room] for k, v in cols.items()}
            n = room
        self.batches.append(HvaEventBatch(tuple((f, cols[f]) for f in HVA_EVENT_FIELDS)))
        self.batch_rows += n

    def take_batches(self) -> tuple:
        """(HvaEventBatch list, other raw event objects) kept since the last call."""
        with self.lock:
            out = (self.batches, list(self.events))
            self.batches, self.batch_rows = [], 0
            self.events.clear()
        return out

    def take_events(self) -> list:
        batches, objs = self.take_batches()
        for b in batches:
            objs += b.events()
        return objs

    def remember(self, pid: int) -> None:
        """Name a VMM while it is alive (VM creation, first memslot update)."""
        if pid and pid not in self.proc_cache:
            comm, name, _vcpus, alive = self.proc_info(pid)
            if alive:
                self.proc_cache[pid] = (comm, name)
                self.proc_fresh.add(pid)

    # -- records common to both modes (caller holds the lock)
    def on_sc_end(self, ev) -> None:
        pend = self.pending.pop(ev.tid, None)
        if pend:
            for e in pend:
                self.keep(_with_latency(e, ev.sc_end.dur_ns))

    def on_vm_create(self, ev) -> None:
        if ev.vm_create.ret >= 0:
            self.remember(ev.tgid)
            self.mirror.vm_created(f"pid:{ev.tgid}")
            self.known_vmm[ev.tgid] = self.known_vmm.get(ev.tgid, 0) + 1

    def on_memslot(self, ev) -> None:
        """A memslot update: ``ev.vm`` is the struct kvm * when an exact program saw it, 0 when
        the ioctl tracepoints did (then the change type is derived from the mirrored table)."""
        self.remember(ev.tgid)
        m = ev.memslot
        slot_field, flags, ret = m.slot, m.flags, m.ret
        ok = ret == 0
        vm = exact_vm_id(ev.vm, ev.tgid, self.exact_ordinal.get((ev.vm, ev.tgid), 0)) if ev.vm else f"pid:{ev.tgid}"
        if ev.vm and m.change != MS_CHANGE_DERIVE:
            # exact: change type measured by the kernel, aggregated in the kernel
            change = CHANGES.get(m.change, "unknown")
            if ok:
                self.mirror.update(vm, slot_field, m.gpa, m.size, m.hva, flags, True)
            cprov, lprov = "exact", "exact"
        else:
            # change type derived from the mirrored table, aggregated here
            ch = self.mirror.update(vm, slot_field, m.gpa, m.size, m.hva, flags, ok)
            change = None if (ch is None and ok) else (ch.label if ch is not None else "unknown")
            cprov, lprov = "derived", ("exact" if ev.vm else "syscall")
            if change is not None:  # None: a no-op request, KVM changed nothing
                a = self.ms[(vm, change)]
                a.add(m.lat_ns)
                a.pid = ev.tgid
                a.prov = lprov
                if not ok:
                    a.errors += 1
        if change is not None:
            self.keep(MemslotEvent(ev.ts, vm, ev.tgid, ev.tid, change, slot_field & 0xFFFF,
                                   slot_field >> 16, m.gpa, m.size, m.hva, flags, int(ret), m.lat_ns,
                                   lprov, cprov))


class Decoding:
    """The decoders a plan needs, fed from one stream. hva records and ``aggs`` rows go to the
    decoder of their op's attach mode (exact or tracepoint): each knows what its keys mean."""

    def __init__(self, plan, keep_events: bool = False, max_events: int = 2_000_000,
                 pid: Optional[int] = None, proc_info: ProcInfo = no_proc,
                 owns_vm: Callable[[int], bool] = lambda pid: False) -> None:
        from .decode_exact import ExactDecoder
        from .decode_tp import TracepointDecoder

        self.plan = plan
        self.pid = pid
        self.stream = Stream(keep_events, max_events, proc_info)
        self.exact = ExactDecoder(plan, self.stream)
        self.tp = TracepointDecoder(plan, self.stream, pid=pid, owns_vm=owns_vm)
        # op number -> decoder of its mode
        self.by_op = {}
        for p in plan.ops:
            if p.kind != "hva" or not p.available:
                continue
            n = int(Op[p.op.upper()])
            self.by_op[n] = self.exact if p.attach in EXACT_ATTACH else self.tp
        self.any_exact = any(p.attach in EXACT_ATTACH for p in plan.ops)
        self._tp_ops = frozenset(n for n, d in self.by_op.items() if d is self.tp)

    def take_events(self) -> list:
        """Raw events decoded since the last call (keep_events=True), as objects."""
        return self.stream.take_events()

    def take_event_batches(self) -> tuple:
        """Raw events decoded since the last call: (HvaEventBatch list, other event objects)."""
        return self.stream.take_batches()

    def on_batch(self, b) -> None:
        """A batch of records read from the ring buffer (numpy structured array, rawevents.py),
        decoded as ``on_raw`` would decode them one by one, but hva records as columns: no
        Python object per hva event."""
        from .rawevents import decode_batch

        decode_batch(self, b)

    def on_raw(self, raw: bytes) -> None:
        """One record from the ring/perf buffer (R.EVENT_SIZE bytes)."""
        st = self.stream
        if not st.keep_events:
            # hot path, tracepoint mode: derive slots visited for one hva range
            _ts, _vm, kind, tgid, _tid, _p = R.HEAD_STRUCT.unpack_from(raw)
            if kind == R.EV_HVA:
                start, end, _lat, _owner, op = _HVA.unpack_from(raw, R.HEAD_SIZE)[:5]
                if op in self._tp_ops:
                    self.tp.on_hva_fast(tgid, op, start, end)
                    return
        ev = R.Event.from_buffer_copy(raw)
        kind = ev.kind
        with st.lock:
            if kind == R.EV_HVA:
                dec = self.by_op.get(ev.hva.op)
                if dec is not None:
                    dec.on_hva(ev)
            elif kind == R.EV_SC_END:
                st.on_sc_end(ev)
            elif kind == R.EV_MEMSLOT:
                if self.tp.ms_tp:  # classified in the kernel, keyed by the VM's gen
                    self.tp.on_memslot(ev)
                else:
                    st.on_memslot(ev)
            elif kind == R.EV_VM_CREATE:
                if self.tp.ms_tp:  # the VM is in the kernel's tables: only name its VMM
                    st.remember(ev.tgid)
                else:
                    st.on_vm_create(ev)
            elif kind == R.EV_VM_LIFE:  # exact modes: kvm_arch_init_vm / kvm_arch_destroy_vm
                self.exact.on_vm_life(ev)

    def decode(self, maps: R.MapContents, extra_lost: int = 0) -> SnapshotParts:
        """The Snapshot parts of one reading of the maps. ``extra_lost``: records the session
        lost before they reached the stream (perf buffer lost callback)."""
        st = self.stream
        with st.lock:
            ms_user = {k: (a.count, a.errors, a.sum, a.max, tuple(a.hist), a.pid, a.prov)
                       for k, a in st.ms.items()}
            mirror_counts = {vm: len(t) for vm, t in st.mirror.tables.items()}
            partial = {vm: st.mirror.partial(vm) for vm in st.mirror.tables}
            dropped = st.events_dropped
        tp = self.tp.decode(maps, known_vmms=not self.any_exact)
        ex = self.exact.decode(maps)
        hva = tp.hva + ex.hva
        memslot: List[MemslotStats] = []
        vm_pids: Dict[str, int] = {}
        vm_pids.update(tp.vm_pids)
        vm_pids.update(ex.vm_pids)
        for (vm, change), (cnt, err, tot, mx, h, pid, prov) in sorted(ms_user.items()):
            memslot.append(MemslotStats(vm, pid, change, cnt, err, Log2Hist(h), tot, mx, prov, "derived"))
            vm_pids[vm] = pid
        memslot += self.tp.memslot(maps, ms_user) + ex.memslot
        vms = []
        for vm, pid in sorted(vm_pids.items()):
            comm, name, vcpus, alive = self.stream.proc_info(pid) if pid else ("", "", None, False)
            if alive:  # remember who it was: a VMM that exits keeps its name in the figures
                st.proc_cache[pid] = (comm, name)
            elif pid in st.proc_cache:
                comm, name = st.proc_cache[pid]
            mc = mirror_counts.get(vm)
            info = VmInfo(vm, pid, comm, name, vcpus if alive else None, mc,
                          "derived" if mc is not None else "none", partial.get(vm, True), alive)
            extra = tp.vm_extra.get(vm)
            if extra:
                info = replace(info, **extra)
            if vm in ex.vm_info:
                info = replace(info, **ex.vm_info[vm])
            vms.append(info)
        with st.lock:  # names of VMMs no VM of this snapshot names are forgotten (bounded by the live VMs)
            keep = set(vm_pids.values()) | st.proc_fresh
            for pid in [p for p in st.proc_cache if p not in keep]:
                del st.proc_cache[pid]
            st.proc_fresh = set()
        counters = maps.counters
        return SnapshotParts(
            vms=tuple(vms), hva=tuple(hva), memslot=tuple(memslot),
            lost_events=counters[R.CNT_LOST] + dropped + extra_lost,
            map_full=counters[R.CNT_MAPFULL], unattributed=tp.unattributed + ex.unattributed,
            by_memslots=tuple(tp.by_memslots + ex.by_memslots),
            ignored_ioctls=counters[R.CNT_IGNORED] if len(counters) > R.CNT_IGNORED else 0,
            ambiguous=tp.ambiguous,
        )


def _with_latency(e, lat: int):
    from dataclasses import replace

    return replace(e, latency_ns=int(lat), lat_provenance="syscall")
