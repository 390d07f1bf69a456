"""The live view as a pure function: (cumulative snapshot, interval snapshot, meta, plan, options,
width) -> rich renderable. No I/O, no clock, no BPF: tested with synthetic snapshots."""

from __future__ import annotations

import io
from typing import List, Mapping, Optional, Tuple

from rich.console import Console, Group, RenderableType
from rich.constrain import Constrain
from rich.table import Table
from rich.text import Text

from ..snapshot import Log2Hist, Snapshot
from ..text import display, printable
from ..fmt import fmt_count, fmt_duration, fmt_int, fmt_mean, fmt_ns, fmt_rate
from .keys import KEYS_HINT, help_lines
from .model import MIXED, View, ViewOptions, VmRow, build_view, panel_hists

CHANGE_HEADERS = {"create": "create", "delete": "delete", "move": "move", "flags_only": "flags"}
BAR_WIDTH = 16
MAX_HIST_ROWS = 12


# ---------------------------------------------------------------------------- header


def attach_summary(plan) -> str:
    """'unmap,age tracepoint (lat syscall, slots derived) · memslot ...', ops grouped when
    they share attach mode and provenance."""
    if plan is None:
        return "attach: unknown (no probe plan)"
    groups = {}
    order = []
    untraced = []
    for p in plan.ops:
        if not p.available:
            untraced.append(p.op)
            continue
        second = "change" if p.kind == "memslot" else "slots"
        key = (p.attach, p.latency, second, p.slots)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append("memslot" if p.kind == "memslot" else p.op)
    parts = [f"{','.join(groups[k])} {k[0]} (lat {k[1]}, {k[2]} {k[3]})" for k in order]
    if untraced:
        parts.append("not traced: " + ",".join(untraced))
    return "attach: " + (" · ".join(parts) if parts else "nothing attached")


def cpu_percent(delta: Snapshot) -> Optional[float]:
    if delta.elapsed_s <= 0:
        return None
    return 100.0 * delta.self_cpu_s / delta.elapsed_s


def cost_cells(delta: Snapshot) -> Tuple[str, str]:
    """kvmtrace's in-kernel cost over the interval as text: mean ns per program run (one run per
    traced event) and percent of one CPU, "-" for a figure not measured (no sampling window in
    the interval, statistics off or unavailable, replays)."""
    c = delta.cost
    if not c.measured:
        return "-", "-"
    ns, share = c.ns_per_run(), c.cpu_share(delta.elapsed_s)
    return (f"{ns:.0f}" if ns is not None else "-"), (f"{100.0 * share:.2f}" if share is not None else "-")


def cost_text(delta: Snapshot) -> str:
    """The header's cost phrase (cost_cells); "" when the source measured no cost (replays,
    fakes)."""
    c = delta.cost
    if c.bpf_stats == "unavailable":
        return ""
    if not c.measured:
        return f"in-kernel cost {c.bpf_stats}"
    ns, pct = cost_cells(delta)
    pct = f"{pct}% CPU" if pct != "-" else "- CPU"
    return f"in kernel {ns} ns/event, {pct}" + (" (sampled)" if c.sampled else "")


def late_text(delta: Snapshot) -> str:
    """Said when the snapshot came late (kvmtrace fell behind): rates still use the real
    interval length."""
    return f"LATE by {delta.late_s:.1f}s (kvmtrace fell behind)" if delta.late_s > 0 else ""


