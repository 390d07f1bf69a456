"""Immutable snapshots: the one data model between the tracer and its consumers
(dashboard, recorder, exporter, reports). Pure Python, no bcc, no rich.

A snapshot holds *cumulative* figures since the tracer attached; ``Snapshot.delta(prev)`` gives
the figures of one interval. Every figure group carries its provenance ("exact", "syscall", "derived" or "none").

VMs that ended (their VMM exited or closed the VM): cost must not grow with every VM the host
ever ran, so a dead VM is carried only as long as its figures can still change. The tracer keeps
it in its cumulative snapshots until it has read its final figures (tracepoint mode: the reading
after the one that first saw it dead), then drops it. ``delta`` writes it in the interval in
which it is first seen dead (``alive`` False, its last figures) and leaves it out of every later
interval unless a figure of it still changed there (a late latency). Consumers that keep a dead
VM longer (the exporter, for ``--vm-grace``) keep their own copy (``departed``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

from .consts import LOG2_BUCKETS
from .text import display


def log2_bucket(v: int) -> int:
    """Bucket index of a value: 0 for 0, else bit length (2**(i-1) <= v < 2**i). Same rule as the C."""
    if v <= 0:
        return 0
    return min(int(v).bit_length(), LOG2_BUCKETS - 1)


@dataclass(frozen=True)
class Log2Hist:
    """log2 histogram: counts[0] = value 0; counts[i] = values in [2**(i-1), 2**i)."""

    counts: Tuple[int, ...] = (0,) * LOG2_BUCKETS

    @classmethod
    def from_values(cls, values) -> "Log2Hist":
        c = [0] * LOG2_BUCKETS
        for v in values:
            c[log2_bucket(v)] += 1
        return cls(tuple(c))

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> "Log2Hist":
        c = list(counts)[:LOG2_BUCKETS]
        c += [0] * (LOG2_BUCKETS - len(c))
        return cls(tuple(int(x) for x in c))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __add__(self, other: "Log2Hist") -> "Log2Hist":
        return Log2Hist(tuple(a + b for a, b in zip(self.counts, other.counts)))

    def __sub__(self, other: "Log2Hist") -> "Log2Hist":
        return Log2Hist(tuple(a - b for a, b in zip(self.counts, other.counts)))

    @staticmethod
    def bucket_bounds(i: int) -> Tuple[int, int]:
        """[lo, hi) of bucket i."""
        if i == 0:
            return (0, 1)
        return (1 << (i - 1), 1 << i)

    def quantile(self, q: float) -> Optional[float]:
        """Quantile estimated from the histogram by linear interpolation inside the bucket
        holding it (the stated interpolation rule of every histogram-derived percentile).
        None when empty."""
        n = self.total
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for i, c in enumerate(self.counts):
            if c == 0:
                continue
            if seen + c >= rank:
                lo, hi = self.bucket_bounds(i)
                frac = (rank - seen) / c
                return lo + (hi - lo) * max(0.0, min(1.0, frac))
            seen += c
        lo, hi = self.bucket_bounds(LOG2_BUCKETS - 1)
        return float(hi)

    def nonzero(self):
        """(lo, hi, count) for every non-empty bucket."""
        return [(*self.bucket_bounds(i), c) for i, c in enumerate(self.counts) if c]


EMPTY = Log2Hist()


@dataclass(frozen=True)
class VmInfo:
    """One VM as seen by the tracer. ``vm_id`` is the key used by every stats row:
    the ``struct kvm`` address as hex in exact modes, ``pid:<tgid>`` in tracepoint mode."""

    vm_id: str
    pid: int  # VMM process (tgid); 0 when unknown
    comm: str = ""
    name: str = ""  # guest name from the command line (QEMU -name), else ""
    vcpus: Optional[int] = None
    memslots: Optional[int] = None  # current memslot count (mirrored or read from the kernel)
    memslots_provenance: str = "none"
    partial: bool = False  # slots predate the trace (mirror incomplete)
    alive: bool = True
    # identity of one VM's lifetime (a struct kvm address or an fd number reused by a later VM
    # is another VM): the n-th VM this VMM process created while traced, 1-based; 0 = unknown
    # (the VM predates the trace). ``label`` is what every output shows a person.
    ordinal: int = 0
    memslots_max: Optional[int] = None  # largest memslot count seen while traced

    @property
    def label(self) -> str:
        """Human name telling VMs apart: guest name or comm, VMM pid and the per-process VM
        ordinal, e.g. ``web1[4242]#2``; ``#?`` when the VM predates the trace. The name is
        shown as data (text.display: control characters made visible, at most NAME_CAP cells);
        ``name`` and ``comm`` keep it whole."""
        base = display(self.name or self.comm or "?")
        n = f"#{self.ordinal}" if self.ordinal else "#?"
        return f"{base}[{self.pid}]{n}"


@dataclass(frozen=True)
class HvaStats:
    """Cumulative figures for one (VM, op)."""

    vm_id: str
    pid: int
    op: str  # consts.Op label
    count: int = 0  # hva operations observed (always exact: every event is counted in-kernel)
    # latency, ns
    lat_hist: Log2Hist = EMPTY
    lat_count: int = 0  # operations with a latency figure
    lat_sum_ns: int = 0
    lat_max_ns: int = 0
    lat_provenance: str = "none"
    # memslots visited (matched) per operation
    slots_hist: Log2Hist = EMPTY
    slots_count: int = 0  # operations with a slots figure (derived figures may cover fewer)
    slots_sum: int = 0
    slots_max: int = 0
    slots_provenance: str = "none"
    # memslots scanned (linear-scan kernels only; None elsewhere)
    scanned_sum: Optional[int] = None
    scanned_max: Optional[int] = None  # largest per-op scanned figure (cumulative max); None: not measured
    # hva range size, bytes
    range_hist: Log2Hist = EMPTY
    # operations whose slots figure could not be derived (VM older than the trace, table
    # update in flight): counted, never guessed. Always 0 for exact provenance.
    underived: int = 0

    @property
    def key(self):
        return (self.vm_id, self.op)


@dataclass(frozen=True)
class MemslotBucketStats:
    """Cumulative figures for one (VM, op, memslot-count bucket): hva operations grouped by the
    VM's memslot count *at the moment of the operation*, aggregated in the kernel. ``bucket`` is
    the log2 bucket of that count (``log2_bucket``; ``Log2Hist.bucket_bounds`` gives [lo, hi)),
    ``memslots_max`` the largest count seen in it (exact counts when the bucket holds one value)."""

    vm_id: str
    pid: int
    op: str
    bucket: int
    count: int = 0
    memslots_max: int = 0
    lat_count: int = 0
    lat_sum_ns: int = 0
    slots_count: int = 0
    slots_sum: int = 0
    scanned_sum: Optional[int] = None
    lat_provenance: str = "none"
    slots_provenance: str = "none"

    @property
    def key(self):
        return (self.vm_id, self.op, self.bucket)


@dataclass(frozen=True)
class SelfCost:
    """What kvmtrace itself costs, measured while tracing (cumulative).

    ``bpf_stats``: "enabled" when BPF run-time statistics are on (BPF_ENABLE_STATS, 5.8+, or
    kernel.bpf_stats_enabled), else why not ("unavailable: ..."); then the run figures are 0.
    "sampled: ..." when they are on for a part of the time only (the default: they cost two
    clock reads per program run); "off ..." when switched off by the user.
    ``bpf_run_ns`` / ``bpf_run_cnt``: summed over kvmtrace's own programs (bpf_prog_info), over
    the time the statistics were on.
    ``user_cpu_s``: kvmtrace's own process CPU time (user + system).
    ``stats_s``: seconds the statistics were on (0: not recorded, i.e. the whole elapsed time):
    the in-kernel share of a CPU is ``bpf_run_ns`` over it."""

    bpf_stats: str = "unavailable"
    bpf_run_ns: int = 0
    bpf_run_cnt: int = 0
    user_cpu_s: float = 0.0
    per_prog: Tuple[Tuple[str, int, int], ...] = ()  # (program name, run_ns, run_cnt)
    stats_s: float = 0.0

    @property
    def measured(self) -> bool:
        """The run figures are measured (statistics on the whole time, or sampled)."""
        return self.bpf_stats.startswith("enabled") or self.bpf_stats.startswith("sampled")

    @property
    def sampled(self) -> bool:
        return self.bpf_stats.startswith("sampled")

    def ns_per_run(self) -> Optional[float]:
        return self.bpf_run_ns / self.bpf_run_cnt if self.measured and self.bpf_run_cnt else None

    def on_seconds(self, elapsed_s: float) -> float:
        """Seconds the statistics were on over ``elapsed_s``: ``stats_s``, or all of
        ``elapsed_s`` for a source that did not record it (on the whole time); 0 for a sampled
        interval that held no window."""
        return self.stats_s if self.stats_s > 0 or self.sampled else elapsed_s

    def cpu_share(self, elapsed_s: float) -> Optional[float]:
        """In-kernel run time as a fraction of one CPU, over the time the statistics were on;
        None when not measured or no time (a sampled interval without a window)."""
        t = self.on_seconds(elapsed_s)
        return self.bpf_run_ns / 1e9 / t if self.measured and t > 0 else None


@dataclass(frozen=True)
class MemslotStats:
    """Cumulative figures for one (VM, change type) of memslot updates."""

    vm_id: str
    pid: int
    change: str  # consts.Change label, or "unknown" when it could not be derived
    count: int = 0
    errors: int = 0  # updates that returned an error
    lat_hist: Log2Hist = EMPTY
    lat_sum_ns: int = 0
    lat_max_ns: int = 0
    lat_provenance: str = "none"
    change_provenance: str = "none"

    @property
    def key(self):
        return (self.vm_id, self.change)


@dataclass(frozen=True)
class Snapshot:
    """Everything the tracer knows at one instant. Cumulative unless ``is_delta``."""

    seq: int
    wall_time: float  # time.time()
    mono_ns: int  # time.monotonic_ns()
    elapsed_s: float  # since attach (or the interval length for a delta)
    vms: Tuple[VmInfo, ...] = ()
    hva: Tuple[HvaStats, ...] = ()
    memslot: Tuple[MemslotStats, ...] = ()
    lost_events: int = 0  # raw events dropped (ring/perf buffer full)
    map_full: int = 0  # aggregation map insertions that failed
    # hva ops given to no VM: from tasks that are not a known VMM (kswapd, ...), plus ``ambiguous``
    unattributed: int = 0
    self_cpu_s: float = 0.0  # CPU time of kvmtrace itself (user+sys)
    is_delta: bool = False
    meta: Tuple[Tuple[str, str], ...] = ()  # host, kernel, mode ... as (key, value)
    by_memslots: Tuple[MemslotBucketStats, ...] = ()
    cost: SelfCost = SelfCost()
    ignored_ioctls: int = 0  # memslot ioctls on descriptors that are not KVM VMs (spoofs), dropped in-kernel
    # a consumer that fell behind: seconds the snapshot came later than its interval asked
    late_s: float = 0.0
    # the part of ``unattributed`` from known VMM processes whose VM cannot be told (tracepoint
    # mode: more notifiers fired than the process's known VMs, e.g. a VM fd passed in or a VM
    # beyond the per-process list; docs/tracer.md), never counted for any VM
    ambiguous: int = 0

    def vm(self, vm_id: str) -> Optional[VmInfo]:
        for v in self.vms:
            if v.vm_id == vm_id:
                return v
        return None

    def delta(self, prev: Optional["Snapshot"]) -> "Snapshot":
        """The figures of the interval (prev, self]. Max fields stay cumulative maxima
        (a max cannot be differenced); VM info is the current one. A VM already dead in
        ``prev`` (written in that interval, when it was first seen dead) is left out, its
        VmInfo and its rows, unless a figure of it changed in this interval: the work and
        the rows of an interval follow the live VMs and the VMs that died in it, never every
        VM that ever ran."""
        if prev is None:
            return replace(self, is_delta=True)
        hva = _minus(self.hva, prev.hva, _HVA_SUMS)
        mem = _minus(self.memslot, prev.memslot, _MEMSLOT_SUMS)
        buckets = _minus(self.by_memslots, prev.by_memslots, _BUCKET_SUMS)
        vms = self.vms
        dead_before = {v.vm_id for v in prev.vms if not v.alive}
        if dead_before:
            gone = {v.vm_id for v in self.vms if v.vm_id in dead_before and not v.alive}
            gone |= {r.vm_id for r in hva + mem + buckets if r.vm_id in dead_before} - {v.vm_id for v in self.vms}
            gone -= {r.vm_id for rows, fields in ((hva, _HVA_MOVED), (mem, _MEMSLOT_MOVED), (buckets, _BUCKET_MOVED))
                     for r in rows if r.vm_id in gone and any(getattr(r, f) for f in fields)}
            if gone:
                vms = tuple(v for v in vms if v.vm_id not in gone)
                hva, mem, buckets = (tuple(r for r in rows if r.vm_id not in gone) for rows in (hva, mem, buckets))
        c, pc = self.cost, prev.cost
        before = {name: (ns, cnt) for name, ns, cnt in pc.per_prog}
        cost = replace(
            c,
            bpf_run_ns=c.bpf_run_ns - pc.bpf_run_ns,
            bpf_run_cnt=c.bpf_run_cnt - pc.bpf_run_cnt,
            user_cpu_s=c.user_cpu_s - pc.user_cpu_s,
            stats_s=max(0.0, c.stats_s - pc.stats_s),
            per_prog=tuple((name, ns - before.get(name, (0, 0))[0], cnt - before.get(name, (0, 0))[1])
                           for name, ns, cnt in c.per_prog),
        )
        return replace(
            self,
            vms=vms,
            hva=hva,
            memslot=mem,
            by_memslots=buckets,
            cost=cost,
            ignored_ioctls=self.ignored_ioctls - prev.ignored_ioctls,
            elapsed_s=max(0.0, (self.mono_ns - prev.mono_ns) / 1e9),
            lost_events=self.lost_events - prev.lost_events,
            map_full=self.map_full - prev.map_full,
            unattributed=self.unattributed - prev.unattributed,
            ambiguous=self.ambiguous - prev.ambiguous,
            self_cpu_s=self.self_cpu_s - prev.self_cpu_s,
            is_delta=True,
        )

    def meta_dict(self) -> dict:
        return dict(self.meta)


def cost_summary(cum: "Snapshot") -> dict:
    """kvmtrace's own cost over a whole trace (a cumulative snapshot), for recording metadata
    and reports: BPF run time and runs (null when BPF statistics were unavailable), ns per
    program run, and in-kernel and user-space CPU as a fraction of one CPU."""
    c, t = cum.cost, cum.elapsed_s
    on = c.measured
    return {
        "bpf_stats": c.bpf_stats,
        "bpf_run_ns": c.bpf_run_ns if on else None,
        "bpf_run_cnt": c.bpf_run_cnt if on else None,
        "bpf_stats_s": c.on_seconds(t) if on else None,
        "bpf_ns_per_event": c.ns_per_run(),
        "bpf_cpu_share": c.cpu_share(t),
        "user_cpu_s": cum.self_cpu_s,
        "user_cpu_share": (cum.self_cpu_s / t) if t > 0 else None,
        "elapsed_s": t,
        "per_prog": {n: [ns, cnt] for n, ns, cnt in c.per_prog} if on else {},
    }


# The summed fields of each row type: what ``Snapshot.delta`` differences (maxima stay cumulative)
_HVA_SUMS = ("count", "lat_hist", "lat_count", "lat_sum_ns", "slots_hist", "slots_count", "slots_sum",
             "scanned_sum", "range_hist", "underived")
_MEMSLOT_SUMS = ("count", "errors", "lat_hist", "lat_sum_ns")
_BUCKET_SUMS = ("count", "lat_count", "lat_sum_ns", "slots_count", "slots_sum", "scanned_sum")
# The fields of an interval's row that say it holds something (an op, a latency, an update)
_HVA_MOVED = ("count", "lat_count", "slots_count", "underived")
_MEMSLOT_MOVED = ("count", "errors")
_BUCKET_MOVED = ("count", "lat_count")


def _minus(cur, prev, fields) -> tuple:
    """Each row of ``cur`` less the row of ``prev`` with the same key, in ``fields``; a row new in
    ``cur`` stays as it is. A field that is None (not measured) stays None."""
    before = {r.key: r for r in prev}
    out = []
    for r in cur:
        p = before.get(r.key)
        if p is None:
            out.append(r)
            continue
        diff = {}
        for f in fields:
            a, b = getattr(r, f), getattr(p, f)
            diff[f] = None if a is None else a - (0 if b is None else b)
        out.append(replace(r, **diff))
    return tuple(out)


@dataclass(frozen=True)
class VmFigures:
    """One VM's cumulative figures out of a snapshot: its VmInfo and its rows."""

    info: VmInfo
    hva: Tuple[HvaStats, ...] = ()
    memslot: Tuple[MemslotStats, ...] = ()
    by_memslots: Tuple[MemslotBucketStats, ...] = ()


