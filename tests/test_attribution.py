"""Tracepoint mode's ambiguous ops on fake map contents (no bcc, no root): the kernel keeps the
hva ops of a known VMM process whose VM it cannot tell under (gen 0, op, tgid), apart from the
ops of no VMM at all (gen 0, op, 0); the snapshot says how many, in ``ambiguous`` and within
``unattributed``, and no VM row gets them. The real thing: tests/test_attribution_e2e.py."""

from __future__ import annotations

from kvmtrace.consts import Op
from kvmtrace.snapshot import Snapshot
from kvmtrace.tracer import records as R
from kvmtrace.tracer.decode_common import Decoding

from tests.test_decoders import plan, tp_maps, tp_row


def test_ambiguous_ops_are_counted_per_process_and_given_to_no_vm():
    u = int(Op.UNMAP)
    maps = tp_maps({(0, u, 0): tp_row(9, underived=9),      # kswapd & co
                    (0, u, 100): tp_row(400, underived=400),  # VMM 100, VM unknown
                    (1, u, 100): tp_row(4)},
                   {1: R.TpVmRow(tgid=100, fd=4, ordinal=1)})
    p = Decoding(plan()).decode(maps)
    assert [(h.vm_id, h.count) for h in p.hva] == [("vm:100:1", 4)]
    assert (p.unattributed, p.ambiguous) == (409, 400)


def test_ambiguous_is_differenced_like_the_other_counters():
    a = Snapshot(1, 0.0, 0, 1.0, unattributed=10, ambiguous=4)
    b = Snapshot(2, 1.0, 10**9, 2.0, unattributed=25, ambiguous=9)
    d = b.delta(a)
    assert (d.unattributed, d.ambiguous) == (15, 5)
