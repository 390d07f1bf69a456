"""What the live view shows, computed from snapshots: per-VM rows, the totals row, the VM of the
detail panel. Pure Python (no rich, no bcc); every output (live view, --once table, --log line,
--csv rows, final summary) is built from these rows, so they agree with each other.

Rates use the interval snapshot (``cum.delta(prev)``); latency percentiles are estimated from
the interval's log2 histogram (``Log2Hist.quantile``: linear interpolation inside the bucket);
slots visited ``max`` is a maximum since the tracer attached (a maximum cannot be differenced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..consts import Change, Op
from ..snapshot import EMPTY, HvaStats, Log2Hist, MemslotStats, Snapshot, VmInfo
from ..text import printable

SORT_KEYS = ("ops", "latency", "slots", "pid")
ALL_OPS = tuple(o.label for o in Op)
ALL_CHANGES = tuple(c.label for c in Change)
OTHER_CHANGE = "other"  # change type not observed/derived ("unknown", "unobserved", ...)
MIXED = "mixed"
NONE = "none"


@dataclass(frozen=True)
class ViewOptions:
    """Display options. ``ops`` empty means every op the plan traces."""

    sort: str = "ops"
    pids: Tuple[int, ...] = ()
    vms: Tuple[str, ...] = ()  # vm_id, or a case-insensitive substring of the name or comm
    ops: Tuple[str, ...] = ()
    selected: Optional[str] = None  # vm_id of the detail panel (else the busiest VM)
    interval: Optional[float] = None
    paused: bool = False
    keys: bool = False  # keys are read (show the key hint)
    reverse: bool = False  # the sort order reversed (key o)
    help: bool = False  # the help overlay is shown instead of the table (keys ? h)
    prompt: Optional[str] = None  # the prompt line being typed (keys p g f s)
    message: str = ""  # a line for the user: why typed input was refused

    def next_sort(self) -> "ViewOptions":
        i = SORT_KEYS.index(self.sort) if self.sort in SORT_KEYS else -1
        return _replace(self, sort=SORT_KEYS[(i + 1) % len(SORT_KEYS)])

    def sort_text(self) -> str:
        return self.sort + (" reversed" if self.reverse else "")

    @property
    def filtered(self) -> bool:
        return bool(self.pids or self.vms)

    def filter_text(self) -> str:
        parts = []
        if self.pids:
            parts.append("pid=" + ",".join(str(p) for p in self.pids))
        if self.vms:
            parts.append("vm=" + ",".join(printable(v) for v in self.vms))
        if self.ops:
            parts.append("op=" + ",".join(self.ops))
        return " ".join(parts)


def _replace(obj, **kw):
    from dataclasses import replace

    return replace(obj, **kw)


@dataclass(frozen=True)
class VmRow:
    """One VM over one interval (or, for the summary, since attach)."""

    vm_id: str
    pid: int
    name: str
    memslots: Optional[int]
    memslots_partial: bool
    vcpus: Optional[int]
    alive: bool
    counts: Dict[str, int]  # op -> hva operations in the interval
    rates: Dict[str, Optional[float]]  # op -> ops/s (None when the interval length is 0)
    lat_hist: Log2Hist  # interval latency histogram over the shown ops with a latency figure
    lat_provenance: str  # exact/syscall/derived, "mixed" or "none"
    slots_hist: Log2Hist
    slots_count: int
    slots_sum: int
    slots_max: Optional[int]  # since attach
    slots_provenance: str
    scanned_sum: Optional[int]  # linear-scan kernels only
    upd_counts: Dict[str, int]  # change -> memslot updates in the interval
    upd_rates: Dict[str, Optional[float]]
    upd_errors: int
    elapsed_s: float

    @property
    def total_ops(self) -> int:
        return sum(self.counts.values())

    @property
    def total_rate(self) -> Optional[float]:
        return None if self.elapsed_s <= 0 else self.total_ops / self.elapsed_s

    @property
    def p50(self) -> Optional[float]:
        return self.lat_hist.quantile(0.5)

    @property
    def p99(self) -> Optional[float]:
        return self.lat_hist.quantile(0.99)

    @property
    def slots_mean(self) -> Optional[float]:
        return None if self.slots_count <= 0 else self.slots_sum / self.slots_count

    @property
    def scanned_mean(self) -> Optional[float]:
        if self.scanned_sum is None or self.slots_count <= 0:
            return None
        return self.scanned_sum / self.slots_count

    @property
    def total_updates(self) -> int:
        return sum(self.upd_counts.values())


@dataclass(frozen=True)
class View:
    """Everything one screen shows, before any formatting."""

    rows: Tuple[VmRow, ...]  # visible rows, sorted
    total: VmRow
    ops: Tuple[str, ...]  # op columns
    changes: Tuple[str, ...]  # change-type columns
    vms_running: int  # VMs alive in the snapshot, before filtering
    vms_hidden: int  # VMs (alive or active) hidden by the filters
    show_scanned: bool
    panel_vm: Optional[str]  # vm_id of the detail panel
    elapsed_s: float  # interval length
    lat_provenance: str  # over all visible rows
    slots_provenance: str


def merge_provenance(values: Iterable[str]) -> str:
    s = {v for v in values if v and v != NONE}
    if not s:
        return NONE
    if len(s) == 1:
        return next(iter(s))
    return MIXED


def shown_ops(plan, snaps: Sequence[Snapshot], opts: ViewOptions) -> Tuple[str, ...]:
    """Op columns: the ops asked for, else every hva op the plan can trace plus any op seen in
    the data, in consts.Op order."""
    if opts.ops:
        wanted = set(opts.ops)
    else:
        wanted = set()
        if plan is not None:
            wanted |= {p.op for p in plan.ops if p.kind == "hva" and p.available}
        for s in snaps:
            if s is not None:
                wanted |= {h.op for h in s.hva}
        if not wanted:
            wanted = {Op.UNMAP.label, Op.AGE.label, Op.TEST_AGE.label}
    known = [o for o in ALL_OPS if o in wanted]
    return tuple(known + sorted(wanted - set(ALL_OPS)))


def change_column(change: str) -> str:
    """Column of a memslot change type: one of consts.Change, else "other"."""
    return change if change in ALL_CHANGES else OTHER_CHANGE


def shown_changes(snaps: Sequence[Snapshot]) -> Tuple[str, ...]:
    """consts.Change columns, plus "other" when some update's change type is not known."""
    for s in snaps:
        if s is not None and any(m.change not in ALL_CHANGES and m.count for m in s.memslot):
            return ALL_CHANGES + (OTHER_CHANGE,)
    return ALL_CHANGES


