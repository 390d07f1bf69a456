"""The one definition of every record kvmtrace's BPF programs send to userspace, and of the
values it reads from the maps.

The streamed record (C ``struct event``) is defined HERE, field by field, and the C is generated
from it: ``c_header()`` is prepended to kvmtrace.c by ``cflags.source()`` (enums, one struct per
event kind, ``struct event`` = a common head + a union of the kinds' bodies, and a
``_Static_assert`` for every field's offset, so the compiler itself refuses a C layout that
differs from this one). Python reads records with the ctypes and ``struct`` layouts derived from
the same definition. To add a field: one line in its kind's body below (fields must be
naturally aligned in order, and a body may not grow the record beyond ``EVENT_SIZE``).
"""

from __future__ import annotations

import ctypes as ct
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

CNT_LOST, CNT_MAPFULL, CNT_NOLAT, CNT_IGNORED = 0, 1, 2, 3
# index = value; NR_CNT = len. CNT_IGNORED: memslot ioctls on descriptors that are no KVM VM
# (tracepoint mode drops them in the kernel)
COUNTERS = ("CNT_LOST", "CNT_MAPFULL", "CNT_NOLAT", "CNT_IGNORED")
EV_HVA, EV_SC_END, EV_MEMSLOT, EV_VM_CREATE, EV_VM_LIFE = 1, 2, 3, 4, 5
NO_COUNT = 0xFFFFFFFF  # an hva record's memslot count when it is not known

# (name, C type); "_pad*" fields are padding, never read
HEAD = (
    ("ts", "u64"),    # ns, bpf_ktime_get_ns (memslot: the update's start)
    ("vm", "u64"),    # struct kvm * when an exact program sent it; tracepoint mode: the VM's gen
    ("kind", "u32"),  # EV_*
    ("tgid", "u32"),
    ("tid", "u32"),
    ("_pad0", "u32"),
)
KINDS = {  # kind name: (EV_* value, body fields)
    "hva": (EV_HVA, (
        ("start", "u64"),    # hva range [start, end)
        ("end", "u64"),
        ("lat_ns", "u64"),   # exact: callback duration (tracepoints: 0, see sc_end)
        ("owner", "u32"),    # exact: the VM's VMM tgid
        ("op", "u32"),       # consts.Op
        ("slots", "u32"),    # exact: memslots visited
        ("scanned", "u32"),  # exact, linear-scan kernels: memslots scanned
        ("memslots", "u32"),  # the VM's memslot count at the op, all ones = unknown (tracepoint mode:
                              # not derived; exact modes: not known for a VM older than the trace)
        ("ordinal", "u32"),   # exact: the VM's per-VMM ordinal (0 = older than the trace)
    )),
    "sc_end": (EV_SC_END, (  # end of a system call in which hva ops ran (raw events kept)
        ("dur_ns", "u64"),
        ("nr_ops", "u32"),
        ("_pad1", "u32"),
    )),
    "memslot": (EV_MEMSLOT, (
        ("lat_ns", "u64"),
        ("gpa", "u64"),
        ("size", "u64"),
        ("hva", "u64"),
        ("slot", "u32"),     # as userspace passed it: address space << 16 | slot id
        ("flags", "u32"),
        ("change", "u32"),   # consts.Change (NR_CHANGES: unknown), or MS_CHANGE_DERIVE (derive in userspace)
        ("ret", "s32"),      # 0 or -errno
    )),
    "vm_create": (EV_VM_CREATE, (
        ("ret", "s32"),      # the new VM's fd, or -errno
        ("_pad1", "u32"),
    )),
    "vm_life": (EV_VM_LIFE, (  # exact modes: a VM created (kvm_arch_init_vm) or destroyed
        ("owner", "u32"),    # its VMM tgid
        ("ordinal", "u32"),  # n-th VM that VMM created while traced (0 = older than the trace)
        ("memslots", "s32"),  # its memslot count (creation: 0, or -1 when not kept), -1 = unknown
        ("memslots_max", "u32"),
        ("destroyed", "u32"),  # 0: created, 1: destroyed
        ("_pad1", "u32"),
    )),
}