def departed(prev: Optional[Snapshot], cur: Snapshot) -> Dict[str, VmFigures]:
    """The VMs ``prev`` holds and ``cur`` no longer does (the tracer dropped them once their
    final figures were read), with those figures from ``prev``, marked dead: what a consumer
    that shows a VM after its end (the exporter's ``--vm-grace``) keeps itself. Work in
    proportion to the two snapshots, never to the VMs that ever ran."""
    if prev is None:
        return {}
    now = {v.vm_id for v in cur.vms}
    now.update(r.vm_id for r in cur.hva)
    now.update(r.vm_id for r in cur.memslot)
    out: Dict[str, VmFigures] = {}
    for v in prev.vms:
        if v.vm_id not in now:
            out[v.vm_id] = VmFigures(replace(v, alive=False, vcpus=None) if v.alive else v)
    if not out:
        return out
    rows: Dict[str, dict] = {vm: {"hva": [], "memslot": [], "by_memslots": []} for vm in out}
    for name in ("hva", "memslot", "by_memslots"):
        for r in getattr(prev, name):
            if r.vm_id in rows:
                rows[r.vm_id][name].append(r)
    return {vm: replace(f, **{k: tuple(x) for k, x in rows[vm].items()}) for vm, f in out.items()}


def with_vms(snap: Snapshot, figures) -> Snapshot:
    """``snap`` with the VMs of ``figures`` (VmFigures) it does not hold added: a cumulative
    snapshot that still shows VMs the tracer has dropped."""
    have = {v.vm_id for v in snap.vms}
    extra = [f for f in figures if f.info.vm_id not in have]
    if not extra:
        return snap
    return replace(
        snap,
        vms=snap.vms + tuple(f.info for f in extra),
        hva=snap.hva + tuple(r for f in extra for r in f.hva),
        memslot=snap.memslot + tuple(r for f in extra for r in f.memslot),
        by_memslots=snap.by_memslots + tuple(r for f in extra for r in f.by_memslots),
    )