def vm_name(info: Optional[VmInfo]) -> str:
    if info is None:
        return "?"
    return info.name or info.comm or "?"


def _vm_matches(info: VmInfo, pid: int, opts: ViewOptions) -> bool:
    if opts.pids and pid not in opts.pids:
        return False
    if opts.vms:
        ok = False
        for term in opts.vms:
            t = term.lower()
            if term == info.vm_id or (t and (t in info.name.lower() or t in info.comm.lower())):
                ok = True
                break
        if not ok:
            return False
    return True


def _row(
    info: VmInfo,
    hva: List[HvaStats],
    hva_cum: List[HvaStats],
    mem: List[MemslotStats],
    ops: Sequence[str],
    changes: Sequence[str],
    elapsed: float,
) -> VmRow:
    counts = {o: 0 for o in ops}
    lat = EMPTY
    slots = EMPTY
    slots_count = slots_sum = 0
    scanned: Optional[int] = None
    lat_prov = []
    slots_prov = []
    for h in hva:
        if h.op not in counts:
            continue
        counts[h.op] += h.count
        if h.lat_provenance != NONE:
            lat = lat + h.lat_hist
        lat_prov.append(h.lat_provenance)
        slots = slots + h.slots_hist
        slots_count += h.slots_count
        slots_sum += h.slots_sum
        slots_prov.append(h.slots_provenance)
        if h.scanned_sum is not None:
            scanned = (scanned or 0) + h.scanned_sum
    smax = [h.slots_max for h in hva_cum if h.op in counts and h.slots_count > 0]
    upd = {c: 0 for c in changes}
    errors = 0
    for m in mem:
        col = change_column(m.change)
        upd[col] = upd.get(col, 0) + m.count
        errors += m.errors

    def rate(n):
        return None if elapsed <= 0 else n / elapsed

    return VmRow(
        vm_id=info.vm_id,
        pid=info.pid,
        name=vm_name(info),
        memslots=info.memslots,
        memslots_partial=info.partial,
        vcpus=info.vcpus,
        alive=info.alive,
        counts=counts,
        rates={o: rate(n) for o, n in counts.items()},
        lat_hist=lat,
        lat_provenance=merge_provenance(lat_prov),
        slots_hist=slots,
        slots_count=slots_count,
        slots_sum=slots_sum,
        slots_max=max(smax) if smax else None,
        slots_provenance=merge_provenance(slots_prov),
        scanned_sum=scanned,
        upd_counts=upd,
        upd_rates={c: rate(n) for c, n in upd.items()},
        upd_errors=errors,
        elapsed_s=elapsed,
    )


