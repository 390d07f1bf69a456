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


def tp_row(count, slots_count=None, slots_sum=0, slots_max=0, underived=0, lat_count=0, lat_sum=0,
           buckets=None):
    """A tp_aggs value: ``buckets`` maps a memslot-count bucket to (count, slots_sum, nmax)."""
    slots_count = count - underived if slots_count is None else slots_count
    b = [R.TpBucket()] * R.MS_BUCKETS
    for i, (n, ss, mx) in (buckets or {}).items():
        b[i] = R.TpBucket(count=n, lat_count=n if lat_count else 0, lat_sum=lat_sum, slots_sum=ss, nmax=mx)
    agg = R.AggRow(count=count, lat_count=lat_count, lat_sum=lat_sum, slots_count=slots_count,
                   slots_sum=slots_sum, slots_max=slots_max, slots=hist(b1=slots_count) if slots_count else ())
    return R.TpAggRow(agg, underived, tuple(b))


def tp_maps(aggs=None, vms=None, ms=None, counters=None):
    tp = R.TpMaps(aggs=aggs or {}, vms=vms or {}, ms=ms or {})
    kw = {"counters": tuple(counters)} if counters else {}
    return R.MapContents(tp=tp, **kw)


# ------------------------------------------------------------------------ tracepoint mode
def test_tracepoint_rows_are_per_vm_lifetime_with_kernel_derived_slots_and_buckets():
    dec = Decoding(plan())
    vms = {1: R.TpVmRow(tgid=100, fd=5, ordinal=1, n=64, nmax=64),
           2: R.TpVmRow(tgid=100, fd=5, ordinal=2, n=3, nmax=9, flags=R.VMF_DEAD)}  # same fd, later VM
    aggs = {(1, int(Op.UNMAP), 100): tp_row(10, slots_sum=10, slots_max=1, underived=2, lat_count=10,
                                            lat_sum=5000, buckets={7: (8, 10, 64)}),
            (2, int(Op.UNMAP), 100): tp_row(4, slots_sum=8, slots_max=2, buckets={2: (4, 8, 3)})}
    p = dec.decode(tp_maps(aggs, vms))
    rows = {h.vm_id: h for h in p.hva}
    assert set(rows) == {"vm:100:1", "vm:100:2"}
    h = rows["vm:100:1"]
    assert (h.count, h.slots_count, h.slots_sum, h.underived, h.slots_provenance) == (10, 8, 10, 2, "derived")
    assert (h.lat_count, h.lat_sum_ns, h.lat_provenance) == (10, 5000, "syscall")
    bk = {(b.vm_id, b.bucket): b for b in p.by_memslots}
    assert set(bk) == {("vm:100:1", 7), ("vm:100:2", 2)}
    b = bk[("vm:100:1", 7)]
    assert (b.count, b.slots_count, b.slots_sum, b.memslots_max, b.lat_count) == (8, 8, 10, 64, 8)
    info = {v.vm_id: v for v in p.vms}
    assert (info["vm:100:1"].ordinal, info["vm:100:1"].memslots, info["vm:100:1"].partial) == (1, 64, False)
    assert (info["vm:100:2"].ordinal, info["vm:100:2"].memslots_max, info["vm:100:2"].alive) == (2, 9, False)
    assert info["vm:100:1"].label.endswith("[100]#1") and p.unattributed == 0


def test_tracepoint_vm_older_than_the_trace_is_partial_and_underived():
    from kvmtrace.tracer.decode_tp import seed_gen

    g = seed_gen(200, 13)
    vms = {g: R.TpVmRow(tgid=200, fd=13, flags=R.VMF_PARTIAL | R.VMF_NOTAB)}
    p = Decoding(plan()).decode(tp_maps({(g, 0, 200): tp_row(3, underived=3)}, vms))
    (h,) = p.hva
    assert (h.vm_id, h.count, h.slots_count, h.underived, h.slots_provenance) == ("vm:200:fd13", 3, 0, 3, "none")
    (v,) = p.vms
    assert (v.ordinal, v.partial, v.memslots, v.label) == (0, True, None, "?[200]#?")
    assert p.by_memslots == ()


