"""Terminal rendering of report / compare / bench tables with rich. Formatting only: every
number is computed in report.py / compare.py / bench.py. rich is imported inside functions."""

from __future__ import annotations

import math
import os
from typing import List, Optional

import pandas as pd

from .report import EVENT_SOURCE, HIST_SOURCE


def _num(v) -> Optional[float]:
    """v as a float, or None for missing, unparsable and NaN values (all shown as "-")."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt_ns(v) -> str:
    v = _num(v)
    if v is None:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} ns"


def fmt_s(v) -> str:
    v = _num(v)
    return "-" if v is None else fmt_ns(v * 1e9)


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        n = float(v)
    except (TypeError, ValueError):
        return str(v)  # a label, shown as it is
    if math.isnan(n):
        return "-"
    if n == int(n) and abs(n) < 1e15:
        return f"{int(n):,}"
    return f"{n:.{digits}g}"


def fmt_ratio(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{v:.3g}x"


def _src_mark(src: str) -> str:
    if src == EVENT_SOURCE:
        return "ev"
    if src.startswith(HIST_SOURCE):
        return "hist*" if "incomplete" in src else "hist"
    return src or "-"


def _table(title: str, headers: List[str], rows: List[List[str]], caption: Optional[str] = None):
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left", title_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i < 1 or h in ("vm", "comm", "op", "change", "prov", "src", "verdict", "scenario", "source") else "right",
                     overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


LEGEND = (
    "src: ev = exact percentiles over raw events; hist = from the in-kernel log2 histogram, linear "
    "interpolation within the bucket; hist* = histogram because raw events were incomplete. "
    "prov: latency/slots provenance (exact = function entry/exit, syscall = bounded by the ioctl/"
    "syscall, derived = from mirrored state). Means and max are exact (in-kernel sums and maxima)."
)


def _cost_line(r):
    """kvmtrace's own cost while recording one source (metadata self_cost)."""
    from rich.text import Text

    pct = lambda v: "-" if v != v else f"{100 * v:.3g}%"  # noqa: E731  (NaN: not measured)
    if str(r["bpf_stats"]).startswith("enabled"):
        bpf = f"in kernel {fmt_num(r['bpf_ns_per_event'])} ns/event, {pct(r['bpf_cpu_share'])} of a CPU"
    else:
        bpf = f"in-kernel cost {r['bpf_stats']}"
    late = f"; {r['late_intervals']} late intervals (kvmtrace fell behind)" if r["late_intervals"] else ""
    return Text(f"kvmtrace's own cost ({r['source']}): {bpf}; user space {pct(r['user_cpu_share'])} of a CPU{late}",
                style="dim")


def report_renderables(rep) -> list:
    out = []
    src = rep["sources"]
    rows = []
    for _, r in src.iterrows():
        rows.append([r["source"], r["host"], r["kernel"], f"{r['duration_s']:.1f} s", str(r["intervals"]), r["status"],
                     fmt_num(r["lost_events"]), "yes" if r["raw_events"] else "no"])
    out.append(_table("Recordings", ["source", "host", "kernel", "duration", "intervals", "status", "lost events", "raw events"], rows))
    out += [_cost_line(r) for _, r in src.iterrows() if "bpf_stats" in r]
    multi = len(src) > 1
    h = rep["hva_ops"]
    if not h.empty:
        rows = []
        for _, r in h.iterrows():
            vm = f"{r['comm'] or '?'}[{r['pid']}]" + (f" {r['name']}" if r["name"] else "")
            rows.append(([r["source"]] if multi else []) + [
                vm, fmt_num(r["memslots"]) if r["memslots"] >= 0 else "-", r["op"], fmt_num(r["count"]),
                fmt_num(r["rate_per_s"]), fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p90_ns"]), fmt_ns(r["lat_p99_ns"]),
                fmt_ns(r["lat_max_ns"]), _src_mark(r["latency_source"]), fmt_num(r["slots_mean"]),
                fmt_num(r["slots_p99"]), fmt_num(r["slots_max"]), fmt_num(r["scanned_mean"]),
                f"{r['lat_provenance']}/{r['slots_provenance']}"])
        heads = (["source"] if multi else []) + ["vm", "slots", "op", "count", "/s", "p50", "p90", "p99", "max", "src",
                                                  "visited", "vis p99", "vis max", "scanned", "prov"]
        out.append(_table("hva operations per VM", heads, rows))
    m = rep["memslot_updates"]
    if not m.empty:
        rows = []
        for _, r in m.iterrows():
            rows.append(([r["source"]] if multi else []) + [
                f"{r['comm'] or '?'}[{r['pid']}]", r["change"], fmt_num(r["count"]), fmt_num(r["errors"]),
                fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p90_ns"]), fmt_ns(r["lat_p99_ns"]), fmt_ns(r["lat_max_ns"]),
                _src_mark(r["latency_source"]), f"{r['lat_provenance']}/{r['change_provenance']}"])
        heads = (["source"] if multi else []) + ["vm", "change", "count", "errors", "p50", "p90", "p99", "max", "src", "prov"]
        out.append(_table("memslot updates", heads, rows))
    b = rep["by_memslots"]
    if not b.empty:
        rows = []
        for _, r in b.iterrows():
            rows.append(([r["source"]] if multi else []) + [
                r["op"], r["memslots_bucket"], fmt_num(r["count"]), fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p99_ns"]),
                fmt_ns(r["lat_mean_ns"]), _src_mark(r["latency_source"]), fmt_num(r["slots_mean"]), fmt_num(r["scanned_mean"])])
        heads = (["source"] if multi else []) + ["op", "memslots", "count", "p50", "p99", "mean", "src", "visited", "scanned"]
        out.append(_table("hva operations by memslot count", heads, rows,
                          caption="memslot count: " + ", ".join(sorted(set(b["memslots_source"])))))
    from rich.text import Text

    out.append(Text(LEGEND, style="dim"))
    lost = rep.lost_events
    if lost:
        out.append(Text(f"lost raw events: {lost:,} (aggregate counts are complete; raw-event percentiles fall back to histograms where events are missing)", style="yellow"))
    for w in src["warnings"]:
        if w:
            out.append(Text(f"warning: {w}", style="yellow"))
    return out


