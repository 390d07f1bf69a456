"""The ring buffer read through its pages (rawevents.RingReader) on a fake ring laid out as the
kernel lays it out (no root), and columnar decoding of a batch (no Python object per event)."""

from __future__ import annotations

import numpy as np
import pytest

from kvmtrace.consts import Change, Op
from kvmtrace.tracer import records as R
from kvmtrace.tracer import rawevents as RE
from kvmtrace.tracer.decode_common import Decoding

from .test_decoders import MB, PAGE, feed, plan, rec, tp_maps, tp_row

PG = 4096


class FakeRing:
    """A BPF ring buffer as mmap shows it: consumer page, producer page, data area twice."""

    def __init__(self, size=PG * 4):
        self.size = size
        self.cons = bytearray(PG)
        self.prod = bytearray(PG + 2 * size)
        self.pos = 0

    def _put(self, off, data):
        for i, b in enumerate(data):
            o = (off + i) & (self.size - 1)
            self.prod[PG + o] = b
            self.prod[PG + self.size + o] = b  # the second mapping of the same pages

    def write(self, raw, busy=False, discard=False):
        assert self.pos + RE.STRIDE - int.from_bytes(self.cons[:8], "little") <= self.size, "ring full"
        n = len(raw) | (RE.BUSY if busy else 0) | (RE.DISCARD if discard else 0)
        self._put(self.pos, n.to_bytes(4, "little") + bytes(4) + raw + bytes(RE.STRIDE - RE.HDR - len(raw)))
        self.pos += RE.STRIDE
        self.prod[0:8] = self.pos.to_bytes(8, "little")
        return self.pos - RE.STRIDE

    def commit(self, at):
        """The producer finished writing the record at ``at``: its BUSY bit goes."""
        self._put(at, (R.EVENT_SIZE).to_bytes(4, "little"))

    def reader(self):
        return RE.RingReader(self.cons, self.prod, self.size, page=PG)


def hva(i, tgid=100, tid=None, gen=1, slots=1, memslots=1):
    """A tracepoint-mode hva record of VM ``gen`` with its kernel-derived figures."""
    return rec("hva", tgid=tgid, tid=tid, ts=i, op=int(Op.UNMAP), start=0x1000_0000 + i * PAGE,
               end=0x1000_0000 + (i + 1) * PAGE, vm=gen, slots=slots, memslots=memslots)


def test_batches_wrap_around_and_advance_the_consumer():
    ring = FakeRing()
    r = ring.reader()
    got = []
    for round_ in range(5):  # 5 x 100 records through a ring of 186: wraps twice
        for i in range(100):
            ring.write(hva(round_ * 100 + i))
        b = r.read()
        got += b["ts"].tolist()
        assert int.from_bytes(ring.cons[:8], "little") == ring.pos
    assert got == list(range(500)) and r.records == 500
    assert (b["hva_start"] == 0x1000_0000 + np.arange(400, 500) * PAGE).all()


def test_read_stops_at_a_record_still_being_written_and_skips_discarded():
    ring = FakeRing()
    r = ring.reader()
    ring.write(hva(1))
    ring.write(hva(2), discard=True)
    at = ring.write(hva(3), busy=True)
    ring.write(hva(4))
    b = r.read()
    assert b["ts"].tolist() == [1] and r.discarded == 1
    assert int.from_bytes(ring.cons[:8], "little") == at  # not past the busy record
    ring.commit(at)
    assert r.read()["ts"].tolist() == [3, 4]


def test_limit_and_a_foreign_record_size():
    ring = FakeRing()
    r = ring.reader()
    for i in range(10):
        ring.write(hva(i))
    assert r.read(limit=4)["ts"].tolist() == [0, 1, 2, 3]
    assert r.read()["ts"].tolist() == [4, 5, 6, 7, 8, 9]
    ring.write(hva(10)[:72])
    with pytest.raises(ValueError, match="80-byte"):
        r.read()


def _batch(*records):
    ring = FakeRing(size=PG * 64)
    for x in records:
        ring.write(x)
    return ring.reader().read()