_CT = {"u64": ct.c_uint64, "s64": ct.c_int64, "u32": ct.c_uint32, "s32": ct.c_int32}
_FMT = {"u64": "Q", "s64": "q", "u32": "I", "s32": "i"}
_SIZE = {"u64": 8, "s64": 8, "u32": 4, "s32": 4}


def _layout(fields, base: int = 0) -> List[Tuple[str, str, int]]:
    """(name, type, offset) of packed, naturally aligned fields (refuses implicit padding, so
    C and Python cannot place a field differently)."""
    out, off = [], base
    for name, typ in fields:
        if off % _SIZE[typ]:
            raise ValueError(f"record field {name} at offset {off} is not {_SIZE[typ]}-byte aligned: "
                             "add a _pad field before it")
        out.append((name, typ, off))
        off += _SIZE[typ]
    return out


HEAD_SIZE = sum(_SIZE[t] for _n, t in HEAD)
EVENT_SIZE = HEAD_SIZE + max(sum(_SIZE[t] for _n, t in f) for _v, f in KINDS.values())
if EVENT_SIZE % 8:
    raise ValueError("struct event must be a multiple of 8 bytes")


def _struct(name: str, fields, base=ct.Structure):
    return type(name, (base,), {"_fields_": [(n, _CT[t]) for n, t in fields]})


_BODIES = {k: _struct(f"Ev_{k}", f) for k, (_v, f) in KINDS.items()}
_Body = type("EvBody", (ct.Union,), {"_fields_": [(k, c) for k, c in _BODIES.items()]})
Event = type("Event", (ct.Structure,), {
    "_fields_": [(n, _CT[t]) for n, t in HEAD] + [("u", _Body)],
    "_anonymous_": ("u",),
})
# the same layouts as struct formats, for the hot path (one unpack instead of ctypes fields)
HEAD_STRUCT = struct.Struct("<" + "".join(_FMT[t] for _n, t in HEAD))
BODY_STRUCT: Dict[str, struct.Struct] = {
    k: struct.Struct("<" + "".join(_FMT[t] for _n, t in f)) for k, (_v, f) in KINDS.items()}
KIND_NAMES = {v: k for k, (v, _f) in KINDS.items()}


def field_offsets() -> Dict[str, int]:
    """'head.field' / 'kind.field' -> byte offset in struct event (padding excluded)."""
    out = {f"head.{n}": o for n, _t, o in _layout(HEAD) if not n.startswith("_")}
    for k, (_v, f) in KINDS.items():
        out.update({f"{k}.{n}": o for n, _t, o in _layout(f, HEAD_SIZE) if not n.startswith("_")})
    return out


def c_header() -> str:
    """The C text of every record above (generated; prepended to kvmtrace.c)."""
    lines = ["// ---- generated from kvmtrace/tracer/records.py: edit the Python, not this ----",
             "enum { " + ", ".join(f"{n} = {i}" for i, n in enumerate(COUNTERS)) + f", NR_CNT = {len(COUNTERS)} }};",
             "enum { " + ", ".join(f"EV_{k.upper()} = {v}" for k, (v, _f) in KINDS.items()) + " };"]
    for k, (_v, f) in KINDS.items():
        lines.append(f"struct ev_{k} {{ " + " ".join(f"{t} {n};" for n, t in f) + " };")
    lines.append("struct event {")
    lines += [f"    {t} {n};" for n, t in HEAD]
    lines.append("    union {")
    lines += [f"        struct ev_{k} {k};" for k in KINDS]
    lines.append("    };")
    lines.append("};")
    lines.append(f"_Static_assert(sizeof(struct event) == {EVENT_SIZE}, \"struct event size differs from records.py\");")
    for key, off in field_offsets().items():
        where, name = key.split(".")
        member = name if where == "head" else f"{where}.{name}"
        lines.append(f"_Static_assert(__builtin_offsetof(struct event, {member}) == {off}, "
                     f"\"struct event {member} offset differs from records.py\");")
    lines += c_prog_macros()
    lines.append("// ---- end of generated records ----")
    return "\n".join(lines) + "\n"