def mean(total: int, n: int) -> Optional[float]:
    return None if n <= 0 else total / n


__all__ = [
    "Log2Hist",
    "VmInfo",
    "HvaStats",
    "MemslotStats",
    "MemslotBucketStats",
    "SelfCost",
    "Snapshot",
    "VmFigures",
    "departed",
    "with_vms",
    "log2_bucket",
    "mean",
    "EMPTY",
]


@dataclass(frozen=True)
class HvaEvent:
    """One raw hva operation (only with raw events enabled). Fields a mode cannot observe are
    -1 (latency, slots) and the provenance says how the others were obtained."""

    ts_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns)
    vm_id: str
    pid: int
    tid: int
    op: str
    start: int
    end: int
    latency_ns: int
    slots: int  # memslots visited (matched); -1 when unknown
    scanned: int  # memslots scanned (linear-scan kernels); -1 when not applicable
    memslots: int  # the VM's memslot count at that moment; -1 when unknown
    lat_provenance: str
    slots_provenance: str


@dataclass(frozen=True)
class MemslotEvent:
    """One raw memslot update."""

    ts_ns: int
    vm_id: str
    pid: int
    tid: int
    change: str
    slot: int  # slot id (low 16 bits) as passed by userspace
    as_id: int  # address space (high 16 bits of the slot field)
    gpa: int
    size: int
    hva: int
    flags: int
    result: int  # 0 or -errno
    latency_ns: int
    lat_provenance: str
    change_provenance: str


HVA_EVENT_FIELDS = ("ts_ns", "vm_id", "pid", "tid", "op", "start", "end", "latency_ns", "slots", "scanned",
                    "memslots", "lat_provenance", "slots_provenance")


@dataclass(frozen=True)
class HvaEventBatch:
    """Raw hva operations as columns (one sequence per HvaEvent field, all of one length, e.g.
    numpy arrays): what the tracer hands over at high event rates without one Python object per
    event. ``events()`` builds HvaEvent objects for consumers that want them."""

    columns: Tuple[Tuple[str, object], ...]

    def column(self, name: str):
        return dict(self.columns)[name]

    def __len__(self) -> int:
        return len(self.column("ts_ns"))

    def events(self) -> list:
        cols = dict(self.columns)
        lists = [list(cols[f]) for f in HVA_EVENT_FIELDS]
        return [HvaEvent(*(v if isinstance(v, str) else int(v) for v in row)) for row in zip(*lists)]
