"""Exact-mode decoding of VM lifetimes and memslot-count buckets, on fake records and maps (no
bcc, no root): one VM lifetime per (struct kvm *, VMM, ordinal), never merged when a later VM of
the same process reuses the address."""

from __future__ import annotations

import dataclasses

from kvmtrace.consts import Change, Op
from kvmtrace.tracer import records as R
from kvmtrace.tracer.decode_common import Decoding

from tests.test_decoders import KVM, MB, feed, memslot, plan, rec


def exact_plan(linear=False):
    return dataclasses.replace(plan("kprobe", "kprobe", linear=linear),
                               vm_lifetime=("kvm_arch_init_vm", "kvm_arch_destroy_vm"))


def created(kvm, tgid, ordinal, memslots=0):
    return rec("vm_life", tgid=tgid, vm=kvm, owner=tgid, ordinal=ordinal, memslots=memslots)


def destroyed(kvm, tgid, ordinal, memslots, mx):
    return rec("vm_life", tgid=tgid, vm=kvm, owner=tgid, ordinal=ordinal, memslots=memslots, memslots_max=mx,
               destroyed=1)


def test_address_reused_by_the_next_vm_of_one_process_is_another_vm():
    dec = Decoding(exact_plan(), keep_events=True)
    feed(dec, created(KVM, 4242, 1),
         memslot(0, 0, 4 * MB, 0x1000_0000, tgid=4242, vm=KVM, x=int(Change.CREATE)),
         destroyed(KVM, 4242, 1, 1, 1),
         created(KVM, 4242, 2),  # same struct kvm address, next VM of the same VMM
         memslot(0, 0, 4 * MB, 0x2000_0000, tgid=4242, vm=KVM, x=int(Change.CREATE)),
         memslot(1, 4 * MB, 4 * MB, 0x2040_0000, tgid=4242, vm=KVM, x=int(Change.CREATE)))
    first, second = f"kvm:{KVM:#x}:4242#1", f"kvm:{KVM:#x}:4242#2"
    assert [e.vm_id for e in dec.take_events()] == [first, second, second]
    maps = R.MapContents(
        aggs={(KVM, int(Op.UNMAP), 4242, 1): R.AggRow(count=3), (KVM, int(Op.UNMAP), 4242, 2): R.AggRow(count=5)},
        ms_aggs={(KVM, int(Change.CREATE), 4242, 1): R.MsRow(count=1),
                 (KVM, int(Change.CREATE), 4242, 2): R.MsRow(count=2)},
        vms={KVM: R.VmRow(tgid=4242, ordinal=2, memslots=2, memslots_max=2)})
    p = dec.decode(maps)
    assert {(h.vm_id, h.count) for h in p.hva} == {(first, 3), (second, 5)}
    assert {(m.vm_id, m.count) for m in p.memslot} == {(first, 1), (second, 2)}
    vms = {v.vm_id: v for v in p.vms}
    assert (vms[first].ordinal, vms[first].alive, vms[first].memslots, vms[first].memslots_max) == (1, False, 1, 1)
    assert (vms[second].ordinal, vms[second].alive, vms[second].memslots, vms[second].memslots_max) == (2, True, 2, 2)
    assert vms[first].label.endswith("[4242]#1") and vms[second].label.endswith("[4242]#2")
    assert not vms[second].partial and vms[second].memslots_provenance == "exact"


def test_vm_older_than_the_trace_has_ordinal_zero():
    p = Decoding(exact_plan()).decode(R.MapContents(
        aggs={(KVM, int(Op.UNMAP), 4242): R.AggRow(count=1)},
        vms={KVM: R.VmRow(tgid=4242, ordinal=0, memslots=-1)}))
    (v,) = p.vms
    assert (v.vm_id, v.ordinal, v.memslots, v.label[-2:]) == (f"kvm:{KVM:#x}:4242", 0, None, "#?")


