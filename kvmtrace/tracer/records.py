"""ctypes mirrors of the records in kvmtrace/bpf/kvmtrace.c (keep the two in step; the layout
is checked against the C by tests/test_bpf_load.py through a real compile)."""

from __future__ import annotations

import ctypes as ct

EV_HVA, EV_SC_END, EV_MEMSLOT, EV_VM_CREATE, EV_VM_DESTROY = 1, 2, 3, 4, 5
CNT_LOST, CNT_MAPFULL, CNT_NOLAT = 0, 1, 2


class Event(ct.Structure):
    _fields_ = [
        ("ts", ct.c_uint64),
        ("a", ct.c_uint64),
        ("b", ct.c_uint64),
        ("c", ct.c_uint64),
        ("d", ct.c_uint64),
        ("e", ct.c_uint64),
        ("ret", ct.c_int64),
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("x", ct.c_uint32),
        ("vm", ct.c_uint64),
    ]


EVENT_SIZE = ct.sizeof(Event)

# the same record as a struct format, for the hot path: one unpack instead of ctypes field access
import struct  # noqa: E402

EVENT_STRUCT = struct.Struct("<6Qq4IQ")
assert EVENT_STRUCT.size == EVENT_SIZE


# ---------------------------------------------------------------------------- map contents
# What the tracer reads from the kernel once per interval, as plain Python values: the input of
# the decoders (decode_exact.py, decode_tp.py), which therefore run and are tested without bcc
# or root. Keys are the raw integers of the C keys; their meaning is the decoder's business.
from dataclasses import dataclass, field  # noqa: E402
from typing import Dict, Optional, Tuple  # noqa: E402


@dataclass(frozen=True)
class AggRow:
    """One value of the ``aggs`` map (C ``struct agg_val``): per (vm, op) sums and histograms."""

    count: int = 0
    lat_count: int = 0
    lat_sum: int = 0
    lat_max: int = 0
    slots_count: int = 0
    slots_sum: int = 0
    slots_max: int = 0
    scanned_sum: int = 0
    lat: Tuple[int, ...] = ()
    slots: Tuple[int, ...] = ()
    range: Tuple[int, ...] = ()

    @classmethod
    def from_map(cls, v) -> "AggRow":
        s = v.s
        return cls(int(s.count), int(s.lat_count), int(s.lat_sum), int(s.lat_max), int(s.slots_count),
                   int(s.slots_sum), int(s.slots_max), int(s.scanned_sum),
                   tuple(int(x) for x in v.lat), tuple(int(x) for x in v.slots),
                   tuple(int(x) for x in v.range))


@dataclass(frozen=True)
class MsRow:
    """One value of the ``ms_aggs`` map (C ``struct ms_val``): per (vm, change) memslot updates."""

    count: int = 0
    errors: int = 0
    lat_sum: int = 0
    lat_max: int = 0
    lat: Tuple[int, ...] = ()

    @classmethod
    def from_map(cls, v) -> "MsRow":
        return cls(int(v.count), int(v.errors), int(v.lat_sum), int(v.lat_max), tuple(int(x) for x in v.lat))


@dataclass(frozen=True)
class VmRow:
    """One value of the ``vms`` map (C ``struct vm_state``, exact modes): a live VM."""

    tgid: int = 0
    ordinal: int = 0  # n-th VM its VMM created while traced; 0 = older than the trace
    memslots: int = -1  # current memslot count, -1 = unknown
    memslots_max: int = 0

    @classmethod
    def from_map(cls, v) -> "VmRow":
        return cls(int(v.tgid), int(v.ordinal), int(v.memslots), int(v.memslots_max))


@dataclass(frozen=True)
class BucketRow:
    """One value of the ``mbuckets`` map (C ``struct bucket_val``, exact modes): hva ops of one
    (VM, op, log2 bucket of the VM's memslot count at the event)."""

    count: int = 0
    memslots_max: int = 0
    lat_sum: int = 0
    slots_sum: int = 0
    scanned_sum: int = 0

    @classmethod
    def from_map(cls, v) -> "BucketRow":
        return cls(int(v.count), int(v.memslots_max), int(v.lat_sum), int(v.slots_sum), int(v.scanned_sum))


@dataclass(frozen=True)
class MapContents:
    """Every map the decoders need, read once per interval. A map this build does not declare
    (or that the plan does not use) is None.

    ``aggs``: (vm, op, owner) -> AggRow, the C ``struct op_key``: ``vm`` is a ``struct kvm *``
    and ``owner`` its VMM's tgid for ops the plan attaches exactly (kprobe, fentry); ``vm`` is a
    tgid and ``owner`` 0 for ops attached to tracepoints. ``counters``: the CNT_* counters summed
    over CPUs. ``vmm``: tgids the kernel saw create a VM (or seeded at start). ``ms_count``: tgid
    -> memslot ioctls (tracepoint mode). ``ms_aggs``: (vm, change, owner) -> MsRow (exact memslot
    programs)."""

    aggs: Dict[Tuple[int, int, int], AggRow] = field(default_factory=dict)
    counters: Tuple[int, ...] = (0,) * (CNT_NOLAT + 1)
    vmm: Optional[Tuple[int, ...]] = None
    ms_count: Optional[Dict[int, int]] = None
    ms_aggs: Optional[Dict[Tuple[int, int, int], MsRow]] = None
    # exact modes. Keys of aggs / ms_aggs carry a 4th element there, the VM's ordinal (C
    # op_key.ordinal; absent = 0). ``vms``: struct kvm * -> VmRow of live VMs; ``buckets``:
    # (vm, op, owner, ordinal, bucket) -> BucketRow.
    vms: Optional[Dict[int, VmRow]] = None
    buckets: Optional[Dict[Tuple[int, int, int, int, int], BucketRow]] = None
