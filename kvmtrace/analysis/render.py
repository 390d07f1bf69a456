"""Terminal rendering of report / compare / bench tables with rich. Formatting only: every
number is computed in report.py / compare.py / bench.py. rich is imported inside functions."""

from __future__ import annotations

import math
import os
from functools import partial
from typing import List, Optional

import pandas as pd

from .. import fmt as _fmt
from ..text import display, printable
from .report import EVENT_SOURCE, HIST_SOURCE


def _num(v) -> Optional[float]:
    """v as a float, or None for missing, unparsable and NaN values (all shown as "-")."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


fmt_ns = partial(_fmt.fmt_ns, style="report")  # the one number formatter, in the report style
fmt_s = partial(_fmt.fmt_s, style="report")


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        n = float(v)
    except (TypeError, ValueError):
        return str(v)  # a label, shown as it is
    if math.isnan(n):
        return "-"
    if abs(n) < 1e15 and (n == int(n) or abs(n) >= 10 ** digits):
        return f"{int(round(n)):,}"  # 18,224 rather than 1.82e+04
    return f"{n:.{digits}g}"


def _src_mark(src: str) -> str:
    if src == EVENT_SOURCE:
        return "ev"
    if src.startswith(HIST_SOURCE):
        return "hist*" if "incomplete" in src else "hist"
    if src.startswith("in-kernel sum / count"):
        return "mean"
    return src or "-"


def fmt_count(v) -> str:
    """A count or memslot figure where negative means unknown (sentinel): "-"."""
    n = _num(v)
    return "-" if n is None or n < 0 else fmt_num(n)


def fmt_memslots(mx, final) -> str:
    """Per VM: the largest memslot count seen while traced / the final one ("509/0": torn down)."""
    return f"{fmt_count(mx)}/{fmt_count(final)}"


def _cell(v):
    """A table cell as rich Text: taken literally (a name is never parsed as markup), control
    characters made visible (text.printable)."""
    from rich.text import Text

    return v if isinstance(v, Text) else Text(printable("-" if v is None else v))


def _table(title: str, headers: List[str], rows: List[List[str]], caption: Optional[str] = None):
    from rich import box
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i < 1 or h in ("vm", "comm", "op", "change", "prov", "src", "verdict", "scenario", "source") else "right",
                     overflow="fold")
    for r in rows:
        t.add_row(*(_cell(v) for v in r))
    return t


LEGEND = (
    "src: ev = exact percentiles over raw events; hist = from the in-kernel log2 histogram, linear "
    "interpolation within the bucket; hist* = histogram because raw events were incomplete; "
    "mean = in-kernel sum / count only (memslot-count buckets keep no histogram). "
    "vm: guest name or comm, VMM pid, #n = n-th VM of that process (#? = predates the trace). "
    "prov: latency/slots provenance (exact = function entry/exit, syscall = bounded by the ioctl/"
    "syscall, derived = from mirrored state). Means and max are exact (in-kernel sums and maxima)."
)


def _cost_line(r):
    """kvmtrace's own cost while recording one source (metadata self_cost)."""
    from rich.text import Text

    pct = lambda v: "-" if v != v else f"{100 * v:.3g}%"  # noqa: E731  (NaN: not measured)
    state = str(r["bpf_stats"])
    if state.startswith("enabled") or state.startswith("sampled"):
        bpf = f"in kernel {fmt_num(r['bpf_ns_per_event'])} ns/event, {pct(r['bpf_cpu_share'])} of a CPU"
        if state.startswith("sampled"):
            bpf += f" ({state})"
    else:
        bpf = f"in-kernel cost {r['bpf_stats']}"
    late = f"; {r['late_intervals']} late intervals (kvmtrace fell behind)" if r["late_intervals"] else ""
    return Text(f"kvmtrace's own cost ({printable(r['source'])}): {bpf}; user space {pct(r['user_cpu_share'])} of a CPU{late}",
                style="dim")


def _one_prov(heads: List[str], rows: List[List[str]]):
    """When every row has the same provenance, drop the "prov" column and return it for the
    caption (narrower tables); else leave the column. -> (heads, rows, common or "")."""
    i = heads.index("prov")
    vals = {r[i] for r in rows}
    if len(vals) != 1:
        return heads, rows, ""
    return heads[:i] + heads[i + 1:], [r[:i] + r[i + 1:] for r in rows], vals.pop()


def warning_renderables(warnings) -> list:
    """The inputs' warnings (input_warnings.InputWarning), one line each, first in the output."""
    from rich.text import Text

    if not warnings:
        return []
    n = len(warnings)
    out = [Text(f"WARNING: the inputs carry {n} warning{'s' if n != 1 else ''}: the figures below are incomplete "
                "or unreliable where they say", style="bold yellow")]
    out += [Text(f"  {printable(w.source)}: [{w.code}] {printable(w.text)}", style="yellow") for w in warnings]
    return out