def numpy_fields() -> Tuple[List[str], List[str], List[int]]:
    """(names, numpy formats, offsets) of every field of struct event for a numpy structured
    dtype (columnar batches, rawevents.py): head fields by name, body fields as
    ``<kind>_<field>`` (the bodies overlap, as the C union does)."""
    fmt = {"u64": "<u8", "s64": "<i8", "u32": "<u4", "s32": "<i4"}
    names, formats, offsets = [], [], []
    for n, t, o in _layout(HEAD):
        if not n.startswith("_"):
            names.append(n), formats.append(fmt[t]), offsets.append(o)
    for k, (_v, f) in KINDS.items():
        for n, t, o in _layout(f, HEAD_SIZE):
            if not n.startswith("_"):
                names.append(f"{k}_{n}"), formats.append(fmt[t]), offsets.append(o)
    return names, formats, offsets


# ---------------------------------------------------------------------------- program names
# kprobe program names, built in one place: the C declares its programs through the macros
# c_header() generates from these templates, and the session (and tests) attach by the names
# kprobe_programs() builds from the same templates.
PROG_CB = "kp_{role}_{op}_{fn}"   # entry/exit of an hva callback; op: consts.Op name or AGE2
PROG_HANDLER = "kp_handler_{fn}"  # per-slot handler counted inside a callback
PROG_MS = {"MS_OUTER_ENTER": "kp_ms_outer_enter", "MS_OUTER_EXIT": "kp_ms_outer_exit",
           "MS_SET_ENTER": "kp_ms_set_enter"}
PROG_VM = {"VM_INIT": "kp_vm_init", "VM_DESTROY": "kp_vm_destroy"}  # VM lifetimes (exact modes)


def _c_paste(template: str, **params) -> str:
    """A name template as the body of a C macro pasting its parameters (## between tokens)."""
    out = template.format(**{k: f"##{v}##" for k, v in params.items()})
    return out.replace("####", "##").strip("#")


def c_prog_macros() -> List[str]:
    return [f"#define KP_CB_PROG(role, OPN, FN) {_c_paste(PROG_CB, role='role', op='OPN', fn='FN')}",
            f"#define KP_HANDLER_PROG(FN) {_c_paste(PROG_HANDLER, fn='FN')}"] + [
            f"#define KP_{k} {v}" for k, v in list(PROG_MS.items()) + list(PROG_VM.items())]


def kprobe_programs(plan) -> List[Tuple[str, str, str]]:
    """(``kprobe`` | ``kretprobe``, kernel function, program name) of every kprobe program the
    plan attaches, in attach order."""
    out = []
    for p in plan.ops:
        if p.attach != "kprobe":
            continue
        if p.kind == "hva":
            name = p.op.upper()
            for i, cb in enumerate(p.callbacks[:2]):
                opn = name if i == 0 else "AGE2"
                out.append(("kprobe", cb, PROG_CB.format(role="enter", op=opn, fn=cb)))
                # no maxactive: bcc then attaches through perf_event_open, which the kernel
                # cleans up even after SIGKILL (maxactive goes through kprobe_events)
                out.append(("kretprobe", cb, PROG_CB.format(role="exit", op=opn, fn=cb)))
            if p.slots_method == "handler":
                for h in p.handlers[:1]:
                    out.append(("kprobe", h, PROG_HANDLER.format(fn=h)))
        else:
            outer = p.callbacks[0]
            out.append(("kprobe", outer, PROG_MS["MS_OUTER_ENTER"]))
            out.append(("kretprobe", outer, PROG_MS["MS_OUTER_EXIT"]))
            if p.handlers and p.change_arg is not None:  # else: change type derived
                out.append(("kprobe", p.handlers[0], PROG_MS["MS_SET_ENTER"]))
    if getattr(plan, "vm_lifetime", ()) and any(p.attach == "kprobe" for p in plan.ops):
        init, destroy = plan.vm_lifetime
        out += [("kprobe", init, PROG_VM["VM_INIT"]), ("kprobe", destroy, PROG_VM["VM_DESTROY"])]
    return out