def header_lines(cum: Snapshot, delta: Snapshot, meta: Mapping, plan, opts: ViewOptions, view: View,
                 base: Optional[Snapshot] = None) -> List[Text]:
    """The four header lines. ``base``: the snapshot of the last reset (key r); totals then
    count from it."""
    host = display(meta.get("host") or "?")
    kernel = display(meta.get("kernel") or "?")
    interval = opts.interval if opts.interval is not None else delta.elapsed_s
    since = cum if base is None else cum.delta(base)
    l1 = Text()
    l1.append("kvmtrace top", style="bold")
    l1.append(f" · host {host} · kernel {kernel} · interval {interval:.1f}s · up {fmt_duration(cum.elapsed_s)}")
    if base is not None:
        l1.append(f" · reset {fmt_duration(since.elapsed_s)} ago")
    if opts.paused:
        l1.append(" · ")
        l1.append("PAUSED", style="reverse")
    l2 = Text(attach_summary(plan))

    l3 = Text()
    total_word = "total" if base is None else "since reset"

    def warn(label: str, value: int, total: int):
        l3.append(f"{label} ")
        l3.append(str(value), style="bold red" if value else "")
        if total != value:
            l3.append(f" ({total_word} {total})")

    warn("lost events", delta.lost_events, since.lost_events)
    l3.append(" · ")
    warn("map full", delta.map_full, since.map_full)
    un_rate = fmt_rate(delta.unattributed / delta.elapsed_s) if delta.elapsed_s > 0 else "-"
    l3.append(f" · unattributed ops {delta.unattributed} ({un_rate}/s)")
    cpu = cpu_percent(delta)
    l3.append(f" · kvmtrace CPU {'-' if cpu is None else f'{cpu:.1f}%'}")
    if cost_text(delta):
        l3.append(f" · {cost_text(delta)}")
    if late_text(delta):
        l3.append(" · ")
        l3.append(late_text(delta), style="bold red")

    l4 = Text(f"VMs {view.vms_running} running")
    if opts.filtered or opts.ops:
        l4.append(f" · filter {opts.filter_text()} ({view.vms_hidden} hidden)")
    l4.append(f" · sort {opts.sort_text()}")
    if opts.keys:
        l4.append(f" · {KEYS_HINT}", style="dim")
    return [l1, l2, l3, l4]


def prompt_lines(opts: ViewOptions) -> List[Text]:
    """The line under the header: the prompt being typed and why typed input was refused, or
    an empty line. Typed text is shown as data (text.printable), never as markup."""
    out = []
    if opts.prompt is not None:
        line = Text(printable(opts.prompt), style="bold")
        line.append("_", style="blink")
        out.append(line)
    if opts.message:
        out.append(Text(printable(opts.message), style="bold red"))
    return out or [Text("")]


def help_overlay() -> RenderableType:
    """The key table (keys.KEYS), shown instead of the VM table on ``?`` or ``h``."""
    lines = [Text("keys (kvm_stat's where they fit)", style="bold")]
    lines += [Text("  " + line) for line in help_lines()]
    return Group(*lines)


# ---------------------------------------------------------------------------- VM table


def _memslots(r: VmRow) -> str:
    if r.memslots is None:
        return "-"
    return f"~{r.memslots}" if r.memslots_partial else str(r.memslots)


def _name(r: VmRow, width: int = 16) -> str:
    suffix = " (exited)" if not r.alive else ""
    room = max(1, width - len(suffix))
    return display(r.name, room) + suffix  # the VMM chose it: escapes made visible, cut to the room


VM_MIN, VM_MAX = 6, 16
# columns dropped first when the terminal is too narrow (PID, VM, the first op, p99 and slots
# mean always stay)
DROP_ORDER = ("vcpu", "upd:flags_only", "upd:move", "upd:other", "smax", "scan", "memslots", "upd:delete",
              "upd:create", "p50", "op:3", "op:2", "op:1")


