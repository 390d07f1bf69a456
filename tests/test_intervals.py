"""Honest intervals (no root): a snapshot's time is the moment its maps are read, so rates and
kvmtrace's CPU share divide by the time the figures really cover, even when decoding a burst
of events makes a snapshot late; a late snapshot says so (``late_s``).

Regression: under ~550 k unmaps/s, ``top --log --interval 2`` printed a row of 16 s as
``unmap/s 4000217`` and ``cpu% 755.8``: the snapshot's time was taken before the event buffer
was drained (which took seconds) and the counters and CPU time after."""

from __future__ import annotations

import time

import pytest

from kvmtrace.dashboard.model import ViewOptions
from kvmtrace.dashboard.plain import LogFormatter, plain_header
from kvmtrace.dashboard.view import cost_text, cpu_percent, late_text
from kvmtrace.snapshot import SelfCost, Snapshot
from kvmtrace.tracer import records as R
from kvmtrace.tracer.decode_common import Decoding
from kvmtrace.tracer.session import TraceSession

from .test_decoders import plan

RATE = 1000.0  # unmaps per second of real time, counted in the kernel


class SlowBuffer:
    """A bcc object whose event buffer takes a given time (busy: CPU) to drain."""

    def __init__(self, drains):
        self.drains = list(drains)

    def ring_buffer_consume(self):
        d = self.drains.pop(0) if self.drains else 0.0
        end = time.monotonic() + d
        while time.monotonic() < end:  # decoding a burst costs CPU
            pass


def fake_session(drains, interval=0.1):
    s = TraceSession(interval=interval)
    s.bpf = SlowBuffer(drains)
    s._ringbuf = True
    s.plan = plan()
    s.decoding = Decoding(s.plan, owns_vm=lambda p: True)
    s._t0 = time.monotonic_ns()
    s._rusage0 = s._cpu()
    t0 = s._t0

    def read_maps():  # the kernel's counter: RATE per second since attach, read now
        n = int(RATE * (time.monotonic_ns() - t0) / 1e9)
        return R.MapContents(tp=R.TpMaps(aggs={(1, 0, 100): R.TpAggRow(R.AggRow(count=n))},
                                         vms={1: R.TpVmRow(tgid=100, fd=4, ordinal=1)}))

    s.read_maps = read_maps
    return s


def unmap_rate(d: Snapshot) -> float:
    return sum(h.count for h in d.hva) / d.elapsed_s


def test_rates_and_cpu_share_use_the_time_the_figures_cover():
    s = fake_session([0.0, 0.6, 0.0])  # the second snapshot drains a 0.6 s burst
    a = s.snapshot()
    time.sleep(0.2)
    b = s.snapshot()
    time.sleep(0.2)
    c = s.snapshot()
    for d in (b.delta(a), c.delta(b)):
        assert unmap_rate(d) == pytest.approx(RATE, rel=0.1)
        assert cpu_percent(d) <= 100.0 * 1.1  # one busy thread: at most one core (+ clock slack)
    assert b.delta(a).elapsed_s >= 0.6  # the interval really lasted that long


def test_a_late_snapshot_says_so_and_its_rate_stays_true():
    s = fake_session([0.0, 1.0, 0.0], interval=0.5)
    snaps = list(s.snapshots(duration=2.2))
    late = [x for x in snaps if x.late_s >= 0.9]
    assert len(late) == 1 and late[0] is snaps[1]
    assert all(x.late_s < 0.5 for x in snaps if x is not late[0])  # others: on time (load noise aside)
    for p, x in zip(snaps, snaps[1:]):
        assert unmap_rate(x.delta(p)) == pytest.approx(RATE, rel=0.15)
    d = late[0].delta(snaps[snaps.index(late[0]) - 1])
    assert "LATE by 1." in late_text(d)
    assert late_text(d) in LogFormatter(("unmap",)).lines_for(late[0], d, s.plan, ViewOptions())[-1]


def test_cost_shown_per_event_and_as_cpu_share():
    prev = Snapshot(1, 0.0, 10**9, 1.0, cost=SelfCost("enabled", 1_000_000, 10_000, 0.1))
    cur = Snapshot(2, 2.0, 3 * 10**9, 3.0, cost=SelfCost("enabled", 4_000_000, 30_000, 0.15), self_cpu_s=0.05)
    d = cur.delta(prev)
    # 3 ms of BPF run time over 20000 runs in 2 s: 150 ns per event, 0.15 % of one CPU
    assert cost_text(d) == "in kernel 150 ns/event, 0.15% CPU"
    assert cost_text(Snapshot(1, 0, 0, 1.0, cost=SelfCost("unavailable: the kernel has no BPF_ENABLE_STATS (Linux 5.8+)"))) \
        == "in-kernel cost unavailable: the kernel has no BPF_ENABLE_STATS (Linux 5.8+)"
    assert cost_text(Snapshot(1, 0, 0, 1.0)) == ""  # a source that measured nothing (replay, fake)
    assert "in kernel 150 ns/event, 0.15% CPU" in plain_header(cur, d, {}, None, "interval")[2]