def pack(kind: str, **fields) -> bytes:
    """One record as the kernel writes it (tests and benchmarks): head fields and the kind's
    body fields by name, the rest 0."""
    v, body = KINDS[kind]
    head = [fields.pop(n, 0) if n != "kind" else v for n, _t in HEAD]
    vals = [fields.pop(n, 0) for n, _t in body]
    if fields:
        raise TypeError(f"no field(s) {sorted(fields)} in a {kind} record")
    raw = HEAD_STRUCT.pack(*head) + BODY_STRUCT[kind].pack(*vals)
    return raw + bytes(EVENT_SIZE - len(raw))


# ---------------------------------------------------------------------------- map contents
# What the tracer reads from the kernel once per interval, as plain Python values: the input of
# the decoders (decode_exact.py, decode_tp.py), which therefore run and are tested without bcc
# or root. Keys are the raw integers of the C keys; their meaning is the decoder's business.


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
    """One memslot-count bucket of an exact-mode ``aggs`` value (C ``struct bucket_val`` inside
    ``struct ex_agg``): hva ops of one (VM, op, log2 bucket of the VM's memslot count at the
    event)."""

    count: int = 0
    memslots_max: int = 0
    lat_sum: int = 0
    slots_sum: int = 0
    scanned_sum: int = 0

    @classmethod
    def from_map(cls, v) -> "BucketRow":
        return cls(int(v.count), int(v.memslots_max), int(v.lat_sum), int(v.slots_sum), int(v.scanned_sum))


def split_exact_agg(v) -> Tuple[AggRow, Dict[int, BucketRow]]:
    """One value of ``aggs`` in a build with exact hva programs (C ``struct ex_agg``: the
    memslot-count buckets live inside the (VM, op) value, one hash lookup per operation for
    both): the (VM, op) aggregate and bucket -> BucketRow of the buckets that saw operations."""
    return AggRow.from_map(v.a), {i: BucketRow.from_map(b) for i, b in enumerate(v.b) if int(b.count)}


def exact_bucket_rows(key: tuple, buckets: Dict[int, BucketRow]) -> Dict[Tuple[int, int, int, int, int], BucketRow]:
    """``MapContents.buckets`` entries of one (vm, op, owner[, ordinal]) aggs key."""
    vm, op, owner, ordinal = (tuple(key) + (0,))[:4]
    return {(vm, op, owner, ordinal, b): row for b, row in buckets.items()}


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
    counters: Tuple[int, ...] = (0,) * (CNT_IGNORED + 1)
    vmm: Optional[Tuple[int, ...]] = None
    ms_count: Optional[Dict[int, int]] = None
    ms_aggs: Optional[Dict[Tuple[int, int, int], MsRow]] = None
    # exact modes. Keys of aggs / ms_aggs carry a 4th element there, the VM's ordinal (C
    # op_key.ordinal; absent = 0). ``vms``: struct kvm * -> VmRow of live VMs; ``buckets``:
    # (vm, op, owner, ordinal, bucket) -> BucketRow.
    vms: Optional[Dict[int, VmRow]] = None
    buckets: Optional[Dict[Tuple[int, int, int, int, int], BucketRow]] = None
    tp: Optional["TpMaps"] = None  # tracepoint mode's VM and slot-table maps (TpMaps)


# ---------------------------------------------------------------------------- tracepoint mode
# (kvmtrace.c "Tracepoint mode: VM identity and per-VM slot tables")
VMF_PARTIAL, VMF_DEAD, VMF_NOTAB, VMF_BROKEN = 1, 2, 4, 8
NO_TAB = 0xFFFFFFFF
MS_BUCKETS = 16
VM_PER_PROC = 8  # places of a process's VM list in its vmm entry (the rest: tp_vmmore)
VM_LIST_MAX = 16  # live VMs of one process the kernel's list holds (C VM_LIST_MAX; checked by tests/test_records.py)
FD_VCPU = 1 << 63  # tp_vmfd value bit: a vCPU descriptor of the VM
NR_OPS = 4  # C NR_OPS (len(consts.Op), checked by tests/test_records.py): entries per VM slot in tp_avals
SEED_GEN_BASE = 1 << 62  # gens of VMs that predate the trace: base | tgid << 24 | fd (the kernel counts from 1)


