"""The BPF ring buffer read through its mmap-ed pages, a whole batch of records at a time into
a numpy structured array: no callback and no Python object per record.

Layout (kernel/bpf/ringbuf.c, the same as libbpf reads it): page 0 of the map holds the
consumer position (the only page userspace writes), page 1 the producer position, then the data
area mapped twice in a row, so a run of records that wraps around is contiguous in memory. Every
record is an 8-byte header (u32 length with BUSY (bit 31) and DISCARD (bit 30) flags, u32 page
offset) followed by the record, rounded up to 8 bytes. kvmtrace sends only ``struct event``
(records.EVENT_SIZE), so records have a fixed stride and a batch is one ``np.frombuffer``.

A read takes the records committed between the consumer position and the producer position seen
at its start (so it ends even when the producer never pauses), stops at the first record still
being written (BUSY), copies them out and only then advances the consumer position.

Memory ordering: the producer position and headers are read with plain loads, which is enough on
x86-64 (loads are not reordered with other loads; the kernel publishes with release stores).
``supported()`` says so; elsewhere the session keeps bcc's consumer.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Optional

import numpy as np

from ..consts import Op
from . import records as R

BUSY, DISCARD = 1 << 31, 1 << 30
HDR = 8
STRIDE = (R.EVENT_SIZE + HDR + 7) & ~7
_POS = struct.Struct("<Q")


def supported() -> str:
    """"" when this reader can be used here, else why not."""
    m = os.uname().machine
    if m not in ("x86_64", "amd64"):
        return f"ring buffer read through mmap only on x86-64 (memory ordering), not {m}"
    return ""


def dtype() -> np.dtype:
    """One ring record: header + struct event (fields as records.numpy_fields names them)."""
    names, formats, offsets = R.numpy_fields()
    return np.dtype({"names": ["rb_len"] + names, "formats": ["<u4"] + formats,
                     "offsets": [0] + [HDR + o for o in offsets], "itemsize": STRIDE})


class RingReader:
    """Reads ``struct event`` records from a BPF ring buffer map in batches.

    ``cons``: writable buffer whose first 8 bytes are the consumer position; ``prod``: readable
    buffer = producer position page (``page`` bytes) + the data area twice (``2 * size``)."""

    def __init__(self, cons, prod, size: int, page: int = mmap.PAGESIZE, mmaps=()) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, not {size}")
        self.cons, self.prod, self.size, self.page = cons, prod, size, page
        self.mask = size - 1
        self.dtype = dtype()
        self._mmaps = tuple(mmaps)
        self.records = 0  # records read so far
        self.discarded = 0

    @classmethod
    def open(cls, map_fd: int, size: int) -> "RingReader":
        """Map a BPF_MAP_TYPE_RINGBUF map (``size`` = its max_entries, bytes)."""
        page = mmap.PAGESIZE
        cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError:
            cons.close()
            raise
        return cls(cons, prod, size, page, mmaps=(cons, prod))

    def pending(self) -> int:
        """Bytes written by the kernel and not read yet."""
        return _POS.unpack_from(self.prod, 0)[0] - _POS.unpack_from(self.cons, 0)[0]

    def read(self, limit: Optional[int] = None) -> np.ndarray:
        """The committed records (at most ``limit``) as a structured array (a copy); the
        consumer position advances past them (discarded records are skipped)."""
        cons = _POS.unpack_from(self.cons, 0)[0]
        prod = _POS.unpack_from(self.prod, 0)[0]
        n = (prod - cons) // STRIDE
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return np.empty(0, self.dtype)
        view = np.frombuffer(self.prod, dtype=self.dtype, count=n, offset=self.page + (cons & self.mask))
        lens = view["rb_len"]
        busy = np.flatnonzero(lens & BUSY)
        if busy.size:
            n = int(busy[0])
        out = view[:n].copy()
        del view, lens
        bad = (out["rb_len"] & ~np.uint32(BUSY | DISCARD)) != R.EVENT_SIZE
        if bad.any():
            raise ValueError(f"ring buffer record of {int(out['rb_len'][bad][0]) & 0x3FFFFFFF} bytes: "
                             f"kvmtrace sends only {R.EVENT_SIZE}-byte records")
        _POS.pack_into(self.cons, 0, cons + n * STRIDE)
        keep = (out["rb_len"] & DISCARD) == 0
        if not keep.all():
            self.discarded += int(n - keep.sum())
            out = out[keep]
        self.records += len(out)
        return out

    def close(self) -> None:
        for m in self._mmaps:
            m.close()
        self._mmaps = ()


# ---------------------------------------------------------------------------- batch decoding
def _vm_ids(pid: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """decode_tp.vm_id of each (pid, gen), one str object per distinct VM."""
    from .decode_tp import vm_id

    key = np.stack([pid.astype(np.uint64), gen.astype(np.uint64)], axis=1)
    u, inv = np.unique(key, axis=0, return_inverse=True)
    return np.array([vm_id(int(g), int(p)) for p, g in u.tolist()] + [""], dtype=object)[:-1][inv.reshape(-1)]


_PEND = ("idx", "ts_ns", "pid", "tid", "op", "start", "end", "slots", "memslots", "vm")


def _cat(parts, name, dtype=np.int64):
    return np.concatenate([p[name] for p in parts]) if parts else np.empty(0, dtype)


def decode_batch(dec, b: np.ndarray) -> None:
    """``Decoding.on_batch``: memslot and VM records one by one and in order (they change the
    mirrored tables), hva records per run between them as columns."""
    from .decode_common import OPS, exact_vm_id

    n = len(b)
    if not n:
        return
    st = dec.stream
    keep = st.keep_events
    kind = b["kind"]
    ops = b["hva_op"]
    hva = kind == R.EV_HVA
    tp_ops = np.array(sorted(dec._tp_ops), dtype=np.uint32)
    tp = hva & np.isin(ops, tp_ops)
    ex_ops = np.array(sorted(o for o, d in dec.by_op.items() if d is dec.exact), dtype=np.uint32)
    ex = hva & np.isin(ops, ex_ops)
    sc = kind == R.EV_SC_END
    other = np.flatnonzero(~(hva | sc))
    any_ex = bool(ex.any())
    raw = b.view(np.uint8).reshape(n, STRIDE)
    new_pending = []
    lists = None
    rows = {k: [] for k in _PEND}  # tracepoint hva rows decoded one by one (short runs)
    with st.lock:
        lo = 0
        for j in other.tolist() + [n]:
            if 0 < j - lo < SHORT_RUN:
                # a few hva records between memslot updates: numpy's per-call cost would
                # dominate, so these are decoded one by one from plain lists
                if lists is None:
                    lists = [b[c].tolist() for c in ("tgid", "hva_op", "hva_start", "hva_end", "ts", "tid",
                                                     "hva_slots", "hva_memslots", "vm")]
                    tp_l = tp.tolist()
                for i in range(lo, j):
                    if tp_l[i]:
                        _tp_one(dec, i, lists, rows, keep)
            elif j > lo:
                idx = lo + np.flatnonzero(tp[lo:j])
                if idx.size:
                    p = _tp_run(dec, b, idx, keep)
                    if p is not None:
                        new_pending.append(p)
            if j > lo and any_ex:
                idx = lo + np.flatnonzero(ex[lo:j])
                if idx.size and keep:
                    _exact_run(dec, b, idx, exact_vm_id, OPS)
            if j < n:
                ev = R.Event.from_buffer_copy(raw[j, HDR:HDR + R.EVENT_SIZE].tobytes())
                if ev.kind == R.EV_MEMSLOT:
                    if dec.tp.ms_tp:  # classified in the kernel (decode_tp)
                        dec.tp.on_memslot(ev)
                    else:
                        st.on_memslot(ev)
                elif ev.kind == R.EV_VM_CREATE:
                    if dec.tp.ms_tp:
                        st.remember(ev.tgid)
                    else:
                        st.on_vm_create(ev)
                elif ev.kind == R.EV_VM_LIFE:  # exact modes: a VM created or destroyed
                    dec.exact.on_vm_life(ev)
            lo = j + 1
        if keep and rows["idx"]:
            p = {k: np.array(v, dtype=np.int64) for k, v in rows.items() if k not in ("start", "end")}
            for k in ("start", "end"):  # addresses above 2**63 wrap, as the columns do
                p[k] = np.array(rows[k], dtype=np.uint64).astype(np.int64)
            new_pending.append(p)
        if keep:
            _pair_latency(dec, b, np.flatnonzero(sc), new_pending, OPS)


SHORT_RUN = 48


U32 = 0xFFFFFFFF  # slots / memslots of an op the kernel could not derive


def _tp_one(dec, i, lists, rows, keep) -> None:
    """One tracepoint hva record (``_tp_run`` for a run of one): its kernel-derived figures."""
    if not keep:
        return
    tgid, op, start, end, ts, tid, sl, ms, vm = (c[i] for c in lists)
    for k, v in zip(_PEND, (i, ts, tgid, tid, op, start, end, -1 if sl == U32 else sl,
                            -1 if ms == U32 else ms, vm)):
        rows[k].append(v)


def _tp_run(dec, b, idx, keep):
    """Tracepoint hva records (raw events kept; without them none is streamed): slots visited
    and the memslot count were derived in the kernel (all ones: underived); rows wait for the
    latency of their syscall."""
    if not keep:
        return None
    sl, ms = b["hva_slots"][idx].astype(np.int64), b["hva_memslots"][idx].astype(np.int64)
    return {"idx": idx.astype(np.int64), "ts_ns": b["ts"][idx].astype(np.int64), "pid": b["tgid"][idx].astype(np.int64),
            "tid": b["tid"][idx].astype(np.int64), "op": b["hva_op"][idx].astype(np.int64),
            "start": b["hva_start"][idx].astype(np.int64), "end": b["hva_end"][idx].astype(np.int64),
            "slots": np.where(sl == U32, -1, sl), "memslots": np.where(ms == U32, -1, ms),
            "vm": b["vm"][idx].astype(np.int64)}


def _exact_run(dec, b, idx, exact_vm_id, OPS):
    """Exact hva records with raw events kept: every figure from the kernel."""
    st = dec.stream
    op = b["hva_op"][idx]
    owner = b["hva_owner"][idx].astype(np.int64)
    vm = b["vm"][idx]
    # one VM lifetime: struct kvm *, VMM and the VMM's ordinal of the VM
    key = np.stack([vm, owner.astype(np.uint64), b["hva_ordinal"][idx].astype(np.uint64)], axis=1)
    u, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    ids = [exact_vm_id(int(k), int(o), int(n)) for k, o, n in u.tolist()]
    vm_id = np.array(ids + [""], dtype=object)[:-1][inv]
    mirror = np.array([-1 if st.mirror.count(i) is None else st.mirror.count(i) for i in ids], dtype=np.int64)
    kernel = b["hva_memslots"][idx].astype(np.int64)  # the VM's memslot count at the event
    counts = np.where(kernel != R.NO_COUNT, kernel, mirror[inv])  # all ones: not known in the kernel
    names = np.array([OPS.get(i, "unknown") for i in range(int(op.max()) + 1)] + [""], dtype=object)[:-1]
    slots_ok = np.array([bool(dec.plan.for_op(OPS.get(i, "")) and dec.plan.for_op(OPS.get(i, "")).slots == "exact")
                         for i in range(int(op.max()) + 1)])[op]
    scan_ok = np.array([bool(dec.plan.for_op(OPS.get(i, "")) and dec.plan.for_op(OPS.get(i, "")).scanned == "exact")
                        for i in range(int(op.max()) + 1)])[op]
    m = len(idx)
    st.keep_batch({
        "ts_ns": b["ts"][idx].astype(np.int64), "vm_id": vm_id, "pid": owner, "tid": b["tid"][idx].astype(np.int64),
        "op": names[op], "start": b["hva_start"][idx].astype(np.int64), "end": b["hva_end"][idx].astype(np.int64),
        "latency_ns": b["hva_lat_ns"][idx].astype(np.int64),
        "slots": np.where(slots_ok, b["hva_slots"][idx].astype(np.int64), -1),
        "scanned": np.where(scan_ok, b["hva_scanned"][idx].astype(np.int64), -1),
        "memslots": counts, "lat_provenance": np.full(m, "exact", dtype=object),
        "slots_provenance": np.where(slots_ok, "exact", "none").astype(object),
    })


MAX_PENDING_TIDS = 4096
MAX_PENDING_ROWS = 65536


def _pair_latency(dec, b, sc_idx, new_pending, OPS):
    """Each waiting tracepoint hva row gets the duration of the first syscall end of its thread
    that follows it; rows still waiting carry over to the next batch."""
    parts = ([dec._pending] if getattr(dec, "_pending", None) is not None else []) + new_pending
    if not parts:
        return
    P = {k: _cat(parts, k) for k in _PEND}
    lat = np.full(len(P["ts_ns"]), -1, dtype=np.int64)
    matched = np.zeros(len(lat), dtype=bool)
    if sc_idx.size:
        sc_tid = b["tid"][sc_idx].astype(np.uint64)
        order = np.lexsort((sc_idx, sc_tid))
        s_tid, s_pos = sc_tid[order], sc_idx[order].astype(np.uint64) + np.uint64(1)
        s_dur = b["sc_end_dur_ns"][sc_idx][order].astype(np.int64)
        keys = (s_tid << np.uint64(32)) | s_pos
        hk = (P["tid"].astype(np.uint64) << np.uint64(32)) | (P["idx"] + 1).astype(np.uint64)
        j = np.searchsorted(keys, hk, side="right")
        ok = j < len(keys)
        ok[ok] = s_tid[j[ok]] == P["tid"][ok].astype(np.uint64)
        lat[ok] = s_dur[j[ok]]
        matched = ok
    rest = ~matched
    if len(np.unique(P["tid"][rest])) > MAX_PENDING_TIDS:  # threads that never end a syscall
        matched = np.ones(len(lat), dtype=bool)
        rest = ~matched
    elif rest.sum() > MAX_PENDING_ROWS:
        # hva ops outside any system call (kswapd, page faults) never get a syscall end: the
        # oldest waiting rows are kept without latency, so memory stays bounded
        waiting = np.flatnonzero(rest)
        old = waiting[:len(waiting) - MAX_PENDING_ROWS]
        matched[old] = True
        rest[old] = False
    dec._pending = {k: v[rest] for k, v in P.items()} if rest.any() else None
    if dec._pending is not None:
        dec._pending["idx"] = np.full(int(rest.sum()), -1, dtype=np.int64)
    if not matched.any():
        return
    M = {k: v[matched] for k, v in P.items()}
    L = lat[matched]
    names = np.array([OPS.get(i, "unknown") for i in range(int(M["op"].max()) + 1)] + [""], dtype=object)[:-1]
    m = len(L)
    dec.stream.keep_batch({
        "ts_ns": M["ts_ns"], "vm_id": _vm_ids(M["pid"], M["vm"]), "pid": M["pid"], "tid": M["tid"],
        "op": names[M["op"]], "start": M["start"], "end": M["end"], "latency_ns": L,
        "slots": M["slots"], "scanned": np.full(m, -1, dtype=np.int64), "memslots": M["memslots"],
        "lat_provenance": np.where(L >= 0, "syscall", "none").astype(object),
        "slots_provenance": np.where(M["slots"] >= 0, "derived", "none").astype(object),
    })