def _c_tp_agg(buckets=(), und=(0, 0, 0), slots_max=0, lat_max=0, lat=(), slots=(), rng=()):
    """A C ``struct tp_agg`` as bcc gives it (attributes): ``buckets`` maps a bucket index to
    (count, lat_count, lat_sum, slots_sum, nmax, nsum); ``und``: (count, lat_count, lat_sum)."""
    from types import SimpleNamespace as NS

    def bkt(count=0, lat_count=0, lat_sum=0, slots_sum=0, nmax=0, nsum=0):
        return NS(count=count, lat_count=lat_count, lat_sum=lat_sum, slots_sum=slots_sum, nmax=nmax, nsum=nsum)

    b = [bkt(*dict(buckets)[i]) if i in dict(buckets) else bkt() for i in range(R.MS_BUCKETS)]
    full = lambda h: list(h) + [0] * (64 - len(h))  # noqa: E731
    s = NS(count=0, lat_count=0, lat_sum=0, lat_max=lat_max, slots_count=0, slots_sum=0, slots_max=slots_max,
           scanned_sum=0, tgid=0)  # the kernel leaves the sums 0: they follow from the buckets
    return NS(a=NS(s=s, lat=full(lat), slots=full(slots), range=full(rng)), owner=7, b=b,
              und=bkt(und[0], und[1], und[2]))


def test_tracepoint_sums_come_from_the_buckets_the_kernel_counts_each_op_in():
    """The kernel counts each op once, in its memslot-count bucket or as underived, and adds no
    separate totals (fewer atomic adds per event): the row read gives the same figures the
    totals would have."""
    v = _c_tp_agg(buckets=((3, (5, 4, 4000, 5, 6, 30)), (7, (2, 2, 900, 3, 64, 128))), und=(4, 3, 1500),
                  slots_max=2, lat_max=2000, lat=(0, 0, 9), slots=(0, 6, 1), rng=(0, 0, 0, 11))
    r = R.TpAggRow.from_map(v)
    a = r.agg
    assert (a.count, a.slots_count, a.slots_sum, r.underived) == (11, 7, 8, 4)
    assert (a.lat_count, a.lat_sum, a.lat_max, a.slots_max, a.scanned_sum) == (9, 6400, 2000, 2, 158)
    assert a.lat[:3] == (0, 0, 9) and a.range[3] == 11 and len(r.buckets) == R.MS_BUCKETS
    assert (r.buckets[7].count, r.buckets[7].nmax, r.buckets[7].nsum) == (2, 64, 128)
    # decoded as before: per VM row, bucket rows for the derived ops only
    p = Decoding(plan(linear=True)).decode(tp_maps({(1, 0, 100): r}, {1: R.TpVmRow(tgid=100, fd=4, ordinal=1)}))
    (h,) = p.hva
    assert (h.count, h.underived, h.slots_count, h.lat_count, h.scanned_sum) == (11, 4, 7, 9, 158)
    assert sorted((b.bucket, b.count, b.lat_count) for b in p.by_memslots) == [(3, 5, 4), (7, 2, 2)]


def test_aggregate_slot_entries_per_vm_match_the_op_count():
    assert R.NR_OPS == len(Op)  # the C NR_OPS (consts.c_defines) and the readers' stride agree


def test_tracepoint_ops_of_no_known_vmm_are_unattributed():
    p = Decoding(plan()).decode(tp_maps({(0, 0, 0): tp_row(9, underived=9),
                                         (1, 0, 100): tp_row(4)}, {1: R.TpVmRow(tgid=100, fd=4, ordinal=1)}))
    assert [h.vm_id for h in p.hva] == ["vm:100:1"] and p.unattributed == 9


def test_tracepoint_memslot_rows_come_from_the_kernel_classification():
    ms = {(1, int(Change.CREATE), 100): R.MsRow(count=3, errors=1, lat_sum=30, lat_max=20, lat=hist(b4=3)),
          (1, int(Change.MOVE), 100): R.MsRow(count=1, lat_sum=9, lat_max=9, lat=hist(b4=1)),
          (7, len(Change), 100): R.MsRow(count=2, lat=hist(b4=2))}
    p = Decoding(plan()).decode(tp_maps(ms=ms))
    got = {(m.vm_id, m.change): (m.count, m.errors, m.change_provenance) for m in p.memslot}
    assert got == {("vm:100:1", "create"): (3, 1, "derived"), ("vm:100:1", "move"): (1, 0, "derived"),
                   ("vm:100:7", "unknown"): (2, 0, "none")}