def _columns(view: View):
    """(key, header, justify, cells of each row + the totals row) of the VM table."""
    rows = list(view.rows)
    with_total = len(rows) > 1
    allr = rows + ([view.total] if with_total else [])

    def col(key, header, fn, justify="right"):
        cells = [fn(r) for r in allr]
        if with_total and key == "pid":
            cells[-1] = ""
        if with_total and key == "vm":
            cells[-1] = view.total.name
        return (key, header, justify, cells)

    cols = [
        col("pid", "PID", lambda r: str(r.pid)),
        col("vm", "VM", lambda r: _name(r, VM_MAX), "left"),
        col("memslots", "mem\nslots", _memslots),
        col("vcpu", "vCPU", lambda r: fmt_int(r.vcpus)),
    ]
    for i, op in enumerate(view.ops):
        cols.append(col(f"op:{i}", ("ops/s\n" if i == 0 else "\n") + op, lambda r, op=op: fmt_rate(r.rates.get(op))))
    cols += [
        col("p50", "lat\np50", lambda r: fmt_ns(r.p50)),
        col("p99", "\np99", lambda r: fmt_ns(r.p99)),
        col("smean", "slots\nmean", lambda r: fmt_mean(r.slots_mean)),
        col("smax", "\nmax", lambda r: fmt_int(r.slots_max)),
    ]
    if view.show_scanned:
        cols.append(col("scan", "scan\nmean", lambda r: fmt_mean(r.scanned_mean)))
    for i, ch in enumerate(view.changes):
        label = CHANGE_HEADERS.get(ch, ch)
        cols.append(col(f"upd:{ch}", ("upd/s\n" if i == 0 else "\n") + label,
                        lambda r, ch=ch: fmt_rate(r.upd_rates.get(ch))))
    return cols


def _fit(text: str, w: int) -> str:
    """Cut ``text`` to ``w`` characters, keeping an " (exited)" mark visible."""
    if len(text) <= w:
        return text
    suffix = " (exited)" if text.endswith(" (exited)") and w > 12 else ""
    return text[: w - len(suffix) - 1] + "…" + suffix


def _natural(col) -> int:
    key, header, _, cells = col
    w = max([len(x) for x in header.split("\n")] + [len(c) for c in cells])
    return min(max(w, VM_MIN), VM_MAX) if key == "vm" else w


def vm_table(view: View, width: int = 1000) -> Table:
    """The VM table; columns of DROP_ORDER are left out while it does not fit ``width``."""
    cols = _columns(view)

    def need(cs):
        return sum(VM_MIN if c[0] == "vm" else _natural(c) for c in cs) + len(cs) - 1

    hidden = 0
    for key in DROP_ORDER:
        if need(cols) <= width:
            break
        kept = [c for c in cols if c[0] != key]
        # keep the group label ("ops/s", "upd/s") on the first remaining column of its group
        if len(kept) != len(cols):
            hidden += 1
            dropped = next(c for c in cols if c[0] == key)
            if not dropped[1].startswith("\n"):
                group = dropped[0].split(":")[0]
                for j, c in enumerate(kept):
                    if c[0].split(":")[0] == group and c[0] != "op:0" or (group == "p50" and c[0] == "p99"):
                        if c[1].startswith("\n"):
                            label = dropped[1].split("\n")[0]
                            kept[j] = (c[0], label + c[1], c[2], c[3])
                        break
            cols = kept
    # the VM column takes what is left (rich does not shrink no_wrap columns itself)
    others = need([c for c in cols if c[0] != "vm"]) + 1
    vm_w = max(VM_MIN, min(VM_MAX, width - others, max(_natural(c) for c in cols if c[0] == "vm")))
    cols = [(k, h, j, [_fit(x, vm_w) for x in cells]) if k == "vm" else (k, h, j, cells) for k, h, j, cells in cols]
    t = Table(
        box=None,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
        header_style="bold",
    )
    for c in cols:
        key, header, justify, _ = c
        if key == "vm":
            t.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis", width=vm_w)
        else:
            t.add_column(header, justify=justify, no_wrap=True, min_width=_natural(c))
    n = len(view.rows)
    for i in range(len(cols[0][3])):
        cells = [Text(c[3][i]) for c in cols]  # Text: a name is never parsed as rich markup
        if i < n:
            t.add_row(*cells, style=None if view.rows[i].alive else "dim")
        else:
            t.add_row(*cells, style="bold")
    if hidden:
        t.caption = f"({hidden} column{'s' if hidden > 1 else ''} hidden: terminal too narrow)"
        t.caption_justify = "left"
    return t


