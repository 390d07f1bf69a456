"""A synthetic tracer session with the TraceSession API (``snapshots``, ``plan``, ``meta``,
``interval``), for tests and for trying the view without root:

    python -m tests.synthetic_top [--interval S] [--duration S] [top options]   (from the repository)

Two VMs: ``guest-a`` (pid 4242) runs throughout; ``guest-b`` (pid 4343) appears at the third
interval and exits after the fifth. Figures per interval are fixed, so expected output can be
computed by hand.
"""

from __future__ import annotations

import argparse
import time
from typing import Iterator, List, Optional

from kvmtrace.snapshot import HvaStats, Log2Hist, MemslotStats, Snapshot, VmInfo
from kvmtrace.tracer.plan import OpPlan, ProbePlan


def tracepoint_plan() -> ProbePlan:
    """The plan this host (6.18, tracepoints only) resolves to."""
    return ProbePlan(
        ops=(
            OpPlan("unmap", "hva", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall", "derived"),
            OpPlan("age", "hva", "tracepoint", "kvm:kvm_age_hva", "none", "derived"),
            OpPlan("test_age", "hva", "tracepoint", "kvm:kvm_test_age_hva", "none", "derived"),
            OpPlan("change_pte", "hva", "none", "", "none", "none"),
            OpPlan("memslot_update", "memslot", "tracepoint", "syscalls:sys_*_ioctl", "syscall", "derived"),
        ),
        linear_scan=False,
    )


def _hva(vm_id, pid, op, k, lat_values, slots_values, lat_prov="syscall"):
    lat = Log2Hist.from_values(lat_values) if lat_prov != "none" else Log2Hist()
    slots = Log2Hist.from_values(slots_values)
    return HvaStats(
        vm_id=vm_id,
        pid=pid,
        op=op,
        count=k * len(slots_values),
        lat_hist=Log2Hist.from_counts([c * k for c in lat.counts]),
        lat_count=k * lat.total,
        lat_sum_ns=k * sum(lat_values) if lat_prov != "none" else 0,
        lat_max_ns=max(lat_values) if lat_prov != "none" else 0,
        lat_provenance=lat_prov,
        slots_hist=Log2Hist.from_counts([c * k for c in slots.counts]),
        slots_count=k * len(slots_values),
        slots_sum=k * sum(slots_values),
        slots_max=max(slots_values),
        slots_provenance="derived",
    )


def snapshot_at(seq: int, interval: float = 1.0, t0: float = 1_700_000_000.0,
                elapsed: Optional[float] = None) -> Snapshot:
    """The cumulative snapshot after ``seq`` intervals (seq >= 1); ``elapsed``: the time since
    start when the intervals were not all ``interval`` long (default ``seq * interval``)."""
    if elapsed is None:
        elapsed = seq * interval
    a = VmInfo("pid:4242", 4242, comm="qemu-system-x86", name="guest-a", vcpus=2, memslots=37)
    hva: List[HvaStats] = [
        # per interval: 1000 unmaps, 500 at 900 ns and 500 at 1500 ns, 1 slot each
        _hva(a.vm_id, a.pid, "unmap", seq, [900] * 500 + [1500] * 500, [1] * 1000),
        # 10 aging calls, 3 slots each, no latency figure in tracepoint mode
        _hva(a.vm_id, a.pid, "age", seq, [0] * 10, [3] * 10, lat_prov="none"),
    ]
    memslot: List[MemslotStats] = []
    vms = [a]
    if seq >= 3:
        b_alive = seq <= 5
        b = VmInfo("pid:4343", 4343, comm="python3", name="", vcpus=1, memslots=512, partial=False, alive=b_alive)
        vms.append(b)
        k = min(seq, 5) - 2  # intervals b was active
        hva.append(_hva(b.vm_id, b.pid, "unmap", k, [3000] * 200, [2] * 200))
        memslot.append(
            MemslotStats(
                b.vm_id, b.pid, "create", count=4 * k, lat_hist=Log2Hist.from_values([20000] * 4 * k),
                lat_sum_ns=80000 * k, lat_max_ns=20000, lat_provenance="syscall", change_provenance="derived",
            )
        )
    return Snapshot(
        seq=seq,
        wall_time=t0 + elapsed,
        mono_ns=int(round(elapsed * 1e9)),
        elapsed_s=elapsed,
        vms=tuple(vms),
        hva=tuple(hva),
        memslot=tuple(memslot),
        lost_events=0,
        map_full=0,
        unattributed=7 * seq,
        self_cpu_s=0.01 * seq * interval,
        meta=(("host", "testhost"), ("kernel", "6.18.0-test")),
    )


class SyntheticSession:
    """TraceSession look-alike. With ``sleep=False`` snapshots come without waiting."""

    def __init__(self, interval: float = 1.0, sleep: bool = True, count: Optional[int] = None):
        self.interval = interval
        self.sleep = sleep
        self.count = count
        self.plan = tracepoint_plan()
        self.meta = {"host": "testhost", "kernel": "6.18.0-test"}
        self.reads = 0  # snapshots produced (= map reads of a real session)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def snapshots(self, duration: Optional[float] = None, stop=None) -> Iterator[Snapshot]:
        """One snapshot every ``self.interval`` seconds; a change of ``interval`` (top's key s)
        applies to the interval under way, as in TraceSession. Snapshot times add up the
        intervals (not the clock), so figures stay exact."""
        seq = 0
        elapsed = 0.0
        last = time.monotonic()
        while True:
            if self.sleep:
                while time.monotonic() < last + self.interval:
                    if stop is not None and stop():
                        return
                    time.sleep(min(0.05, max(0.0, last + self.interval - time.monotonic())))
                last = time.monotonic()
            if stop is not None and stop():
                return
            seq += 1
            self.reads += 1
            elapsed = round(elapsed + self.interval, 9)
            yield snapshot_at(seq, self.interval, elapsed=elapsed)
            if self.count is not None and seq >= self.count:
                return
            if duration is not None and elapsed >= duration - 1e-9:
                return


def main(argv=None):
    from kvmtrace.dashboard.live import run_live

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--log", action="store_true")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--sort", default="ops")
    a = ap.parse_args(argv)
    with SyntheticSession(interval=a.interval) as s:
        run_live(s, duration=a.duration, once=a.once, log=a.log, csv_path=a.csv, sort=a.sort)


if __name__ == "__main__":
    main()