@pytest.mark.parametrize("keep", [False, True])
def test_a_batch_decodes_as_record_by_record(keep):
    records = [rec("vm_create", tgid=100, ret=4),
               rec("memslot", tgid=100, lat_ns=10, gpa=0, size=4 * MB, hva=0x1000_0000, slot=0,
                   change=int(Change.CREATE), vm=1),
               *[hva(i, tid=101) for i in range(50)],
               rec("sc_end", tgid=100, tid=101, dur_ns=7000, nr_ops=50),
               rec("memslot", tgid=100, lat_ns=10, gpa=0, size=0, hva=0, slot=0, change=int(Change.DELETE), vm=1),
               *[hva(i, tid=102, slots=0xFFFFFFFF, memslots=0xFFFFFFFF) for i in range(50, 60)]]
    one, batch = Decoding(plan(), keep_events=keep), Decoding(plan(), keep_events=keep)
    feed(one, *records)
    batch.on_batch(_batch(*records))
    maps = tp_maps({(1, 0, 100): tp_row(60, underived=10)}, {1: R.TpVmRow(tgid=100, fd=4, ordinal=1)})
    assert one.decode(maps) == batch.decode(maps)
    key = lambda e: (type(e).__name__, e.ts_ns, e.tid)  # noqa: E731
    a, c = sorted(one.take_events(), key=key), sorted(batch.take_events(), key=key)
    assert a == c
    assert len(a) == (52 if keep else 0)  # tid 102's ops wait for the end of their syscall
    end = rec("sc_end", tgid=100, tid=102, dur_ns=900, nr_ops=10)
    feed(one, end)
    batch.on_batch(_batch(end))  # the next batch: rows carried over get their latency
    a, c = sorted(one.take_events(), key=key), sorted(batch.take_events(), key=key)
    assert a == c and [e.latency_ns for e in c] == ([900] * 10 if keep else [])
    assert all(e.vm_id == "vm:100:1" and e.slots == -1 and e.slots_provenance == "none" for e in c)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_recorded_columns_equal_recorded_objects(tmp_path, fmt):
    """hva events handed over as columns (HvaEventBatch) are recorded exactly as the same
    events handed over as objects (including addresses above 2**63, which wrap as in C)."""
    from kvmtrace.analysis.recording import Recorder, read_recording
    from kvmtrace.snapshot import HvaEvent, Snapshot

    dec = Decoding(plan(), keep_events=True)
    recs = [hva(i, tid=101) for i in range(20)]
    recs.append(rec("hva", tgid=100, tid=101, ts=99, op=int(Op.AGE), start=(1 << 64) - 2 * PAGE,
                    end=(1 << 64) - PAGE, vm=1, slots=0, memslots=1))
    recs.append(rec("sc_end", tgid=100, tid=101, dur_ns=5000, nr_ops=21))
    dec.on_batch(_batch(*recs))
    batches, others = dec.take_event_batches()
    assert batches and sum(len(b) for b in batches) == 21
    objs = [e for b in batches for e in b.events()]
    assert all(isinstance(e, HvaEvent) for e in objs)
    snap = Snapshot(1, 0.0, 10**9, 1.0).delta(None)
    out = {}
    for name, events in (("cols", list(batches) + others), ("objs", objs + others)):
        with Recorder(str(tmp_path / name), fmt=fmt, events=True) as r:
            r.write(snap, events)
        out[name] = read_recording(str(tmp_path / name))
        assert out[name].meta["totals"]["hva_events"] == 21
    a, c = out["cols"]["hva_events"], out["objs"]["hva_events"]
    assert len(a) == 21 and a.astype(str).equals(c.astype(str))
    assert (a["start"] < 0).sum() == 1  # the wrapped address


def test_rows_waiting_for_a_syscall_end_are_bounded(monkeypatch):
    """hva ops outside any system call never get a syscall end: beyond the bound, the oldest
    are kept without latency instead of waiting forever."""
    monkeypatch.setattr(RE, "MAX_PENDING_ROWS", 8)
    dec = Decoding(plan(), keep_events=True)
    dec.on_batch(_batch(*[hva(i, tid=555) for i in range(20)]))
    batches, _ = dec.take_event_batches()
    kept = [e for b in batches for e in b.events()]
    assert [e.ts_ns for e in kept] == list(range(12)) and {e.latency_ns for e in kept} == {-1}
    assert {e.lat_provenance for e in kept} == {"none"} and len(dec._pending["ts_ns"]) == 8


def test_exact_records_batch_as_one_by_one():
    from kvmtrace.consts import Change

    kvm = 0xFFFF_8881_0000_1000
    recs = [rec("memslot", tgid=42, vm=kvm, lat_ns=5, gpa=0, size=4 * MB, hva=0x1000_0000, slot=0,
                change=int(Change.CREATE))]
    recs += [rec("hva", tgid=42, tid=43, ts=10 + i, vm=kvm, op=int(Op.UNMAP), start=0x1000_0000, end=0x1000_1000,
                  lat_ns=700 + i, slots=1, scanned=0, owner=42, memslots=R.NO_COUNT) for i in range(70)]
    one, batch = Decoding(plan("kprobe", "kprobe"), keep_events=True), Decoding(plan("kprobe", "kprobe"), keep_events=True)
    feed(one, *recs)
    batch.on_batch(_batch(*recs))
    key = lambda e: (type(e).__name__, e.ts_ns)  # noqa: E731
    a, c = sorted(one.take_events(), key=key), sorted(batch.take_events(), key=key)
    hv = [e for e in c if hasattr(e, "op")]
    # the kernel did not know the count (-1): the mirrored table's
    assert a == c and len(hv) == 70 and hv[-1].latency_ns == 769 and hv[-1].memslots == 1


def test_exact_vm_lifetimes_batch_as_one_by_one():
    from kvmtrace.consts import Change

    kvm = 0xFFFF_8881_0000_1000
    recs = [rec("vm_life", tgid=42, vm=kvm, owner=42, ordinal=2, memslots=0),
            rec("memslot", tgid=42, vm=kvm, lat_ns=5, gpa=0, size=4 * MB, hva=0x1000_0000, slot=0,
                change=int(Change.CREATE))]
    recs += [rec("hva", tgid=42, tid=43, ts=10 + i, vm=kvm, op=int(Op.UNMAP), start=0x1000_0000, end=0x1000_1000,
                 lat_ns=700, slots=1, scanned=509, owner=42, ordinal=2, memslots=509) for i in range(70)]
    recs.append(rec("vm_life", tgid=42, vm=kvm, owner=42, ordinal=2, memslots=509, memslots_max=509, destroyed=1))
    one, batch = Decoding(plan("kprobe", "kprobe"), keep_events=True), Decoding(plan("kprobe", "kprobe"), keep_events=True)
    feed(one, *recs)
    batch.on_batch(_batch(*recs))
    key = lambda e: (type(e).__name__, e.ts_ns)  # noqa: E731
    a, c = sorted(one.take_events(), key=key), sorted(batch.take_events(), key=key)
    assert a == c and {e.vm_id for e in c} == {f"kvm:{kvm:#x}:42#2"}
    assert {e.memslots for e in c if hasattr(e, "op")} == {509}
    assert one.exact.seen == batch.exact.seen == {f"kvm:{kvm:#x}:42#2": {
        "ordinal": 2, "alive": False, "memslots_max": 509, "memslots": 509, "memslots_provenance": "exact"}}