def report_renderables(rep) -> list:
    out = warning_renderables(rep.warnings)
    src = rep["sources"]
    rows = []
    for _, r in src.iterrows():
        rows.append([r["source"], display(r["host"]), display(r["kernel"]), f"{r['duration_s']:.1f} s", str(r["intervals"]), display(r["status"]),
                     fmt_num(r["lost_events"]), fmt_num(r["map_full"]), fmt_num(r["unattributed"]),
                     "yes" if r["raw_events"] else "no"])
    out.append(_table("Recordings", ["source", "host", "kernel", "duration", "intervals", "status", "lost events",
                                     "map full", "unattributed", "raw events"], rows,
                      caption="map full: in-kernel map insertions that failed (operations not counted or not "
                              "derived); unattributed: hva operations of tasks that are not a known VMM "
                              "(kswapd, khugepaged, ...), in no VM's row"))
    out += [_cost_line(r) for _, r in src.iterrows() if "bpf_stats" in r]
    multi = len(src) > 1
    h = rep["hva_ops"]
    if not h.empty:
        rows = []
        for _, r in h.iterrows():
            rows.append(([r["source"]] if multi else []) + [
                r["vm_label"], fmt_memslots(r["memslots_max"], r["memslots"]), r["op"], fmt_num(r["count"]),
                fmt_num(r["rate_per_s"]), fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p90_ns"]), fmt_ns(r["lat_p99_ns"]),
                fmt_ns(r["lat_max_ns"]), _src_mark(r["latency_source"]), fmt_num(r["slots_mean"]),
                fmt_num(r["slots_max"]), fmt_num(r["scanned_mean"]), fmt_num(r["scanned_max"]),
                f"{r['lat_provenance']}/{r['slots_provenance']}"])
        heads = (["source"] if multi else []) + ["vm", "memslots", "op", "count", "/s", "p50", "p90", "p99",
                                                  "max", "src", "visited", "vis max", "scanned", "scan max",
                                                  "prov"]
        under = int(h["underived"].sum()) if "underived" in h else 0
        cap = "memslots: the VM's largest / final memslot count"
        heads, rows, one = _one_prov(heads, rows)
        if one:
            cap += f"; provenance (latency/slots): {one}"
        if under:
            cap += f"; slots visited not derivable for {under:,} operations (counted, not guessed)"
        out.append(_table("hva operations per VM", heads, rows, caption=cap))
    m = rep["memslot_updates"]
    if not m.empty:
        rows = []
        for _, r in m.iterrows():
            rows.append(([r["source"]] if multi else []) + [
                r["vm_label"], r["change"], fmt_num(r["count"]), fmt_num(r["errors"]),
                fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p90_ns"]), fmt_ns(r["lat_p99_ns"]), fmt_ns(r["lat_max_ns"]),
                _src_mark(r["latency_source"]), f"{r['lat_provenance']}/{r['change_provenance']}"])
        heads = (["source"] if multi else []) + ["vm", "change", "count", "errors", "p50", "p90", "p99", "max", "src", "prov"]
        heads, rows, one = _one_prov(heads, rows)
        out.append(_table("memslot updates", heads, rows,
                          caption=f"provenance (latency/change type): {one}" if one else None))
    b = rep["by_memslots"]
    if not b.empty:
        rows = []
        for _, r in b.iterrows():
            rows.append(([r["source"]] if multi else []) + [
                r["op"], r["memslots_bucket"], fmt_count(r["memslots_max"]), fmt_num(r["count"]), fmt_ns(r["lat_p50_ns"]),
                fmt_ns(r["lat_p99_ns"]), fmt_ns(r["lat_mean_ns"]), _src_mark(r["latency_source"]), fmt_num(r["slots_mean"]),
                fmt_num(r["scanned_mean"])])
        heads = (["source"] if multi else []) + ["op", "memslots", "max", "count", "p50", "p99", "mean", "src", "visited",
                                                  "scanned"]
        out.append(_table("hva operations by memslot count", heads, rows,
                          caption="memslot count: " + ", ".join(sorted(set(b["memslots_source"])))))
    hh = rep.tables.get("hva_ops_hosts")
    if multi and hh is not None and not hh.empty:
        rows = []
        for _, r in hh.iterrows():
            rows.append(["all hosts" if r["host"] == "*" else display(r["host"]), r["source"], r["op"], fmt_num(r["count"]),
                         fmt_ns(r["lat_p50_ns"]), fmt_ns(r["lat_p90_ns"]), fmt_ns(r["lat_p99_ns"]), fmt_ns(r["lat_max_ns"]),
                         _src_mark(r["latency_source"]), fmt_num(r["slots_mean"]), fmt_num(r["scanned_mean"]),
                         f"{r['lat_provenance']}/{r['slots_provenance']}"])
        out.append(_table("hva operations per host (all VMs and recordings of the host), then all hosts",
                          ["host", "recordings", "op", "count", "p50", "p90", "p99", "max", "src", "visited", "scanned", "prov"], rows))
    from rich.text import Text

    out.append(Text(LEGEND, style="dim"))
    return out


def before_after(b: str, a: str) -> str:
    """"509 -> -": both sides shown whenever either has a value; "-" only when neither has."""
    return "-" if b == "-" and a == "-" else f"{b} -> {a}"


