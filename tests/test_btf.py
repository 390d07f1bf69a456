"""BTF reader: a synthetic BTF blob built here (base + split module), and the live vmlinux BTF
when the host has one (readable without root)."""

from __future__ import annotations

import os
import struct

import pytest

from kvmtrace.tracer import btf as B


class Enc:
    """Minimal BTF encoder for tests (types are appended; ids start at first_id)."""

    def __init__(self, first_id=1, str_base=0):
        self.first_id = first_id
        self.str_base = str_base
        self.strings = bytearray(b"\0") if str_base == 0 else bytearray()
        self.types = bytearray()
        self.n = 0

    def s(self, name):
        if not name:
            return 0
        off = self.strings.find(b"\0" + name.encode() + b"\0")
        if off >= 0:
            return self.str_base + off + 1
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return self.str_base + off

    def add(self, name, kind, vlen, st, extra=b"", kflag=0):
        self.types += struct.pack("<III", self.s(name), (kflag << 31) | (kind << 24) | vlen, st) + extra
        self.n += 1
        return self.first_id + self.n - 1

    def int_(self, name, size):
        return self.add(name, B.KIND_INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, t):
        return self.add("", B.KIND_PTR, 0, t)

    def typedef(self, name, t):
        return self.add(name, B.KIND_TYPEDEF, 0, t)

    def const(self, t):
        return self.add("", B.KIND_CONST, 0, t)

    def array(self, elem, nelems, index):
        return self.add("", B.KIND_ARRAY, 0, 0, struct.pack("<III", elem, index, nelems))

    def struct_(self, name, size, members, kind=B.KIND_STRUCT):
        extra = b"".join(struct.pack("<III", self.s(m), t, bitoff) for m, t, bitoff in members)
        return self.add(name, kind, len(members), size, extra)

    def proto(self, ret, params):
        extra = b"".join(struct.pack("<II", self.s(p), t) for p, t in params)
        return self.add("", B.KIND_FUNC_PROTO, len(params), ret, extra)

    def func(self, name, proto):
        return self.add(name, B.KIND_FUNC, 1, proto)  # vlen = linkage (global)

    def blob(self):
        hdr_len = 24
        return struct.pack("<HBBIIIII", B.BTF_MAGIC, 1, 0, hdr_len, 0, len(self.types), len(self.types),
                           len(self.strings)) + bytes(self.types) + bytes(self.strings)


def _base():
    e = Enc()
    ulong = e.int_("long unsigned int", 8)
    u32 = e.int_("unsigned int", 4)
    short = e.int_("short int", 2)
    ul_t = e.typedef("gfn_t", ulong)
    vp = e.ptr(0)
    # struct mmu_notifier_range { struct mm_struct *mm; unsigned long start; unsigned long end; unsigned flags; }
    rng = e.struct_("mmu_notifier_range", 32, [("mm", vp, 0), ("start", ulong, 64), ("end", ulong, 128),
                                               ("flags", u32, 192)])
    crng = e.const(rng)
    prng = e.ptr(crng)
    p = e.proto(u32, [("mn", vp), ("range", prng)])
    e.func("kvm_mmu_notifier_invalidate_range_start", p)
    return e, dict(ulong=ulong, u32=u32, short=short, gfn_t=ul_t, vp=vp)


def test_synthetic_vmlinux():
    e, t = _base()
    b = B.Btf(e.blob())
    assert b.func_params("kvm_mmu_notifier_invalidate_range_start") == ("mn", "range")
    assert b.func_params("nope") is None
    lay = b.struct("mmu_notifier_range")
    assert lay.size == 32
    assert (lay.offset("start"), lay.offset("end")) == (8, 16)
    assert lay.members["start"].size == 8
    assert lay.members["flags"].size == 4
    assert b.struct("kvm") is None


def test_split_module_btf_anonymous_union_typedef_array():
    e, t = _base()
    base = B.Btf(e.blob())
    m = Enc(first_id=base.last_id + 1, str_base=len(e.strings))
    # struct kvm_memory_slot { gfn_t base_gfn; unsigned long npages; union { u32 a; u32 b; }; unsigned long userspace_addr; u32 flags; short id; }
    un = m.struct_("", 4, [("a", t["u32"], 0), ("b", t["u32"], 0)], kind=B.KIND_UNION)
    slot = m.struct_("kvm_memory_slot", 40, [("base_gfn", t["gfn_t"], 0), ("npages", t["ulong"], 64),
                                             ("", un, 128), ("userspace_addr", t["ulong"], 192),
                                             ("flags", t["u32"], 256), ("id", t["short"], 288)])
    idx = m.int_("int", 4)
    pslots = m.ptr(t["vp"])
    arr = m.array(pslots, 2, idx)
    kvm = m.struct_("kvm", 64, [("mm", t["vp"], 0), ("memslots", arr, 64)])
    tslot = m.typedef("slot_t", slot)
    p = m.proto(idx, [("kvm", m.ptr(kvm)), ("old", m.ptr(slot)), ("new", m.ptr(slot)), ("change", idx)])
    m.func("kvm_set_memslot", p)
    mod = B.Btf(m.blob(), base=base, name="kvm")
    assert mod.func_params("kvm_set_memslot") == ("kvm", "old", "new", "change")
    # base functions are visible through the split BTF
    assert mod.func_params("kvm_mmu_notifier_invalidate_range_start") == ("mn", "range")
    s = mod.struct("kvm_memory_slot")
    assert s.size == 40
    assert s.offset("userspace_addr") == 24 and s.offset("npages") == 8 and s.offset("id") == 36
    assert s.offset("a") == 16  # anonymous union flattened
    assert s.members["base_gfn"].size == 8  # through the typedef
    k = mod.struct("kvm")
    assert k.offset("memslots") == 8
    assert k.members["memslots"].nelems == 2 and k.members["memslots"].size == 16
    assert mod.struct("slot_t").offset("id") == 36
    assert mod.struct("mmu_notifier_range").offset("end") == 16


def test_bad_magic():
    with pytest.raises(B.BtfError):
        B.Btf(b"\0" * 64)


VMLINUX = "/sys/kernel/btf/vmlinux"


@pytest.mark.skipif(not os.access(VMLINUX, os.R_OK), reason="no vmlinux BTF on this host")
def test_live_vmlinux_sane():
    # (no time limit here: on a loaded shared host a wall-clock bound fails for reasons that are
    # not the parser's; speed belongs in a benchmark)
    b = B.load_vmlinux()
    params = b.func_params("do_sys_open") or b.func_params("do_sys_openat2")
    lay = b.struct("mmu_notifier_range")
    assert params and params[0] == "dfd"
    assert lay is not None and lay.offset("end") == lay.offset("start") + 8
    if b.func_params("kvm_set_memslot") is not None:  # KVM built in (this host)
        assert b.func_params("kvm_set_memslot")[-1] == "change"
