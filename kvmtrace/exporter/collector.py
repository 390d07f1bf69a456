"""Prometheus collector over the tracer's latest cumulative snapshot.

The tracer loop (its own clock, ``--interval``) hands every new snapshot to ``Exporter.update``,
which decides which VMs get series (bounded cardinality) and publishes one immutable view. A
scrape only turns that view into metric families: its work grows with the number of series,
never with the number of events traced (the kernel aggregated those already).

Every figure is described once, with its provenance, in docs/exporter.md.

Labels: every per-VM series carries the same two VM labels, ``vm_id`` (the stable id of one VM
lifetime, as in recordings) and ``vm`` (the name every kvmtrace output shows), and nothing else
about the VM; ``kvmtrace_vm_info`` carries the VMM pid, guest name and command, joined on
``vm_id``. No series carries a ``provenance`` label: how each figure is obtained is a property
of the host's probe plan, exported once per op by ``kvmtrace_attach_info``, so a counter and
its histogram have the same label set and divide without ``ignoring()``.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .. import __version__
from ..snapshot import Log2Hist, Snapshot, VmFigures, VmInfo, departed, with_vms
from ..text import display

# Histogram geometry. The kernel's log2 bucket i holds the integer values 2**(i-1) .. 2**i - 1
# (bucket 0: the value 0), so ``le = 2**i - 1`` is an exact upper bound of every value counted at
# or below bucket i: the Prometheus buckets are the in-kernel buckets, merged below the first
# bound and above the last one (those values are in +Inf only), never re-estimated.
LAT_BUCKETS = range(7, 36)  # le = 127 ns .. 2**35 - 1 ns (34.4 s), in seconds
SLOT_BUCKETS = range(0, 17)  # le = 0, 1, 3, 7 .. 65535 memslots (KVM allows at most 32764)

VM_LABELS = ("vm_id", "vm")  # on every per-VM series, in this order
VM_INFO_LABELS = ("pid", "guest", "comm")  # kvmtrace_vm_info only


class VmLabels(NamedTuple):
    """Label values of one exported VM, fixed when it is admitted."""

    vm_id: str
    vm: str
    pid: str
    guest: str
    comm: str

    @property
    def series(self) -> Tuple[str, str]:
        """The values of VM_LABELS."""
        return (self.vm_id, self.vm)

DEFAULT_PORT = 9132
DEFAULT_MAX_VMS = 64
DEFAULT_GRACE_S = 300.0


def _fmt(x: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(x)


def hist_buckets(h: Log2Hist, bounds: Iterable[int], per_unit: float) -> List[Tuple[str, int]]:
    """Cumulative Prometheus buckets of a log2 histogram: (le, count of values <= le), one per
    in-kernel bucket index in ``bounds`` (le = (2**i - 1) / per_unit, e.g. 1e9 ns per second),
    then +Inf = the total."""
    counts = h.counts
    out = []
    cum = 0
    nxt = 0
    for i in bounds:
        while nxt <= i:
            cum += counts[nxt]
            nxt += 1
        hi = 0 if i == 0 else (1 << i) - 1
        out.append((_fmt(hi / per_unit), cum))
    out.append(("+Inf", h.total))
    return out


@dataclass
class VmGate:
    """Which VMs get series: at most ``max_vms`` (the places), live VMs first.

    - A live VM takes a free place. When none is free, it takes the place of the exported VM
      that exited longest ago (that VM's series drop out early: ``expired_total``); only when
      every place holds a live VM is it refused.
    - A VM that exited keeps its place ``grace_s`` seconds after it was last seen alive (so its
      final figures are scraped), then its series drop out and the place frees. A VM first
      seen after it exited gets a place only if one is free once every live VM has one.
    - An expired VM does not come back. VMs left out now are counted: ``refused`` live ones,
      ``refused_exited`` ones that exited before they got a place; ``dropped_total`` counts
      distinct VMs ever left out.

    Label values are fixed when a VM is admitted, so a VM keeps one set of series for its whole
    life. The state is bounded by the VMs of the latest update plus the places: ids the tracer
    no longer reports are forgotten (a VM id names one VM lifetime and is never reused)."""

    max_vms: int = DEFAULT_MAX_VMS
    grace_s: float = DEFAULT_GRACE_S
    clock: Callable[[], float] = time.monotonic
    admitted: Dict[str, VmLabels] = field(default_factory=dict)  # vm_id -> label values
    last_alive: Dict[str, float] = field(default_factory=dict)
    expired: set = field(default_factory=set)
    refused: int = 0
    refused_exited: int = 0
    dropped_total: int = 0
    expired_total: int = 0
    _refused_ids: set = field(default_factory=set, init=False, repr=False)  # refused at the last update

    def _expire(self, vm_id: str) -> None:
        self.expired.add(vm_id)
        if self.admitted.pop(vm_id, None) is not None:
            self.expired_total += 1

    def update(self, vms: Sequence[VmInfo]) -> None:
        now = self.clock()
        seen = {v.vm_id for v in vms}
        self.expired &= seen  # an id no longer reported is never reported again
        present = {v.vm_id: v for v in vms if v.vm_id not in self.expired}
        for vm_id in [k for k in self.admitted if k not in present]:  # gone without a trace: place frees
            self.admitted.pop(vm_id)
            self.expired_total += 1
        last = {}
        for vm_id, v in present.items():
            t = self.last_alive.get(vm_id)
            last[vm_id] = now if (v.alive or t is None) else t
        self.last_alive = last
        for vm_id, v in present.items():
            if not v.alive and now - last[vm_id] > self.grace_s:
                self._expire(vm_id)
        refused = set()
        waiting = [v for k, v in present.items() if k not in self.expired and k not in self.admitted]
        for v in [v for v in waiting if v.alive] + [v for v in waiting if not v.alive]:
            if len(self.admitted) >= self.max_vms and v.alive:
                dead = [k for k in self.admitted if not present[k].alive]
                if dead:  # the exported VM that exited longest ago gives its place to a live one
                    self._expire(min(dead, key=lambda k: (last[k], k)))
            if len(self.admitted) < self.max_vms:
                # label values: prometheus_client escapes \\, " and newlines; the VMM-chosen names
                # are also shown as data and capped (text.display), like every output
                self.admitted[v.vm_id] = VmLabels(v.vm_id, v.label, str(v.pid), display(v.name), display(v.comm))
            else:
                refused.add(v.vm_id)
        self.last_alive = {k: t for k, t in last.items() if k not in self.expired}
        self.dropped_total += len(refused - self._refused_ids)
        self._refused_ids = refused
        self.refused = sum(1 for k in refused if present[k].alive)
        self.refused_exited = len(refused) - self.refused


@dataclass(frozen=True)
class View:
    """What one scrape reads: the latest snapshot and the label values of the admitted VMs."""

    snap: Snapshot
    labels: Dict[str, VmLabels]
    vms_exported: int
    vms_refused: int
    vms_dropped_total: int
    vms_expired_total: int
    published_mono: float
    vms_refused_exited: int = 0


class Exporter:
    """Collector for prometheus_client's registry. ``update`` runs in the tracer loop; ``collect``
    runs per scrape and reads only the published view (one attribute read, no lock)."""

    def __init__(self, gate: Optional[VmGate] = None, plan_ops: Sequence[Tuple[str, str, str, str, str]] = (),
                 memslots_limit: Optional[int] = None, memslots_limit_why: str = "",
                 build: Optional[Dict[str, str]] = None) -> None:
        self.gate = gate or VmGate()
        self.plan_ops = tuple(plan_ops)  # (op, attach, target, latency provenance, slots provenance)
        self.memslots_limit = memslots_limit
        self.memslots_limit_why = memslots_limit_why
        self.build = dict(build or {})
        self._view: Optional[View] = None
        self._kept: Dict[str, VmFigures] = {}  # exported VMs the tracer dropped: their final figures
        self._lock = threading.Lock()  # update() callers only; collect() never takes it

    def update(self, snap: Snapshot) -> None:
        """Publish ``snap``. The tracer drops a dead VM from its snapshots once its final
        figures are read; an exported VM keeps them here (``departed``) until its place
        frees (``VmGate``), so its series stay, unchanged, through its grace."""
        with self._lock:
            g = self.gate
            prev = self._view.snap if self._view is not None else None
            for vm_id, f in departed(prev, snap).items():
                if vm_id in g.admitted:
                    self._kept[vm_id] = f
            merged = with_vms(snap, self._kept.values())
            g.update(merged.vms)
            self._kept = {k: f for k, f in self._kept.items() if k in g.admitted}
            self._view = View(merged, dict(g.admitted), len(g.admitted), g.refused, g.dropped_total,
                              g.expired_total, time.monotonic(), g.refused_exited)

    @property
    def view(self) -> Optional[View]:
        return self._view

    # ------------------------------------------------------------------ scrape
    def collect(self) -> Iterator:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)

        build = InfoMetricFamily("kvmtrace_build", "kvmtrace build: versions of kvmtrace, bcc and Python, kernel release",
                                 labels=["version", "bcc", "python", "kernel"])
        build.add_metric([], {"version": __version__, "bcc": self.build.get("bcc", ""),
                              "python": platform.python_version(), "kernel": self.build.get("kernel", platform.release())})
        yield build
        attach = InfoMetricFamily("kvmtrace_attach", "how each operation is traced on this host (the probe plan)",
                                  labels=["op", "attach", "target", "latency", "slots"])
        for op, how, target, lat, slots in self.plan_ops:
            attach.add_metric([], {"op": op, "attach": how, "target": target, "latency": lat, "slots": slots})
        yield attach
        if self.memslots_limit is not None:
            g = GaugeMetricFamily("kvmtrace_kvm_memslots_limit",
                                  "memslots per address space this kernel allows a VM (KVM_CAP_NR_MEMSLOTS)")
            g.add_metric([], self.memslots_limit)
            yield g

        v = self._view
        up = GaugeMetricFamily("kvmtrace_tracer_up", "1 once the tracer has produced a snapshot, else 0")
        up.add_metric([], 0 if v is None else 1)
        yield up
        if v is None:
            return
        s = v.snap
        yield from self._self_metrics(v, s, CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily)
        yield from self._hva_metrics(v, s, CounterMetricFamily, HistogramMetricFamily)
        yield from self._memslot_metrics(v, s, CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily)

    def _self_metrics(self, v: View, s: Snapshot, Counter, Gauge, Info):
        def one(cls, name, doc, value):
            m = cls(name, doc)
            m.add_metric([], value)
            return m

        yield one(Gauge, "kvmtrace_snapshot_timestamp_seconds", "wall-clock time of the snapshot served", s.wall_time)
        yield one(Gauge, "kvmtrace_snapshot_age_seconds", "seconds since the tracer loop published that snapshot",
                  max(0.0, time.monotonic() - v.published_mono))
        yield one(Gauge, "kvmtrace_tracer_attached_seconds", "seconds since the tracer attached", s.elapsed_s)
        yield one(Counter, "kvmtrace_snapshots", "snapshots taken by the tracer loop", s.seq)
        yield one(Gauge, "kvmtrace_consumer_late_seconds",
                  "how much later than its interval the latest snapshot came (a consumer falling behind)", s.late_s)
        yield one(Counter, "kvmtrace_lost_events",
                  "raw events dropped (ring buffer full, consumer behind): derived figures miss them", s.lost_events)
        yield one(Counter, "kvmtrace_map_full", "in-kernel aggregation map insertions that failed (map full)", s.map_full)
        yield one(Counter, "kvmtrace_unattributed_operations",
                  "hva operations given to no VM: from tasks that are not a known VMM (kswapd, khugepaged, ...), "
                  "or ambiguous (a VMM's VM that cannot be told)", s.unattributed)
        yield one(Counter, "kvmtrace_ignored_ioctls",
                  "memslot ioctls on descriptors that are not KVM VMs, dropped in the kernel", s.ignored_ioctls)
        yield one(Counter, "kvmtrace_tracer_cpu_seconds",
                  "CPU time (user + system) of the kvmtrace process since the tracer attached (getrusage)", s.self_cpu_s)
        c = s.cost
        enabled = c.measured
        yield one(Gauge, "kvmtrace_bpf_stats_enabled",
                  "1 when the kernel's BPF run-time statistics measure kvmtrace's in-kernel cost (all the time, "
                  "or sampled: see kvmtrace_bpf_stats_seconds), else 0", 1 if enabled else 0)
        info = Info("kvmtrace_bpf_stats", "state of BPF run-time statistics: enabled, sampled: <windows>, "
                    "or why they are unavailable",
                    labels=["state"])
        info.add_metric([], {"state": c.bpf_stats})
        yield info
        if enabled:
            run_s = Counter("kvmtrace_bpf_run_seconds", "run time of kvmtrace's BPF programs (kernel BPF statistics)",
                            labels=["program"])
            runs = Counter("kvmtrace_bpf_runs", "runs of kvmtrace's BPF programs (kernel BPF statistics)",
                           labels=["program"])
            progs = c.per_prog or (("all", c.bpf_run_ns, c.bpf_run_cnt),)
            for name, ns, cnt in progs:
                run_s.add_metric([name], ns / 1e9)
                runs.add_metric([name], cnt)
            yield run_s
            yield runs
            yield one(Counter, "kvmtrace_bpf_stats_seconds",
                      "seconds BPF run-time statistics were on (sampled by default: the run figures count "
                      "runs in that time only; in-kernel share of a CPU = rate(run_seconds) / rate(this))",
                      c.on_seconds(s.elapsed_s))
        vms = Gauge("kvmtrace_exporter_vms", "VMs the exporter gives series (exported) or leaves out now because "
                    "--max-vms places are taken: live VMs (refused; every place holds a live VM), VMs that exited "
                    "before they got a place (refused_exited)", labels=["state"])
        vms.add_metric(["exported"], v.vms_exported)
        vms.add_metric(["refused"], v.vms_refused)
        vms.add_metric(["refused_exited"], v.vms_refused_exited)
        yield vms
        yield one(Counter, "kvmtrace_exporter_vms_dropped",
                  "distinct VMs ever left out because --max-vms series were taken", v.vms_dropped_total)
        yield one(Counter, "kvmtrace_exporter_vms_expired",
                  "exported VMs whose series dropped out after exiting (--vm-grace over, or the place taken "
                  "by a live VM)", v.vms_expired_total)

    def _hva_metrics(self, v: View, s: Snapshot, Counter, Histogram):
        # every family of one (VM, op) has the same label set, so any two divide as they are;
        # all of them come from the one HvaStats row of the one snapshot this scrape serves
        names = list(VM_LABELS) + ["op"]
        ops = Counter("kvmtrace_hva_operations", "hva operations (MMU-notifier callbacks) per VM and op", labels=names)
        lat = Histogram("kvmtrace_hva_latency_seconds", "latency of hva operations (log2 buckets from the kernel); "
                        "_count: operations with a latency figure", labels=names)
        slots = Histogram("kvmtrace_hva_memslots_visited", "memslots visited (matched) per hva operation", labels=names)
        scanned = Counter("kvmtrace_hva_memslots_scanned", "memslots scanned by hva operations (linear-scan kernels)",
                          labels=names)
        underived = Counter("kvmtrace_hva_underived_operations",
                            "hva operations whose memslots-visited figure could not be derived (counted, not guessed)",
                            labels=names)
        for h in s.hva:
            lv = v.labels.get(h.vm_id)
            if lv is None:
                continue
            key = [*lv.series, h.op]
            ops.add_metric(key, h.count)
            if h.lat_provenance != "none" and h.lat_hist.total:
                lat.add_metric(key, hist_buckets(h.lat_hist, LAT_BUCKETS, 1e9), h.lat_sum_ns / 1e9)
            if h.slots_provenance != "none" and h.slots_hist.total:
                slots.add_metric(key, hist_buckets(h.slots_hist, SLOT_BUCKETS, 1), h.slots_sum)
            if h.scanned_sum is not None:
                scanned.add_metric(key, h.scanned_sum)
            if h.slots_provenance != "exact":
                underived.add_metric(key, h.underived)
        yield from (ops, lat, slots, scanned, underived)

    def _memslot_metrics(self, v: View, s: Snapshot, Counter, Histogram, Gauge):
        names = list(VM_LABELS) + ["change"]
        upd = Counter("kvmtrace_memslot_updates", "memslot updates per VM and change type", labels=names)
        err = Counter("kvmtrace_memslot_update_errors", "memslot updates that returned an error", labels=names)
        lat = Histogram("kvmtrace_memslot_update_latency_seconds", "latency of memslot updates (log2 buckets)",
                        labels=names)
        for m in s.memslot:
            lv = v.labels.get(m.vm_id)
            if lv is None:
                continue
            key = [*lv.series, m.change]
            upd.add_metric(key, m.count)
            err.add_metric(key, m.errors)
            if m.lat_provenance != "none" and m.lat_hist.total:
                lat.add_metric(key, hist_buckets(m.lat_hist, LAT_BUCKETS, 1e9), m.lat_sum_ns / 1e9)
        yield from (upd, err, lat)
        labels = list(VM_LABELS)
        info = Gauge("kvmtrace_vm_info", "1 per exported VM: its VMM process id, guest name (QEMU -name, else empty) "
                     "and VMM command; join on vm_id", labels=labels + list(VM_INFO_LABELS))
        count = Gauge("kvmtrace_vm_memslots", "memslots the VM has now (from the mirrored memslot table)", labels=labels)
        most = Gauge("kvmtrace_vm_memslots_max", "largest memslot count of the VM seen while traced", labels=labels)
        complete = Gauge("kvmtrace_vm_memslots_complete",
                         "1 when the VM's memslot table is fully known (created while traced), 0 when it predates "
                         "the trace (then no memslot count is exported)", labels=labels)
        alive = Gauge("kvmtrace_vm_alive", "1 while the VMM process of the VM runs, 0 after it exited", labels=labels)
        for vm in s.vms:
            lv = v.labels.get(vm.vm_id)
            if lv is None:
                continue
            info.add_metric(list(lv), 1)
            alive.add_metric(list(lv.series), 1 if vm.alive else 0)
            complete.add_metric(list(lv.series), 0 if vm.partial else 1)
            if not vm.partial and vm.memslots is not None and vm.memslots_provenance != "none":
                count.add_metric(list(lv.series), vm.memslots)
                if vm.memslots_max is not None:
                    most.add_metric(list(lv.series), vm.memslots_max)
        yield from (info, count, most, complete, alive)


def plan_rows(plan) -> List[Tuple[str, str, str, str, str]]:
    """(op, attach, target, latency provenance, slots provenance) of every op of a probe plan."""
    if plan is None:
        return []
    return [(p.op, str(p.attach), p.target, str(p.latency), str(p.slots)) for p in plan.ops]


def render(exporter: Exporter, openmetrics: bool = False) -> bytes:
    """The exposition a scrape returns (text format, or OpenMetrics)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(exporter)
    if openmetrics:
        from prometheus_client.openmetrics.exposition import generate_latest as om

        return om(reg)
    return generate_latest(reg)