@dataclass(frozen=True)
class TpBucket:
    """hva ops of one (VM, op) at one memslot-count log2 bucket (C ``struct tp_bkt``)."""

    count: int = 0
    lat_count: int = 0
    lat_sum: int = 0
    slots_sum: int = 0
    nmax: int = 0
    nsum: int = 0  # sum of the memslot counts at its ops


@dataclass(frozen=True)
class TpAggRow:
    """One value of ``tp_aggs`` (C ``struct tp_agg``): the common aggregate, the ops whose
    slots figure was not derived, and the per-memslot-bucket figures (index = bucket)."""

    agg: AggRow = AggRow()
    underived: int = 0
    buckets: Tuple[TpBucket, ...] = ()

    @classmethod
    def from_map(cls, v) -> "TpAggRow":
        """The kernel counts each op once, in its memslot-count bucket or in ``und`` (slots not
        derived), and leaves the sums that follow from those to this reader: count, slots and
        latency counts and sums, scanned_sum (fewer atomic adds per event)."""
        bs = tuple(TpBucket(int(b.count), int(b.lat_count), int(b.lat_sum), int(b.slots_sum), int(b.nmax),
                            int(b.nsum))
                   for b in v.b)
        u = v.und
        und, und_lc, und_ls = int(u.count), int(u.lat_count), int(u.lat_sum)
        a = AggRow.from_map(v.a)
        derived = sum(b.count for b in bs)
        agg = AggRow(count=derived + und, lat_count=sum(b.lat_count for b in bs) + und_lc,
                     lat_sum=sum(b.lat_sum for b in bs) + und_ls, lat_max=a.lat_max, slots_count=derived,
                     slots_sum=sum(b.slots_sum for b in bs), slots_max=a.slots_max,
                     scanned_sum=sum(b.nsum for b in bs), lat=a.lat, slots=a.slots, range=a.range)
        return cls(agg, und, bs)


@dataclass(frozen=True)
class TpVmRow:
    """One value of ``tp_vms`` (C ``struct tp_vm``): one VM lifetime, keyed by its gen."""

    tgid: int
    fd: int
    ordinal: int = 0
    flags: int = 0
    tab: int = NO_TAB
    n: int = 0
    nmax: int = 0
    agg: int = 0  # its aggregate slot in ``tp_avals`` + 1 (0: its aggregates are in ``tp_aggs``)
    refs: int = 0  # descriptors of its VMM known to hold it (VM fd and dups, vCPU fds)

    @classmethod
    def from_map(cls, v) -> "TpVmRow":
        return cls(int(v.tgid), int(v.fd), int(v.ordinal), int(v.flags), int(v.tab), int(v.n), int(v.nmax),
                   int(v.agg), int(getattr(v, "refs", 0)))

    @property
    def dead(self) -> bool:
        return bool(self.flags & VMF_DEAD)

    @property
    def partial(self) -> bool:
        return bool(self.flags & VMF_PARTIAL)


@dataclass(frozen=True)
class TpMaps:
    """Tracepoint mode's maps, read once per interval: ``aggs`` (gen, op, tgid) -> TpAggRow
    (gen 0: hva ops of no known VMM); ``vms`` gen -> TpVmRow; ``ms`` (gen, change, tgid) ->
    MsRow; ``tabs`` table index -> (owner gen, entries, broken)."""

    aggs: Dict[Tuple[int, int, int], TpAggRow] = field(default_factory=dict)
    vms: Dict[int, TpVmRow] = field(default_factory=dict)
    ms: Dict[Tuple[int, int, int], MsRow] = field(default_factory=dict)
    tabs: Dict[int, Tuple[int, int, int]] = field(default_factory=dict)
