"""Synthetic runs for tests, fixtures and benchmarks: raw events drawn from known distributions
and the cumulative snapshots a tracer would have produced from exactly those events (so every
aggregate equals the sum over the events)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..consts import LOG2_BUCKETS
from ..snapshot import HvaEvent, HvaStats, Log2Hist, MemslotBucketStats, MemslotEvent, MemslotStats, Snapshot, VmInfo
from .tables import log2_buckets


@dataclass
class SynthVm:
    vm_id: str
    pid: int
    comm: str = "qemu-system-x86"
    name: str = ""
    memslots: Optional[int] = 10  # count at the end (VmInfo.memslots)
    memslots_provenance: str = "exact"
    ordinal: int = 1  # n-th VM of its process (VmInfo.ordinal)
    memslots_max: Optional[int] = None  # default: the largest count of its ops / the final count


@dataclass
class SynthOp:
    """hva op (``op``) or memslot change (``change``) drawn per interval: ``per_interval`` events,
    latency lognormal(median ``lat_median_ns``, ``lat_sigma``), slots visited = ``slots``."""

    vm_id: str
    op: str = ""
    change: str = ""
    per_interval: int = 100
    lat_median_ns: float = 1000.0
    lat_sigma: float = 0.3
    slots: int = 1
    scanned: Optional[int] = None  # linear-scan kernels: memslots scanned per op
    lat_provenance: str = "exact"
    slots_provenance: str = "exact"
    memslots: Optional[int] = None  # the VM's memslot count at these ops (default: the VM's final count)
    counts: Optional[Sequence[int]] = None  # events per interval (cycled), instead of per_interval: a varying rate


@dataclass
class _Acc:
    count: int = 0
    lat: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_BUCKETS, dtype=np.int64))
    lat_sum: int = 0
    lat_max: int = 0
    slots: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_BUCKETS, dtype=np.int64))
    slots_sum: int = 0
    slots_max: int = 0
    scanned: Optional[int] = None
    rng: np.ndarray = field(default_factory=lambda: np.zeros(LOG2_BUCKETS, dtype=np.int64))
    errors: int = 0
    scanned_max: Optional[int] = None
    memslots_max: int = 0


def _hist(values: np.ndarray) -> np.ndarray:
    return np.bincount(log2_buckets(values), minlength=LOG2_BUCKETS)[:LOG2_BUCKETS]


def simulate(
    vms: Sequence[SynthVm],
    ops: Sequence[SynthOp],
    intervals: int = 5,
    interval_s: float = 1.0,
    start_wall: float = 1_700_000_000.0,
    seed: int = 1,
    events: bool = True,
    lost_per_interval: int = 0,
    kernel_buckets: bool = True,
) -> Tuple[List[Snapshot], List[list]]:
    """Cumulative snapshots (one per interval) and the raw events of each interval.
    ``kernel_buckets``: also the in-kernel memslot-count buckets (Snapshot.by_memslots), keyed
    by each op's memslot count at the event (SynthOp.memslots, default the VM's count)."""
    rng = np.random.default_rng(seed)
    acc: Dict[Tuple[str, str, str], _Acc] = {}
    vm_by_id = {v.vm_id: v for v in vms}
    snaps: List[Snapshot] = []
    evs: List[list] = []
    mono0 = 10_000_000_000
    for i in range(intervals):
        batch = []
        t0 = mono0 + int(i * interval_s * 1e9)
        for o in ops:
            n = o.counts[i % len(o.counts)] if o.counts else o.per_interval
            lat = np.maximum(1, rng.lognormal(np.log(o.lat_median_ns), o.lat_sigma, n)).astype(np.int64)
            vm = vm_by_id[o.vm_id]
            kind = "hva" if o.op else "mem"
            key = (kind, o.vm_id, o.op or o.change)
            a = acc.setdefault(key, _Acc())
            a.count += n
            a.lat += _hist(lat)
            a.lat_sum += int(lat.sum())
            a.lat_max = max(a.lat_max, int(lat.max()) if n else 0)
            ts = t0 + np.sort(rng.integers(0, int(interval_s * 1e9), n))
            if kind == "hva":
                sl = np.full(n, o.slots, dtype=np.int64)
                a.slots += _hist(sl)
                a.slots_sum += int(sl.sum())
                a.slots_max = max(a.slots_max, o.slots if n else 0)
                sizes = np.full(n, 4096, dtype=np.int64)
                a.rng += _hist(sizes)
                if o.scanned is not None:
                    a.scanned = (a.scanned or 0) + o.scanned * n
                    a.scanned_max = max(a.scanned_max or 0, o.scanned) if n else a.scanned_max
                ms = o.memslots if o.memslots is not None else vm.memslots
                if kernel_buckets and ms is not None and n:
                    from ..snapshot import log2_bucket

                    b = acc.setdefault(("bucket", o.vm_id, o.op, log2_bucket(ms)), _Acc())
                    b.count += n
                    b.lat_sum += int(lat.sum())
                    b.slots_sum += int(sl.sum())
                    b.memslots_max = max(b.memslots_max, ms)
                    if o.scanned is not None:
                        b.scanned = (b.scanned or 0) + o.scanned * n
                if events:
                    for j in range(n):
                        batch.append(
                            HvaEvent(
                                ts_ns=int(ts[j]), vm_id=o.vm_id, pid=vm.pid, tid=vm.pid + 1, op=o.op,
                                start=0x7F0000000000 + 4096 * j, end=0x7F0000000000 + 4096 * (j + 1),
                                latency_ns=int(lat[j]), slots=o.slots,
                                scanned=-1 if o.scanned is None else o.scanned,
                                memslots=-1 if ms is None else ms,
                                lat_provenance=o.lat_provenance, slots_provenance=o.slots_provenance,
                            )
                        )
            elif events:
                for j in range(n):
                    batch.append(
                        MemslotEvent(
                            ts_ns=int(ts[j]), vm_id=o.vm_id, pid=vm.pid, tid=vm.pid, change=o.change,
                            slot=j % 32, as_id=0, gpa=(1 << 32) + (j << 21), size=1 << 21,
                            hva=0x7F0000000000 + (j << 21), flags=0, result=0, latency_ns=int(lat[j]),
                            lat_provenance=o.lat_provenance, change_provenance="exact",
                        )
                    )
        hva, mem = [], []
        for o in ops:
            kind = "hva" if o.op else "mem"
            a = acc[(kind, o.vm_id, o.op or o.change)]
            pid = vm_by_id[o.vm_id].pid
            if kind == "hva":
                hva.append(
                    HvaStats(
                        vm_id=o.vm_id, pid=pid, op=o.op, count=a.count,
                        lat_hist=Log2Hist.from_counts(a.lat.tolist()), lat_count=a.count,
                        lat_sum_ns=a.lat_sum, lat_max_ns=a.lat_max, lat_provenance=o.lat_provenance,
                        slots_hist=Log2Hist.from_counts(a.slots.tolist()), slots_count=a.count,
                        slots_sum=a.slots_sum, slots_max=a.slots_max, slots_provenance=o.slots_provenance,
                        scanned_sum=a.scanned, range_hist=Log2Hist.from_counts(a.rng.tolist()),
                        scanned_max=a.scanned_max,
                    )
                )
            else:
                mem.append(
                    MemslotStats(
                        vm_id=o.vm_id, pid=pid, change=o.change, count=a.count, errors=0,
                        lat_hist=Log2Hist.from_counts(a.lat.tolist()), lat_sum_ns=a.lat_sum,
                        lat_max_ns=a.lat_max, lat_provenance=o.lat_provenance, change_provenance="exact",
                    )
                )
        buckets = []
        provs = {(o.vm_id, o.op): o for o in ops if o.op}
        for k, b in sorted((k, b) for k, b in acc.items() if k[0] == "bucket"):
            o = provs[(k[1], k[2])]
            buckets.append(
                MemslotBucketStats(
                    vm_id=k[1], pid=vm_by_id[k[1]].pid, op=k[2], bucket=k[3], count=b.count,
                    memslots_max=b.memslots_max, lat_count=b.count, lat_sum_ns=b.lat_sum,
                    slots_count=b.count, slots_sum=b.slots_sum, scanned_sum=b.scanned,
                    lat_provenance=o.lat_provenance, slots_provenance=o.slots_provenance,
                )
            )

        def vm_max(v):
            if v.memslots_max is not None:
                return v.memslots_max
            seen = [o.memslots for o in ops if o.vm_id == v.vm_id and o.memslots is not None]
            seen += [v.memslots] if v.memslots is not None else []
            return max(seen) if seen else None

        vminfo = tuple(
            VmInfo(vm_id=v.vm_id, pid=v.pid, comm=v.comm, name=v.name, vcpus=1, memslots=v.memslots,
                   memslots_provenance=v.memslots_provenance if v.memslots is not None else "none",
                   ordinal=v.ordinal, memslots_max=vm_max(v))
            for v in vms
        )
        snaps.append(
            Snapshot(
                seq=i + 1,
                wall_time=start_wall + (i + 1) * interval_s,
                mono_ns=mono0 + int((i + 1) * interval_s * 1e9),
                elapsed_s=(i + 1) * interval_s,
                vms=vminfo,
                hva=tuple(hva),
                memslot=tuple(mem),
                by_memslots=tuple(buckets),
                lost_events=lost_per_interval * (i + 1),
            )
        )
        evs.append(batch)
    return snaps, evs


def record_synthetic(path: str, snaps: Sequence[Snapshot], evs: Optional[Sequence[list]] = None,
                     fmt: str = "parquet", meta: Optional[dict] = None, **kw) -> str:
    """Write a synthetic run through the real Recorder."""
    from .recorder import Recorder

    m = {"host": "synthetic", "kernel": "0.0.0-synthetic", "start": snaps[0].wall_time - 1 if snaps else 0.0}
    m.update(meta or {})
    with Recorder(path, fmt=fmt, meta=m, events=evs is not None, fsync=False, **kw) as rec:
        prev = None
        for i, s in enumerate(snaps):
            rec.write(s.delta(prev), evs[i] if evs is not None else ())
            prev = s
    return path