def fmt_ns_tight(v) -> str:
    """fmt_ns without the space ("1.81µs"), for before -> after cells."""
    return fmt_ns(v).replace(" ", "")


def fmt_count_tight(v) -> str:
    """Counts in before -> after cells: exact below 100,000, else 3 significant digits with k/M/G."""
    n = _num(v)
    if n is None:
        return "-"
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= 1e5 and abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return fmt_num(n)


def compare_header(before: dict, after: dict) -> list:
    """One line per side naming it (label, kind and runs, kernel, host, attach mode), then every
    warning of its recordings, one line each: nothing an input carries is dropped."""
    from rich.text import Text

    out = []
    for side, d in (("before", before), ("after", after)):
        runs = f"  {d['runs']} recording{'s' if d.get('runs') != 1 else ''}" if "runs" in d else ""
        out.append(Text(f"{side + ':':8}{display(d['label'])}{runs}  kernel {display(d['kernel'])}  host {display(d['host'])}  attach {display(d['attach'])}"))
    for side, d in (("before", before), ("after", after)):
        for w in d.get("warnings") or ():
            out.append(Text(f"WARNING {side} {printable(w['source'])}: {printable(w['warning'])}", style="bold red"))
    return out


def _compact_table(title: str, headers: List[str], rows: List[List[str]], left: int = 1):
    """A borderless table for 120 columns: values fold rather than being cut ("…" would hide them)."""
    from rich import box
    from rich.table import Table

    from rich.console import Group
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i < left else "right", overflow="fold")
    for r in rows:
        t.add_row(*(_cell(v) for v in r))
    return Group(Text(title, style="italic"), t)  # the title on its own line: never cut to the table's width


def _unit(r):
    return fmt_s if r["unit"] == "s" else fmt_ns


def _compare_what(r) -> str:
    return r["op"] if r["kind"] != "memslot" else f"memslot {r['op']}"


EXIT_TEXT = {0: "no regression", 1: "regression beyond the minimum effect", 3: "no regression, some rows inconclusive",
             4: "inputs carry warnings (pass --accept-warnings to compare them anyway)"}


def compare_renderables(df: pd.DataFrame, before: Optional[dict] = None, after: Optional[dict] = None,
                        status: Optional[int] = None) -> list:
    """Header naming both sides (and their warnings), then: for bench directories the matrix
    (rows = scenario and what, columns = memslot counts, cells before -> after with the verdict);
    otherwise one row per op / memslot change type x metric with before -> after (geometric means
    over runs), the ratio with its interval and the verdict; then one line per row that is not
    "same", the summary and the exit status."""
    from rich.text import Text

    from .compare import bench_matrix, fmt_ratio_ci, is_bench, summary

    out = compare_header(before, after) if before and after else []
    if is_bench(df):
        slots, mrows = bench_matrix(df)
        rows = []
        scen = None
        for m in mrows:
            if m["scenario"] != scen:  # scenario as a group header: the cells keep the width
                scen = m["scenario"]
                rows.append([scen or "-"] + [""] * len(slots))
            f = (lambda v: fmt_s(v).replace(" ", "")) if m["unit"] == "s" else fmt_ns_tight if m["unit"] == "ns" else fmt_num
            rows.append(["  " + m["what"]] + [before_after(f(b), f(a)) for b, a in (m["cells"][n] for n in slots)])
            rows.append([""] + [m["verdicts"][n] for n in slots])
        out.append(_compact_table("before -> after by scenario and memslot count (geometric means over runs; latency "
                                  "p50 / p99 per run; time/iter = per-run median)",
                                  ["scenario / what"] + [f"{n} slots" for n in slots], rows))
    else:
        rows = []
        for _, r in df.iterrows():
            u = fmt_s if r["unit"] == "s" else fmt_ns_tight if r["unit"] == "ns" else fmt_num
            est, ci = fmt_ratio_ci(r["ratio"], r["ci_lo"], r["ci_hi"])
            rows.append([_compare_what(r), r["metric"], f"{r['runs_before']} / {r['runs_after']}",
                         before_after(u(r["before"]), u(r["after"])), est, ci, r["verdict"]])
        out.append(_compact_table("before -> after (geometric means over runs; ratio = after / before, < 1 is faster; "
                                  "interval: simultaneous 95%)", ["what", "metric", "runs", "before -> after", "ratio", "interval",
                                                      "verdict"], rows, left=2))
    for _, r in df.iterrows():
        if r["verdict"] != "same":
            out.append(Text(printable(r["line"])))
    s = summary(df)
    min_effect = df.attrs.get("min_effect")
    out.append(Text(", ".join(f"{n} {v}" for v, n in s.items()) + " (rows)"
                    + (f"; minimum effect {min_effect:.3g}" if min_effect else "")))
    if status is not None:
        out.append(Text(f"exit status {status}: {EXIT_TEXT.get(status, '')}"))
    conf, k = df.attrs.get("confidence"), df.attrs.get("rows_tested")
    out.append(Text("method: per-run figures, ratio of geometric means, Welch t on logs"
                    + (f" at {conf * 100:.3g}% per row ({k} rows, 95% together)" if conf and k else "")
                    + "; docs/analysis.md", style="dim"))
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
