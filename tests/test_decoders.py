"""The decoders of both modes on fake map contents and fake raw records: no bcc, no root.

A raw record is packed from the one record definition (records.pack, the layout the C is
generated from) and map contents are plain records.MapContents, which is what the session reads
from the kernel."""

from __future__ import annotations

from kvmtrace.consts import LOG2_BUCKETS, MS_CHANGE_DERIVE, Change, Op
from kvmtrace.tracer import records as R
from kvmtrace.tracer.decode_common import Decoding
from kvmtrace.tracer.plan import OpPlan, ProbePlan

MB = 1 << 20
PAGE = 4096
KVM = 0xFFFF8881_2345_6000  # a struct kvm *


def hist(**buckets) -> tuple:
    h = [0] * LOG2_BUCKETS
    for k, v in buckets.items():
        h[int(k[1:])] = v
    return tuple(h)


def plan(hva_attach="tracepoint", ms_attach="tracepoint", linear=False, per_op=None):
    per_op = per_op or {}
    ops = []
    for o in Op:
        att = per_op.get(o.label, hva_attach)
        exact = att in ("kprobe", "fentry")
        ops.append(OpPlan(op=o.label, kind="hva", attach=att, target="t",
                          latency="exact" if exact else "syscall",
                          slots="exact" if exact else "derived",
                          scanned=("exact" if exact else "derived") if linear else "none"))
    ops.append(OpPlan(op="memslot_update", kind="memslot", attach=ms_attach, target="t",
                      latency="exact" if ms_attach != "tracepoint" else "syscall",
                      slots="exact" if ms_attach != "tracepoint" else "derived"))
    return ProbePlan(ops=tuple(ops), linear_scan=linear)


def rec(kind, tgid=100, tid=None, ts=1, **fields) -> bytes:
    return R.pack(kind, ts=ts, tgid=tgid, tid=tid or tgid, **fields)


def memslot(slot, gpa, size, hva, tgid=100, flags=0, ret=0, lat=1000, vm=0, x=MS_CHANGE_DERIVE):
    return rec("memslot", tgid=tgid, lat_ns=lat, gpa=gpa, size=size, hva=hva, slot=slot, flags=flags,
               ret=ret, vm=vm, change=x)


def unmap(start, end, tgid=100, tid=None, op=Op.UNMAP):
    return rec("hva", tgid=tgid, tid=tid, op=int(op), start=start, end=end)


def feed(dec, *records):
    for r in records:
        dec.on_raw(r)


def tp_vm_with_two_slots(dec, tgid=100):
    feed(dec, rec("vm_create", tgid=tgid),
         memslot(0, 0, 4 * MB, 0x1000_0000, tgid=tgid),
         memslot(1, 4 * MB, 4 * MB, 0x1040_0000, tgid=tgid))  # adjacent: a range can span both


# ------------------------------------------------------------------------ tracepoint mode
def test_tracepoint_rows_take_counts_from_the_map_and_slots_from_the_mirror():
    dec = Decoding(plan(), keep_events=False)
    tp_vm_with_two_slots(dec)
    feed(dec, unmap(0x1000_0000, 0x1000_0000 + PAGE),                # one slot
         unmap(0x1040_0000 - PAGE, 0x1040_0000 + PAGE),              # spans both
         unmap(0x9000_0000, 0x9000_1000))                            # outside slot memory
    maps = R.MapContents(
        aggs={(100, int(Op.UNMAP), 0): R.AggRow(count=3, lat_count=3, lat_sum=3000, lat_max=1500,
                                                 lat=hist(b10=3), range=hist(b13=3))},
        vmm=(100,), ms_count={100: 2})
    p = dec.decode(maps)
    (h,) = p.hva
    assert (h.vm_id, h.pid, h.op, h.count) == ("pid:100", 100, "unmap", 3)
    assert (h.lat_count, h.lat_sum_ns, h.lat_max_ns, h.lat_provenance) == (3, 3000, 1500, "syscall")
    assert (h.slots_count, h.slots_sum, h.slots_max, h.slots_provenance) == (3, 3, 2, "derived")
    assert h.slots_hist.counts[0] == 1 and h.slots_hist.counts[1] == 1 and h.slots_hist.counts[2] == 1
    assert h.scanned_sum is None and h.range_hist.counts[13] == 3
    assert {(m.change, m.count, m.change_provenance, m.lat_provenance) for m in p.memslot} == {
        ("create", 2, "derived", "syscall")}
    (v,) = p.vms
    assert (v.vm_id, v.memslots, v.memslots_provenance, v.partial) == ("pid:100", 2, "derived", False)
    assert p.unattributed == 0