def test_tracepoint_raw_events_carry_kernel_figures_and_their_syscall_latency():
    dec = Decoding(plan(), keep_events=True)
    U = 0xFFFFFFFF
    feed(dec, rec("hva", tgid=100, tid=101, op=0, start=0x1000_0000, end=0x1000_1000, slots=1, memslots=64, vm=3),
         rec("hva", tgid=100, tid=101, op=0, start=0x1000_0000, end=0x1000_1000, slots=U, memslots=U, vm=3))
    assert [e for e in dec.take_events() if getattr(e, "op", None)] == []  # waiting for syscall end
    feed(dec, rec("sc_end", tgid=100, tid=101, dur_ns=5000, nr_ops=2),
         memslot(2, 0, 4 * MB, 0x1000_0000, vm=3, x=int(Change.FLAGS_ONLY)))
    evs = dec.take_events()
    hv = [(e.vm_id, e.latency_ns, e.slots, e.memslots, e.slots_provenance) for e in evs if hasattr(e, "op")]
    assert hv == [("vm:100:3", 5000, 1, 64, "derived"), ("vm:100:3", 5000, -1, -1, "none")]
    (m,) = [e for e in evs if hasattr(e, "change")]
    assert (m.vm_id, m.change, m.change_provenance, m.slot) == ("vm:100:3", "flags_only", "derived", 2)


def test_tracepoint_dead_vms_are_retired_after_their_final_figures_and_then_forgotten():
    dec = Decoding(plan())
    vms = {1: R.TpVmRow(tgid=100, fd=5, ordinal=1, n=2, nmax=2, flags=R.VMF_DEAD)}
    aggs = {(1, 0, 100): tp_row(6, slots_sum=6, buckets={2: (6, 6, 2)})}
    ms = {(1, int(Change.CREATE), 100): R.MsRow(count=2)}
    m1 = tp_maps(aggs, vms, ms)
    dec.decode(m1)
    assert dec.tp.retire(m1) == ([], [], [])  # dead at one reading only: a late figure may come
    m2 = tp_maps(aggs, vms, ms)
    before = dec.decode(m2)  # the final figures: in this reading's snapshot
    assert [h.count for h in before.hva] == [6] and [v.alive for v in before.vms] == [False]
    assert dec.tp.retire(m2) == ([(1, 0, 100)], [(1, int(Change.CREATE), 100)], [1])
    after = dec.decode(tp_maps())  # the session deleted them from the maps
    # and no later snapshot carries the dead VM: cost follows the live VMs, not history
    assert after.hva == () and after.memslot == () and after.by_memslots == () and after.vms == ()
    assert dec.tp.vms == {} and dec.tp.retired_ops == {0: 6}


def test_tracepoint_linear_scan_kernels_scan_the_memslot_count():
    row = R.TpAggRow(R.AggRow(count=2, slots_count=2, slots_sum=2, scanned_sum=1018),
                     0, tuple(R.TpBucket(count=2, slots_sum=2, nmax=509, nsum=1018) if i == 9 else R.TpBucket()
                              for i in range(R.MS_BUCKETS)))
    maps = tp_maps({(1, 0, 100): row}, {1: R.TpVmRow(tgid=100, fd=4, ordinal=1, n=509, nmax=509)})
    p = Decoding(plan(linear=True)).decode(maps)
    assert p.hva[0].scanned_sum == 1018 and p.by_memslots[0].scanned_sum == 1018
    p = Decoding(plan()).decode(maps)
    assert p.hva[0].scanned_sum is None and p.by_memslots[0].scanned_sum is None


def test_tracepoint_ignored_ioctls_are_reported():
    counters = [0] * (R.CNT_IGNORED + 1)
    counters[R.CNT_IGNORED] = 50
    assert Decoding(plan()).decode(tp_maps(counters=counters)).ignored_ioctls == 50


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
    # a struct kvm * that fits 32 bits is still a struct kvm * for an exact op, and a gen is a
    # tracepoint VM for a tracepoint op: the key's meaning comes from the op's attach mode
    small_kvm = 0x1000
    maps = R.MapContents(aggs={(small_kvm, int(Op.UNMAP), 4242): R.AggRow(count=1)},
                         tp=R.TpMaps(aggs={(1, int(Op.AGE), 4242): tp_row(2, lat_count=2)},
                                     vms={1: R.TpVmRow(tgid=4242, fd=3, ordinal=1)}))
    p = Decoding(plan("kprobe", "kprobe", per_op={"age": "tracepoint"})).decode(maps)
    got = {h.op: (h.vm_id, h.lat_provenance) for h in p.hva}
    assert got == {"unmap": (f"kvm:{small_kvm:#x}:4242", "exact"), "age": ("vm:4242:1", "syscall")}


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