def test_memslot_count_buckets_come_from_the_kernel():
    dec = Decoding(exact_plan(linear=True))
    maps = R.MapContents(
        aggs={(KVM, int(Op.UNMAP), 4242, 1): R.AggRow(count=6, scanned_sum=6 * 509 - 509 + 8)},
        buckets={(KVM, int(Op.UNMAP), 4242, 1, 4): R.BucketRow(count=1, memslots_max=8, lat_sum=100,
                                                               slots_sum=1, scanned_sum=8),
                 (KVM, int(Op.UNMAP), 4242, 1, 9): R.BucketRow(count=5, memslots_max=509, lat_sum=900,
                                                               slots_sum=5, scanned_sum=5 * 509)})
    p = dec.decode(maps)
    got = {(b.bucket, b.count, b.memslots_max, b.scanned_sum, b.slots_sum, b.lat_sum_ns) for b in p.by_memslots}
    assert got == {(4, 1, 8, 8, 1, 100), (9, 5, 509, 5 * 509, 5, 900)}
    assert all(b.vm_id == f"kvm:{KVM:#x}:4242#1" and b.lat_provenance == "exact" for b in p.by_memslots)
    # interval-tree kernel: no slots-scanned figure in the buckets either
    p = Decoding(exact_plan(linear=False)).decode(maps)
    assert all(b.scanned_sum is None for b in p.by_memslots)


def test_raw_hva_events_carry_the_ordinal_and_memslot_count_at_the_event():
    dec = Decoding(exact_plan(linear=True), keep_events=True)
    feed(dec, created(KVM, 4242, 3),
         rec("hva", tgid=4242, op=int(Op.UNMAP), start=0x1000, end=0x2000, lat_ns=700, slots=1, scanned=509,
             owner=4242, ordinal=3, memslots=509, vm=KVM))
    (hv,) = dec.take_events()
    assert (hv.vm_id, hv.pid, hv.slots, hv.scanned, hv.memslots) == (f"kvm:{KVM:#x}:4242#3", 4242, 1, 509, 509)


def _fake_ex_agg(count, buckets):
    """A bcc value of the exact-mode ``aggs`` map (C struct ex_agg) as attributes: the (VM, op)
    aggregate ``a`` and 16 memslot-count buckets ``b`` (index = bucket)."""
    from types import SimpleNamespace as NS

    from kvmtrace.consts import LOG2_BUCKETS

    zeros = [0] * LOG2_BUCKETS
    s = NS(count=count, lat_count=0, lat_sum=0, lat_max=0, slots_count=0, slots_sum=count, slots_max=1,
           scanned_sum=0, tgid=0)
    b = [NS(count=0, memslots_max=0, lat_sum=0, slots_sum=0, scanned_sum=0) for _ in range(R.MS_BUCKETS)]
    for i, (n, mx, lat, slots, scanned) in buckets.items():
        b[i] = NS(count=n, memslots_max=mx, lat_sum=lat, slots_sum=slots, scanned_sum=scanned)
    return NS(a=NS(s=s, lat=zeros, slots=zeros, range=zeros), b=b)


def test_buckets_folded_into_the_vm_op_value_decode_to_the_same_rows():
    """The kernel keeps the memslot-count buckets inside each (VM, op) value (one hash lookup per
    operation); unfolded, they give exactly the rows of a separate bucket table."""
    v = _fake_ex_agg(6, {4: (1, 8, 100, 1, 8), 9: (5, 509, 900, 5, 5 * 509)})
    agg, bk = R.split_exact_agg(v)
    assert agg.count == 6 and sorted(bk) == [4, 9]  # empty buckets are not rows
    folded = R.MapContents(aggs={(KVM, int(Op.UNMAP), 4242, 1): agg},
                           buckets=R.exact_bucket_rows((KVM, int(Op.UNMAP), 4242, 1), bk))
    separate = R.MapContents(
        aggs={(KVM, int(Op.UNMAP), 4242, 1): agg},
        buckets={(KVM, int(Op.UNMAP), 4242, 1, 4): R.BucketRow(1, 8, 100, 1, 8),
                 (KVM, int(Op.UNMAP), 4242, 1, 9): R.BucketRow(5, 509, 900, 5, 5 * 509)})
    assert folded == separate
    rows = Decoding(exact_plan(linear=True)).decode(folded).by_memslots
    assert sorted((b.bucket, b.count, b.memslots_max, b.scanned_sum, b.lat_sum_ns) for b in rows) == [
        (4, 1, 8, 8, 100), (9, 5, 509, 5 * 509, 900)]
    # a VM older than the trace: its key has no ordinal, its bucket rows ordinal 0
    assert list(R.exact_bucket_rows((KVM, int(Op.UNMAP), 4242), bk)) == [
        (KVM, int(Op.UNMAP), 4242, 0, 4), (KVM, int(Op.UNMAP), 4242, 0, 9)]