def test_tracepoint_hot_path_and_raw_event_path_aggregate_the_same():
    out = []
    for keep in (False, True):
        dec = Decoding(plan(), keep_events=keep)
        tp_vm_with_two_slots(dec)
        feed(dec, *(unmap(0x1000_0000 + i * PAGE, 0x1000_0000 + (i + 1) * PAGE) for i in range(10)),
             unmap(0x1000_0000, 0x1080_0000))
        (h,) = dec.decode(R.MapContents(aggs={(100, 0, 0): R.AggRow(count=11)}, vmm=(100,))).hva
        out.append((h.slots_count, h.slots_sum, h.slots_max, h.slots_hist))
    assert out[0] == out[1] and out[0][:3] == (11, 12, 2)


def test_tracepoint_vm_older_than_the_trace_gets_no_slots_figure():
    dec = Decoding(plan(), keep_events=True)
    feed(dec, memslot(0, 0, 4 * MB, 0x1000_0000, tgid=200),  # no VM_CREATE: predates the trace
         unmap(0x1000_0000, 0x1000_1000, tgid=200))
    p = dec.decode(R.MapContents(aggs={(200, 0, 0): R.AggRow(count=1)}, vmm=(200,)))
    (h,) = p.hva
    assert h.count == 1 and h.slots_count == 0 and h.slots_provenance == "none"
    assert p.vms[0].partial is True
    feed(dec, rec("sc_end", tgid=200, dur_ns=777, nr_ops=1))
    evs = dec.take_events()
    hv = [e for e in evs if getattr(e, "op", None) == "unmap"]
    assert len(hv) == 1 and hv[0].slots == -1 and hv[0].slots_provenance == "none"


def test_tracepoint_unknown_tgid_is_unattributed_unless_it_owns_a_vm_or_is_filtered():
    maps = R.MapContents(aggs={(100, 0, 0): R.AggRow(count=4), (555, 0, 0): R.AggRow(count=9)},
                         vmm=(100,))
    p = Decoding(plan()).decode(maps)
    assert [h.pid for h in p.hva] == [100] and p.unattributed == 9
    p = Decoding(plan(), owns_vm=lambda pid: pid == 555).decode(maps)
    assert sorted(h.pid for h in p.hva) == [100, 555] and p.unattributed == 0
    p = Decoding(plan(), pid=555).decode(R.MapContents(aggs={(555, 0, 0): R.AggRow(count=9)}))
    assert [h.count for h in p.hva] == [9] and p.unattributed == 0


def test_tracepoint_raw_events_get_the_latency_of_their_syscall():
    dec = Decoding(plan(), keep_events=True)
    tp_vm_with_two_slots(dec)
    feed(dec, unmap(0x1000_0000, 0x1000_1000, tid=101), unmap(0x1040_0000, 0x1040_1000, tid=101))
    assert [e for e in dec.take_events() if getattr(e, "op", None)] == []  # waiting for syscall end
    feed(dec, rec("sc_end", tgid=100, tid=101, dur_ns=5000, nr_ops=2))
    evs = [e for e in dec.take_events() if getattr(e, "op", None) == "unmap"]
    assert [(e.latency_ns, e.lat_provenance, e.slots, e.memslots, e.tid) for e in evs] == [
        (5000, "syscall", 1, 2, 101)] * 2


def test_tracepoint_memslot_ioctls_without_an_observed_change_are_unknown():
    dec = Decoding(plan())
    tp_vm_with_two_slots(dec)
    feed(dec, memslot(1, 8 * MB, 4 * MB, 0x1040_0000),        # move
         memslot(5, 64 * MB, 4 * MB, 0x2000_0000, ret=-22),    # failed create: counted as error
         memslot(1, 0, 0, 0))                                  # delete
    p = dec.decode(R.MapContents(vmm=(100,), ms_count={100: 7}))
    got = {m.change: (m.count, m.errors) for m in p.memslot}
    assert got == {"create": (3, 1), "move": (1, 0), "delete": (1, 0), "unknown": (2, 0)}