def compare_renderables(df: pd.DataFrame) -> list:
    from rich.text import Text

    from .compare import _fmt_p

    bench = bool((df["scenario"] != "").any() or (df["slots"] >= 0).any()) if not df.empty else False
    rows = []
    for _, r in df.iterrows():
        unit = fmt_s if r["unit"] == "s" else fmt_ns
        rows.append([r["op"] if r["kind"] != "memslot" else f"memslot {r['op']}"]
                    + ([r["scenario"] or "-", fmt_num(r["slots"]) if r["slots"] >= 0 else "-"] if bench else [])
                    + [fmt_num(r["n_before"]), fmt_num(r["n_after"]), unit(r["median_before"]), unit(r["median_after"]),
                       fmt_ratio(r["median_ratio"]),
                       f"{fmt_ratio(r['median_ratio_ci_lo'])}-{fmt_ratio(r['median_ratio_ci_hi'])}"
                       if not pd.isna(r["median_ratio_ci_lo"]) else "-",
                       unit(r["p99_before"]), unit(r["p99_after"]), fmt_ratio(r["p99_ratio"]),
                       _fmt_p(r["p_value"]), fmt_ratio(r["slots_ratio"]), fmt_ratio(r["scanned_ratio"]), r["lat_provenance"]])
    heads = (["op"] + (["scenario", "slots"] if bench else [])
             + ["n before", "n after", "median before", "median after", "ratio", "95% CI",
                "p99 before", "p99 after", "p99 ratio", "p", "visited ratio", "scanned ratio", "prov"])
    out = [_table("before -> after (ratio = after / before; < 1 is faster)", heads, rows)]
    for v in df["verdict"]:
        out.append(Text(v))
    tests = sorted({t for t in df["test"] if isinstance(t, str) and t})
    if tests:
        out.append(Text("tests: " + "; ".join(tests), style="dim"))
    out.append(Text("CI: order-statistic interval per side at sqrt(0.95), combined into ratio bounds (>= 95 %)", style="dim"))
    return out


def bench_renderables(df: pd.DataFrame) -> list:
    from rich.text import Text

    rows = []
    for _, r in df.iterrows():
        rows.append([r["scenario"], fmt_num(r["slots"]), fmt_s(r["iter_avg_s"]), fmt_s(r["iter_best_s"]), r["op"],
                     fmt_num(r["count"]), fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p99_ns"]), _src_mark(r["latency_source"]),
                     fmt_num(r["slots_mean"]), fmt_num(r["scanned_mean"]), r["provenance"]])
    heads = ["scenario", "slots", "time/iter avg", "best", "op", "count", "p50", "p99", "src", "visited", "scanned", "prov"]
    return [_table("bench", heads, rows), Text(LEGEND, style="dim")]


def print_renderables(items, file=None, width: Optional[int] = None) -> None:
    from rich.console import Console

    import sys

    out = file if file is not None else sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    if width is None and not tty and not os.environ.get("COLUMNS"):
        width = 160  # piped or logged: wide plain tables rather than wrapped cells
    c = Console(file=file, width=width, no_color=not tty, highlight=False)
    for it in items:
        c.print(it)
