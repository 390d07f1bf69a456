"""Bench directories and the seed-style table (scenario x memslot count: time per iteration,
per-op latency, slots visited / scanned).

A bench directory::

    DIR/kvmtrace-bench.json          index: format, version, host, kernel, runs (rewritten
                                     atomically after every finished run)
    DIR/runs/<scenario>-<slots>[-r<k>]/            one recording per run (see recording.py); run 1
                                                   has no -r suffix, runs 2.. of --runs have -r2...
    DIR/runs/<scenario>-<slots>[-r<k>]/workload.json   the workload's ground-truth JSON

Every run is its own process and recording: runs are the unit of replication of `compare`.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Sequence

import pandas as pd

from .. import __version__
from ..consts import SINGLE_VM_SCENARIOS as SCENARIOS  # the one scenario list, less multi-vm
from ..errors import UsageError
from .recorder import write_json_atomic
from .recording import BENCH_FILE, BENCH_FORMAT, BENCH_VERSION, Recording
from .report import build_report


def parse_slots(text: str) -> List[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--slots {text!r}: expected a comma-separated list of integers", "e.g. --slots 10,30,50,100,509")
    if not out or any(n < 1 for n in out):
        raise UsageError(f"--slots {text!r}: every memslot count must be >= 1", "e.g. --slots 10,30,50,100,509")
    return out


def parse_scenarios(text: str) -> List[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [s for s in out if s not in SCENARIOS]
    if not out or bad:
        what = ", ".join(bad) if bad else repr(text)
        raise UsageError(f"--scenario: unknown scenario {what}", "choose from " + ", ".join(SCENARIOS))
    return out


def run_dir_name(scenario: str, slots: int, run: int = 0) -> str:
    """runs/<scenario>-<slots> for the first run (the layout of single-run bench directories),
    runs/<scenario>-<slots>-r<run+1> for the others."""
    return f"{scenario}-{slots}" + (f"-r{run + 1}" if run else "")


def new_index(meta: dict) -> dict:
    idx = {"format": BENCH_FORMAT, "format_version": BENCH_VERSION, "kvmtrace_version": __version__,
           "created": time.time(), "runs": []}
    idx.update(meta)
    return idx


def save_index(directory: str, idx: dict) -> None:
    write_json_atomic(os.path.join(directory, BENCH_FILE), idx)


SEED_COLUMNS = ["scenario", "slots", "iterations", "iter_avg_s", "iter_best_s", "op", "count", "count_per_iter",
                "lat_p50_ns", "lat_p99_ns", "lat_mean_ns", "latency_source", "slots_mean", "scanned_mean", "provenance"]


def seed_table(recs: Sequence[Recording]) -> pd.DataFrame:
    """One row per scenario x slots x op (hva ops, then memslot updates by change type), with the
    workload's time per iteration on every row of its run."""
    rep = build_report(recs)
    src = rep["sources"].set_index("source")
    rows = []
    for r in recs:
        b = r.bench or {}
        s = src.loc[r.source]
        iters = b.get("iterations") or (b.get("workload") or {}).get("iterations")
        base = {"scenario": b.get("scenario", r.source), "slots": b.get("slots", -1), "iterations": iters,
                "iter_avg_s": s["iter_avg_s"], "iter_best_s": s["iter_best_s"]}
        h = rep["hva_ops_total"]
        h = h[h["source"] == r.source] if not h.empty else h
        m = rep["memslot_updates"]
        m = m[m["source"] == r.source] if not m.empty else m
        any_row = False
        for _, x in h.iterrows():
            rows.append(dict(base, op=x["op"], count=x["count"], count_per_iter=(x["count"] / iters) if iters else float("nan"),
                             lat_p50_ns=x["lat_p50_ns"], lat_p99_ns=x["lat_p99_ns"], lat_mean_ns=x["lat_mean_ns"],
                             latency_source=x["latency_source"], slots_mean=x["slots_mean"], scanned_mean=x["scanned_mean"],
                             provenance=f"{x['lat_provenance']}/{x['slots_provenance']}"))
            any_row = True
        if not m.empty:
            g = m.groupby(["change", "lat_provenance", "change_provenance"], sort=True)
            for (change, lp, cp), part in g:
                # one workload VM per run: usually one row; several VMs are summed in count only
                x = part.iloc[0]
                cnt = int(part["count"].sum())
                rows.append(dict(base, op=f"memslot {change}", count=cnt,
                                 count_per_iter=(cnt / iters) if iters else float("nan"),
                                 lat_p50_ns=x["lat_p50_ns"] if len(part) == 1 else float("nan"),
                                 lat_p99_ns=x["lat_p99_ns"] if len(part) == 1 else float("nan"),
                                 lat_mean_ns=x["lat_mean_ns"] if len(part) == 1 else float("nan"),
                                 latency_source=x["latency_source"], slots_mean=float("nan"), scanned_mean=float("nan"),
                                 provenance=f"{lp}/{cp}"))
                any_row = True
        if not any_row:
            rows.append(dict(base, op="-", count=0, count_per_iter=float("nan"), lat_p50_ns=float("nan"),
                             lat_p99_ns=float("nan"), lat_mean_ns=float("nan"), latency_source="none",
                             slots_mean=float("nan"), scanned_mean=float("nan"), provenance="none"))
    df = pd.DataFrame(rows, columns=SEED_COLUMNS)
    if not df.empty:
        df = df.sort_values(["scenario", "slots"], kind="stable").reset_index(drop=True)
    return df


def check_slots(slots: Sequence[int], cap: Optional[int]) -> None:
    """Slot counts above the kernel's KVM_CAP_NR_MEMSLOTS -> a clear error before anything runs."""
    if cap is None:
        return
    over = [n for n in slots if n > cap]
    if over:
        raise UsageError(
            f"--slots {','.join(map(str, over))}: above this kernel's memslot limit ({cap}, KVM_CAP_NR_MEMSLOTS)",
            f"use memslot counts up to {cap}",
        )
