"""Cost independent of history (issue 20, item 3): a dead VM is written once more after its
death and then dropped from the tracer's decoder, the recorder, rotation and the exporter, so the
work and the rows of an interval follow the live VMs plus the VMs that died in it.

Without root: fake cumulative snapshots of VM churn (thousands of short-lived VMs), fed through
the same code the commands use. With root (``test_record_under_real_vm_churn``): 2,000 real
short-lived VMMs while ``kvmtrace record`` runs; it prints rows and CPU per interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmtrace.snapshot import HvaStats, MemslotStats, Snapshot, VmInfo

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ a fake churn
class Churn:
    """VM j is born at snapshot j // born, lives ``life`` snapshots doing ``ops`` unmaps in
    each (one memslot create at its first), then is dead. ``keep_dead``: the source keeps
    every dead VM in every later snapshot (what the tracer did before; a consumer must cope);
    else it drops a dead VM after two readings (what the tracer does now)."""

    def __init__(self, n_snaps=60, born=20, life=2, ops=3, keep_dead=True):
        self.n_snaps, self.born, self.life, self.ops, self.keep_dead = n_snaps, born, life, ops, keep_dead

    def vm_id(self, j):
        return f"vm:{1000 + j}:1"

    def truth(self, j):
        return self.ops * self.life

    def vms_born_by(self, k):
        return self.born * (k + 1)

    def ended(self, k):
        """VMs whose life ended by snapshot k (all their figures are final)."""
        return range(self.born * max(0, k - self.life + 1))

    def snap(self, k) -> Snapshot:
        vms, hva, mem = [], [], []
        for j in range(self.vms_born_by(k)):
            b = j // self.born
            age = k - b  # 0 at birth
            alive = age < self.life
            if not alive and not self.keep_dead and age >= self.life + 2:
                continue
            vid, pid = self.vm_id(j), 1000 + j
            vms.append(VmInfo(vid, pid, "vmm", alive=alive, ordinal=1))
            hva.append(HvaStats(vid, pid, "unmap", count=self.ops * min(age + 1, self.life)))
            mem.append(MemslotStats(vid, pid, "create", count=1))
        return Snapshot(seq=k + 1, wall_time=1_000_000.0 + k, mono_ns=(k + 1) * 10**9, elapsed_s=k + 1.0,
                        vms=tuple(vms), hva=tuple(hva), memslot=tuple(mem))

    def snaps(self):
        return [self.snap(k) for k in range(self.n_snaps)]

    def live_at(self, k):
        return sum(1 for j in range(self.vms_born_by(k)) if k - j // self.born < self.life)

    def died_at(self, k):
        return sum(1 for j in range(self.vms_born_by(k)) if k - j // self.born == self.life)


def test_an_interval_leaves_out_vms_dead_before_it_unless_a_figure_still_moved():
    a = VmInfo("vm:1:1", 1, alive=True)
    d = VmInfo("vm:2:1", 2, alive=False)
    late = VmInfo("vm:3:1", 3, alive=False)
    prev = Snapshot(1, 0.0, 1, 1.0, vms=(a, d, late),
                    hva=(HvaStats("vm:1:1", 1, "unmap", count=1), HvaStats("vm:2:1", 2, "unmap", count=5),
                         HvaStats("vm:3:1", 3, "unmap", count=5, lat_count=4)))
    cur = Snapshot(2, 1.0, 2, 2.0, vms=(a, d, late),
                   hva=(HvaStats("vm:1:1", 1, "unmap", count=1), HvaStats("vm:2:1", 2, "unmap", count=5),
                        HvaStats("vm:3:1", 3, "unmap", count=5, lat_count=5)))  # a late latency
    dl = cur.delta(prev)
    assert [v.vm_id for v in dl.vms] == ["vm:1:1", "vm:3:1"]  # live, and dead with a late figure
    assert [(h.vm_id, h.count, h.lat_count) for h in dl.hva] == [("vm:1:1", 0, 0), ("vm:3:1", 0, 1)]
    # the interval in which a VM is first seen dead still holds it (its last figures)
    first = Snapshot(0, 0.0, 0, 0.0, vms=(a, VmInfo("vm:2:1", 2, alive=True)))
    assert [v.vm_id for v in prev.delta(first).vms] == ["vm:1:1", "vm:2:1", "vm:3:1"]


def _record(tmp_path, snaps, name="rec"):
    from kvmtrace.analysis.recorder import Recorder
    from kvmtrace.analysis.recording import read_recording

    prev = None
    with Recorder(str(tmp_path / name), fsync=False) as rec:
        for s in snaps:
            rec.write(s.delta(prev))
            prev = s
    return read_recording(str(tmp_path / name))


@pytest.mark.parametrize("keep_dead", [True, False], ids=["source-keeps-dead", "source-drops-dead"])
def test_recorder_writes_a_dead_vm_once_after_its_death_and_rows_stay_flat(tmp_path, keep_dead):
    ch = Churn(n_snaps=60, born=20, keep_dead=keep_dead)  # 1,200 VMs, 40 live at a time
    r = _record(tmp_path, ch.snaps())
    vms = r.tables["vms"]
    per = vms.groupby("interval").size()
    bound = [ch.live_at(k) + ch.died_at(k) for k in range(ch.n_snaps)]
    print(f"\nvms rows per interval: first {list(per[:5])} last {list(per[-5:])}; bound {bound[-1]}")
    assert all(per.get(k, 0) <= bound[k] for k in range(ch.n_snaps)), (list(per), bound)
    dead = vms[~vms["alive"]]
    assert dead.groupby("vm_id").size().max() == 1  # written once after its death, then dropped
    # every VM's figures exact
    ops = r.tables["hva"].groupby("vm_id")["count"].sum()
    assert len(ops) == ch.vms_born_by(ch.n_snaps - 1)
    assert all(ops[ch.vm_id(j)] == ch.truth(j) for j in ch.ended(ch.n_snaps - 1))
    assert r.tables["memslot"].groupby("vm_id")["count"].sum().eq(1).all()


def test_rotation_carries_no_dead_vm_into_the_next_recording(tmp_path):
    from kvmtrace.analysis import rotation
    from kvmtrace.analysis.recording import read_recording
    from kvmtrace.commands.record import Signals, run_recording

    ch = Churn(n_snaps=40, born=20, keep_dead=True)
    snaps = ch.snaps()
    sigs = Signals(rotate_on_hup=True)

    class Session:
        plan = None
        interrupted = False
        i = 0

        def snapshots(self, duration=None, stop=None):
            while self.i < len(snaps):
                s = snaps[self.i]
                self.i += 1
                if self.i % 10 == 0 and self.i < len(snaps):
                    sigs.rotate.set()  # as SIGHUP: close this recording, start the next
                yield s
                if stop():
                    return

    class Quiet:
        def show(self, text):
            pass

        def done(self):
            pass

    out = tmp_path / "rot"
    rotation.record_rotating(Session(), str(out), "parquet", {"label": "churn"}, False, None, None, sigs, Quiet(),
                             3600.0, None, run_recording=run_recording, attached=lambda s, p: "attached")
    idx = rotation.read_index(str(out))
    assert len(idx["recordings"]) == 4
    seen_dead = set()
    for n in idx["recordings"]:
        vms = read_recording(str(out / n)).tables["vms"]
        dead = set(vms[~vms["alive"]]["vm_id"])
        assert not dead & seen_dead, "a dead VM written again by a later recording"
        seen_dead |= dead
        assert vms.groupby("interval").size().max() <= ch.live_at(10) + ch.died_at(10)
    rep = rotation.read_rotated(str(out))
    ops = rep.tables["hva"].groupby("vm_id")["count"].sum()
    assert all(ops[ch.vm_id(j)] == ch.truth(j) for j in ch.ended(len(snaps) - 1))


# ------------------------------------------------------------------------------ exporter
def _exported(ex):
    from kvmtrace.exporter.collector import render

    text = render(ex).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvmtrace_hva_operations_total{"):
            vid = line.split('vm_id="', 1)[1].split('"', 1)[0]
            out[vid] = float(line.rsplit(" ", 1)[1])
    return out


def test_exporter_places_go_to_live_vms_and_a_dead_vm_keeps_its_final_figures():
    from kvmtrace.exporter.collector import Exporter, VmGate

    now = [0.0]
    ch = Churn(n_snaps=30, born=2, life=2, keep_dead=False)  # 4 live at a time, 2 die per snapshot
    ex = Exporter(VmGate(max_vms=6, grace_s=1000.0, clock=lambda: now[0]))
    for k, s in enumerate(ch.snaps()):
        now[0] = float(k)
        ex.update(s)
        got = _exported(ex)
        live = [v.vm_id for v in s.vms if v.alive]
        assert all(vid in got for vid in live), (k, live, sorted(got))  # every live VM has its series
        assert ex.view.vms_exported <= 6 and ex.view.vms_refused == 0
        # a dead VM still exported shows its final figures, also once the tracer dropped it
        for vid, n in got.items():
            j = int(vid.split(":")[1]) - 1000
            if j // ch.born + ch.life <= k:
                assert n == ch.truth(j), (k, vid, n)
    g = ex.gate
    assert len(g.expired) + len(g.last_alive) + len(ex._kept) <= 3 * len(ch.snap(29).vms) + 6


def test_exporter_dead_vm_in_grace_frees_its_place_only_for_a_live_vm():
    from kvmtrace.exporter.collector import Exporter, VmGate

    now = [0.0]
    ex = Exporter(VmGate(max_vms=2, grace_s=300.0, clock=lambda: now[0]))

    def snap(seq, *vms):
        return Snapshot(seq, float(seq), seq, float(seq), vms=tuple(VmInfo(f"vm:{p}:1", p, "q", alive=a) for p, a in vms),
                        hva=tuple(HvaStats(f"vm:{p}:1", p, "unmap", count=p) for p, _ in vms))

    ex.update(snap(1, (1, True), (2, True)))
    now[0] = 10
    ex.update(snap(2, (1, False), (2, False)))  # both exit; no live VM waits: both keep their places
    assert set(ex.view.labels) == {"vm:1:1", "vm:2:1"}
    now[0] = 20
    ex.update(snap(3, (3, True)))  # the tracer dropped 1 and 2; a live VM takes the place of one
    assert set(ex.view.labels) >= {"vm:3:1"} and len(ex.view.labels) == 2 and ex.view.vms_refused == 0
    assert _exported(ex).get("vm:3:1") == 3
    kept = (set(ex.view.labels) - {"vm:3:1"}).pop()
    assert _exported(ex)[kept] == int(kept.split(":")[1])  # the other still shows its final figure
    now[0] = 400
    ex.update(snap(4, (3, True)))  # grace over: its place frees
    assert set(ex.view.labels) == {"vm:3:1"} and ex.gate.expired_total == 2


def test_exporter_gate_state_stays_bounded_under_churn():
    from kvmtrace.exporter.collector import VmGate

    g = VmGate(max_vms=8, grace_s=5.0, clock=lambda: now[0])
    now = [0.0]
    ch = Churn(n_snaps=150, born=20, life=2, keep_dead=False)  # 3,000 VMs
    for k in range(ch.n_snaps):
        now[0] = float(k)
        g.update(ch.snap(k).vms)
    size = len(g.expired) + len(g.last_alive) + len(g.admitted)
    print(f"\ngate state after {ch.vms_born_by(ch.n_snaps - 1)} VMs: {size} entries")
    assert size <= 2 * len(ch.snap(ch.n_snaps - 1).vms) + 8


def test_departed_and_with_vms_carry_a_dropped_vms_final_figures():
    from kvmtrace.snapshot import departed, with_vms

    a = VmInfo("vm:1:1", 1, alive=True, vcpus=2)
    prev = Snapshot(1, 0.0, 1, 1.0, vms=(a,), hva=(HvaStats("vm:1:1", 1, "unmap", count=7),))
    cur = Snapshot(2, 1.0, 2, 2.0)
    d = departed(prev, cur)
    assert list(d) == ["vm:1:1"] and not d["vm:1:1"].info.alive and d["vm:1:1"].hva[0].count == 7
    merged = with_vms(cur, d.values())
    assert [v.vm_id for v in merged.vms] == ["vm:1:1"] and merged.hva[0].count == 7
    assert departed(cur, merged) == {} and with_vms(merged, d.values()) is merged


# ------------------------------------------------------------------------------ the decoder
def test_tracepoint_decoder_work_follows_the_live_vms_not_history():
    """The session's loop (decode, retire, delete the retired keys from the maps) over 3,000
    VMs that come and go: every snapshot holds the live VMs and the recently dead only, each VM's
    final figures appear, and the names the decoder remembers stay bounded."""
    from kvmtrace.tracer import records as R
    from kvmtrace.tracer.decode_common import Decoding
    from tests.test_decoders import plan, tp_maps, tp_row

    alive_pids = set()
    dec = Decoding(plan(), proc_info=lambda pid: ("vmm", "", 1, pid in alive_pids))
    aggs, vms = {}, {}
    final = {}
    sizes = []
    for k in range(150):
        for j in range(20 * k, 20 * k + 20):  # 20 new VMs per reading, each with j % 7 + 1 unmaps
            gen, pid = j + 1, 10_000 + j
            vms[gen] = R.TpVmRow(tgid=pid, fd=5, ordinal=1)
            aggs[(gen, 0, pid)] = tp_row(j % 7 + 1)
            alive_pids.add(pid)
            dec.stream.remember(pid)
        for gen in [g for g in vms if g <= 20 * (k - 1)]:  # VMs of the reading before die now
            vms[gen] = R.TpVmRow(tgid=vms[gen].tgid, fd=5, ordinal=1, flags=R.VMF_DEAD)
            alive_pids.discard(vms[gen].tgid)
        m = tp_maps(dict(aggs), dict(vms))
        p = dec.decode(m)
        for h in p.hva:
            final[h.vm_id] = h.count
        sizes.append(len(p.vms))
        agg_keys, _ms, gens = dec.tp.retire(m)
        for key in agg_keys:
            del aggs[key]
        for g in gens:
            del vms[g]
    print(f"\nVMs per snapshot: first {sizes[:3]} last {sizes[-3:]}")
    assert max(sizes[5:]) <= 4 * 20  # live (2 readings' births) + dead not yet retired (2 readings)
    assert len(dec.tp.vms) <= 4 * 20 and len(dec.stream.proc_cache) <= 4 * 20
    assert all(final[f"vm:{10_000 + j}:{j + 1}"] == j % 7 + 1 for j in range(20 * 148))