# ------------------------------------------------------------------------ exact modes
def test_exact_rows_are_keyed_by_struct_kvm_and_its_vmm():
    dec = Decoding(plan("kprobe", "kprobe"))
    maps = R.MapContents(
        aggs={(KVM, int(Op.UNMAP), 4242): R.AggRow(count=5, lat_count=0, lat_sum=5000, lat_max=2000,
                                                    slots_sum=7, slots_max=3, scanned_sum=99,
                                                    lat=hist(b11=5), slots=hist(b1=4, b2=1))},
        ms_aggs={(KVM, int(Change.CREATE), 4242): R.MsRow(count=2, errors=1, lat_sum=40, lat_max=30,
                                                          lat=hist(b5=2))})
    p = dec.decode(maps)
    (h,) = p.hva
    vm = f"kvm:{KVM:#x}:4242"
    assert (h.vm_id, h.pid, h.count, h.lat_count, h.lat_provenance) == (vm, 4242, 5, 5, "exact")
    assert (h.slots_count, h.slots_sum, h.slots_max, h.slots_provenance) == (5, 7, 3, "exact")
    assert h.scanned_sum is None  # not a linear-scan kernel
    (m,) = p.memslot
    assert (m.vm_id, m.change, m.count, m.errors, m.lat_provenance, m.change_provenance) == (
        vm, "create", 2, 1, "exact", "exact")
    assert [v.vm_id for v in p.vms] == [vm] and p.unattributed == 0


def test_exact_scanned_only_on_linear_scan_kernels():
    maps = R.MapContents(aggs={(KVM, 0, 1): R.AggRow(count=2, scanned_sum=1018)})
    (h,) = Decoding(plan("kprobe", "kprobe", linear=True)).decode(maps).hva
    assert h.scanned_sum == 1018


def test_each_decoder_knows_its_keys_whatever_their_size():
    # a struct kvm * that fits 32 bits is still a struct kvm * for an exact op, and a tgid is a
    # tgid for a tracepoint op: the key's meaning comes from the op's attach mode, not its size
    small_kvm = 0x1000
    maps = R.MapContents(aggs={(small_kvm, int(Op.UNMAP), 4242): R.AggRow(count=1),
                               (4242, int(Op.AGE), 0): R.AggRow(count=2, lat_count=2)},
                         vmm=(4242,))
    p = Decoding(plan("kprobe", "kprobe", per_op={"age": "tracepoint"})).decode(maps)
    got = {h.op: (h.vm_id, h.lat_provenance) for h in p.hva}
    assert got == {"unmap": (f"kvm:{small_kvm:#x}:4242", "exact"), "age": ("pid:4242", "syscall")}


def test_exact_raw_events_carry_kernel_measured_figures():
    dec = Decoding(plan("kprobe", "kprobe", linear=True), keep_events=True)
    feed(dec, rec("hva", tgid=4242, tid=4243, op=int(Op.UNMAP), start=0x1000, end=0x3000, lat_ns=900,
                  slots=2, scanned=509, owner=4242, vm=KVM),
         memslot(0, 0, 4 * MB, 0x1000_0000, tgid=4242, vm=KVM, x=int(Change.CREATE)))
    hv, ms = dec.take_events()
    assert (hv.vm_id, hv.pid, hv.latency_ns, hv.slots, hv.scanned, hv.lat_provenance) == (
        f"kvm:{KVM:#x}:4242", 4242, 900, 2, 509, "exact")
    assert (ms.change, ms.change_provenance, ms.lat_provenance) == ("create", "exact", "exact")
    # the kernel aggregated it: no userspace memslot row besides the map's
    assert dec.decode(R.MapContents(ms_aggs={})).memslot == ()


def test_lost_records_and_full_maps_are_reported():
    dec = Decoding(plan())
    counters = [0] * (R.CNT_NOLAT + 1)
    counters[R.CNT_LOST], counters[R.CNT_MAPFULL] = 11, 3
    p = dec.decode(R.MapContents(counters=tuple(counters)), extra_lost=4)
    assert (p.lost_events, p.map_full) == (15, 3)
