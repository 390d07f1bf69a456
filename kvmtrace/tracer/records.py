"""ctypes mirrors of the records in kvmtrace/bpf/kvmtrace.c (keep the two in step; the layout
is checked against the C by tests/test_bpf_load.py through a real compile)."""

from __future__ import annotations

import ctypes as ct

EV_HVA, EV_SC_END, EV_MEMSLOT, EV_VM_CREATE = 1, 2, 3, 4
CNT_LOST, CNT_MAPFULL, CNT_NOLAT, CNT_IGNORED = 0, 1, 2, 3


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