def _sort_key(sort: str):
    def neg(v):
        return -(v if v is not None else -1.0)

    if sort == "latency":
        return lambda r: (neg(r.p99), neg(r.p50), neg(r.total_rate), r.pid, r.vm_id)
    if sort == "slots":
        return lambda r: (neg(r.slots_mean), neg(r.slots_max), neg(r.total_rate), r.pid, r.vm_id)
    if sort == "pid":
        return lambda r: (r.pid, r.vm_id)
    return lambda r: (neg(r.total_rate), -r.total_updates, r.pid, r.vm_id)


def _sum_rows(rows: Sequence[VmRow], ops, changes, elapsed: float) -> VmRow:
    def add_opt(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None

    counts = {o: sum(r.counts.get(o, 0) for r in rows) for o in ops}
    upd = {c: sum(r.upd_counts.get(c, 0) for r in rows) for c in changes}
    lat = EMPTY
    slots = EMPTY
    for r in rows:
        lat = lat + r.lat_hist
        slots = slots + r.slots_hist
    maxes = [r.slots_max for r in rows if r.slots_max is not None]

    def rate(n):
        return None if elapsed <= 0 else n / elapsed

    return VmRow(
        vm_id="",
        pid=0,
        name=f"total ({len(rows)} VM{'' if len(rows) == 1 else 's'})",
        memslots=add_opt(r.memslots for r in rows),
        memslots_partial=any(r.memslots_partial for r in rows),
        vcpus=add_opt(r.vcpus for r in rows),
        alive=True,
        counts=counts,
        rates={o: rate(n) for o, n in counts.items()},
        lat_hist=lat,
        lat_provenance=merge_provenance(r.lat_provenance for r in rows),
        slots_hist=slots,
        slots_count=sum(r.slots_count for r in rows),
        slots_sum=sum(r.slots_sum for r in rows),
        slots_max=max(maxes) if maxes else None,
        slots_provenance=merge_provenance(r.slots_provenance for r in rows),
        scanned_sum=add_opt(r.scanned_sum for r in rows),
        upd_counts=upd,
        upd_rates={c: rate(n) for c, n in upd.items()},
        upd_errors=sum(r.upd_errors for r in rows),
        elapsed_s=elapsed,
    )


def build_view(
    cum: Snapshot,
    delta: Optional[Snapshot],
    plan=None,
    opts: ViewOptions = ViewOptions(),
    summary: bool = False,
) -> View:
    """Rows of one screen. ``delta`` is the interval (``cum.delta(prev)``); with ``summary``
    (or no delta) the whole run since attach is used and exited VMs are kept."""
    if delta is None or summary:
        delta = cum.delta(None)
        summary = True
    ops = shown_ops(plan, (cum, delta), opts)
    changes = shown_changes((cum, delta))
    elapsed = delta.elapsed_s

    infos: Dict[str, VmInfo] = {v.vm_id: v for v in cum.vms}
    for v in delta.vms:
        infos.setdefault(v.vm_id, v)
    hva_by: Dict[str, List[HvaStats]] = {}
    for h in delta.hva:
        hva_by.setdefault(h.vm_id, []).append(h)
    cum_by: Dict[str, List[HvaStats]] = {}
    for h in cum.hva:
        cum_by.setdefault(h.vm_id, []).append(h)
    mem_by: Dict[str, List[MemslotStats]] = {}
    for m in delta.memslot:
        mem_by.setdefault(m.vm_id, []).append(m)
    # stats of a VM the snapshot has no VmInfo for: make a minimal one
    for vm_id, stats in list(hva_by.items()) + list(mem_by.items()):
        if vm_id not in infos:
            infos[vm_id] = VmInfo(vm_id=vm_id, pid=stats[0].pid)

    rows = []
    running = hidden = 0
    for vm_id, info in infos.items():
        hva = hva_by.get(vm_id, [])
        mem = mem_by.get(vm_id, [])
        active = any(h.count for h in hva) or any(m.count for m in mem)
        if not info.alive and not active and not summary:
            continue  # exited before this interval
        if info.alive:
            running += 1
        if not _vm_matches(info, info.pid, opts):
            hidden += 1
            continue
        rows.append(_row(info, hva, cum_by.get(vm_id, []), mem, ops, changes, elapsed))
    rows.sort(key=_sort_key(opts.sort), reverse=opts.reverse)
    total = _sum_rows(rows, ops, changes, elapsed)

    panel = None
    if rows:
        ids = [r.vm_id for r in rows]
        if opts.selected in ids:
            panel = opts.selected
        else:
            busiest = max(rows, key=lambda r: (r.total_ops, r.total_updates, -r.pid))
            panel = busiest.vm_id
    show_scanned = plan is not None and bool(getattr(plan, "linear_scan", False))
    show_scanned = show_scanned or any(r.scanned_sum is not None for r in rows)
    return View(
        rows=tuple(rows),
        total=total,
        ops=ops,
        changes=changes,
        vms_running=running,
        vms_hidden=hidden,
        show_scanned=show_scanned,
        panel_vm=panel,
        elapsed_s=elapsed,
        lat_provenance=total.lat_provenance,
        slots_provenance=total.slots_provenance,
    )


def panel_hists(cum: Snapshot, vm_id: str, ops: Sequence[str]):
    """Latency and slots-visited histograms of one VM since attach, over ``ops``, with their
    provenance: (lat_hist, lat_prov, slots_hist, slots_prov, ops_count)."""
    lat = EMPTY
    slots = EMPTY
    lp, sp = [], []
    n = 0
    for h in cum.hva:
        if h.vm_id != vm_id or h.op not in ops:
            continue
        n += h.count
        if h.lat_provenance != NONE:
            lat = lat + h.lat_hist
        lp.append(h.lat_provenance)
        slots = slots + h.slots_hist
        sp.append(h.slots_provenance)
    return lat, merge_provenance(lp), slots, merge_provenance(sp), n


def cycle_selected(view: View, current: Optional[str]) -> Optional[str]:
    """The next VM for the detail panel (key ``v``)."""
    ids = [r.vm_id for r in view.rows]
    if not ids:
        return None
    cur = current if current in ids else view.panel_vm
    i = ids.index(cur) if cur in ids else -1
    return ids[(i + 1) % len(ids)]


__all__ = [
    "SORT_KEYS",
    "ViewOptions",
    "VmRow",
    "View",
    "build_view",
    "panel_hists",
    "cycle_selected",
    "merge_provenance",
]