def caption(view: View) -> Text:
    lat = view.lat_provenance
    slots = view.slots_provenance
    parts = [f"latency p50/p99 of the interval, estimated from log2 histogram ({lat})"]
    parts.append(f"slots visited ({slots}), max since start")
    if view.show_scanned:
        parts.append("scan = memslots scanned (linear lookup)")
    if any(r.memslots_partial for r in view.rows):
        parts.append("~ memslot count incomplete (slots predate the trace)")
    if "other" in view.changes:
        parts.append("other = memslot updates whose change type was not observed")
    if MIXED in (lat, slots):
        parts.append("mixed provenance: use --op to separate ops")
    return Text(" · ".join(parts), style="dim")


# ---------------------------------------------------------------------------- detail panel


def bucket_label(lo: int, hi: int) -> str:
    """Bucket [lo, hi) as inclusive integers: "0", "1", "2-3", "512-1023"."""
    return str(lo) if hi - lo <= 1 else f"{lo}-{hi - 1}"


def hist_lines(hist: Log2Hist, label, ascii_bars: bool = False, max_rows: int = MAX_HIST_ROWS) -> List[str]:
    """One line per log2 bucket between the first and last non-empty one. With more than
    ``max_rows`` buckets, the window of ``max_rows`` buckets holding the most values is shown
    and the tails are folded into its first ("<hi") and last (">=lo") lines."""
    idx = [i for i, c in enumerate(hist.counts) if c]
    if not idx:
        return ["(no data)"]
    first, last = idx[0], idx[-1]
    c = hist.counts
    lo_i, hi_i = first, last
    if last - first + 1 > max_rows:
        peak_i = max(range(first, last + 1), key=lambda i: c[i])
        # most values covered; among equals, the peak bucket nearest the middle
        lo_i = max(
            range(first, last - max_rows + 2),
            key=lambda s: (sum(c[s : s + max_rows]), -abs(s + max_rows // 2 - peak_i), -s),
        )
        hi_i = lo_i + max_rows - 1
    rows = []
    for i in range(lo_i, hi_i + 1):
        lo, hi = Log2Hist.bucket_bounds(i)
        rows.append((label(lo, hi), c[i]))
    below = sum(c[first:lo_i])
    above = sum(c[hi_i + 1 : last + 1])
    if below:
        rows[0] = (f"<{Log2Hist.bucket_bounds(lo_i)[1]}", rows[0][1] + below)
    if above:
        rows[-1] = (f">={Log2Hist.bucket_bounds(hi_i)[0]}", rows[-1][1] + above)
    peak = max(c for _, c in rows)
    lw = max(len(lbl) for lbl, _ in rows)
    cw = max(len(fmt_count(c)) for _, c in rows)
    ch = "#" if ascii_bars else "█"
    out = []
    for lbl, c in rows:
        n = 0 if peak == 0 else round(BAR_WIDTH * c / peak)
        if c and n == 0:
            n = 1
        out.append(f"{lbl:>{lw}} {fmt_count(c):>{cw}} {ch * n}".rstrip())
    return out


def panel(cum: Snapshot, view: View, ascii_bars: bool = False, reset: bool = False) -> Optional[RenderableType]:
    """The histograms of the panel VM since start (``reset``: ``cum`` counts from a reset)."""
    if view.panel_vm is None:
        return None
    row = next(r for r in view.rows if r.vm_id == view.panel_vm)
    lat, lat_prov, slots, slots_prov, n = panel_hists(cum, view.panel_vm, view.ops)
    title = Text()
    title.append(f"VM {row.pid} {display(row.name)}", style="bold")
    title.append(f" · since {'reset' if reset else 'start'}: {n} ops ({','.join(view.ops)})")
    left = [f"latency ns ({lat_prov})"] + hist_lines(lat, bucket_label, ascii_bars)
    right = [f"slots visited ({slots_prov})"] + hist_lines(slots, bucket_label, ascii_bars)
    grid = Table.grid(padding=(0, 4, 0, 0))
    grid.add_column(no_wrap=True, overflow="crop")
    grid.add_column(no_wrap=True, overflow="crop")
    grid.add_row(Text("\n".join(left)), Text("\n".join(right)))
    return Group(title, grid)


# ---------------------------------------------------------------------------- the screen


def render(
    cum: Optional[Snapshot],
    delta: Optional[Snapshot],
    meta: Mapping,
    plan,
    opts: ViewOptions,
    width: int,
    ascii_bars: bool = False,
    base: Optional[Snapshot] = None,
) -> RenderableType:
    """One screen of ``kvmtrace top``. ``cum`` is the cumulative snapshot, ``delta`` the interval
    (``cum.delta(prev)``). Before the first snapshot ``cum`` is None. ``base``: the snapshot of
    the last reset (key r): the figures since start (panel, header totals) count from it."""
    if cum is None:
        parts: List[RenderableType] = [
            Text(f"kvmtrace top · waiting for the first interval ({opts.interval or 1:.1f}s)…")]
        if opts.prompt is not None or opts.message:
            parts += prompt_lines(opts)
        if opts.help:
            parts.append(help_overlay())
        return Constrain(Group(*parts), width)
    if delta is None:
        delta = cum.delta(None)
    view = build_view(cum, delta, plan, opts)
    parts = header_lines(cum, delta, meta, plan, opts, view, base)
    parts += prompt_lines(opts)
    if opts.help:
        parts.append(help_overlay())
        return Constrain(Group(*parts), width)
    if not view.rows:
        if view.vms_running and (opts.filtered):
            parts.append(Text(f"no VMs match {opts.filter_text()} ({view.vms_running} running)", style="bold"))
        else:
            parts.append(Text("no VMs running", style="bold"))
        return Constrain(Group(*parts), width)
    parts.append(vm_table(view, width))
    parts.append(caption(view))
    p = panel(cum if base is None else cum.delta(base), view, ascii_bars, reset=base is not None)
    if p is not None:
        parts.append(Text(""))
        parts.append(p)
    return Constrain(Group(*parts), width)


def render_text(
    cum: Optional[Snapshot],
    delta: Optional[Snapshot],
    meta: Mapping,
    plan,
    opts: ViewOptions,
    width: int,
    ascii_bars: bool = False,
    base: Optional[Snapshot] = None,
) -> str:
    """``render`` as plain text (no colour, no cursor codes), trailing spaces stripped."""
    buf = io.StringIO()
    console = Console(
        file=buf, width=width, force_terminal=False, color_system=None, legacy_windows=False, soft_wrap=False
    )
    console.print(render(cum, delta, meta, plan, opts, width, ascii_bars, base))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


__all__ = ["render", "render_text", "attach_summary", "hist_lines", "header_lines", "vm_table"]


def render_summary(cum: Snapshot, meta: Mapping, plan, opts: ViewOptions, width: int) -> RenderableType:
    """The final summary on a terminal: the VM table over the whole run (rates = counts / time
    since attach, percentiles from the cumulative histograms), exited VMs included."""
    view = build_view(cum, None, plan, opts, summary=True)
    whole = cum.delta(None)
    cpu = cpu_percent(whole)
    head = Text()
    head.append("kvmtrace top summary", style="bold")
    head.append(
        f" · {fmt_duration(cum.elapsed_s)} since start · host {display(meta.get('host') or '?')}"
        f" · kernel {display(meta.get('kernel') or '?')}"
    )
    info = Text(
        f"lost events {cum.lost_events} · map full {cum.map_full} · unattributed ops {cum.unattributed}"
        f" · kvmtrace CPU {'-' if cpu is None else f'{cpu:.1f}%'} ({cum.self_cpu_s:.2f}s)"
        + (f" · {cost_text(whole)}" if cost_text(whole) else "")
    )
    parts: List[RenderableType] = [head, Text(attach_summary(plan)), info]
    if not view.rows:
        parts.append(Text("no VMs seen"))
    else:
        parts.append(vm_table(view, width))
        cap = caption(view)
        cap.plain = cap.plain.replace("of the interval", "since start")
        parts.append(cap)
    return Constrain(Group(*parts), width)
