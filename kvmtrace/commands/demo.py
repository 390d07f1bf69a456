"""kvmtrace demo: create a real KVM VM (the built-in workload, in a child process), trace it
live, then report and write a CSV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import click

from ..errors import KvmtraceError, UsageError
from . import modes_option, parse_modes


@click.command(
    "demo",
    epilog="""\b
Examples:
  kvmtrace demo                          # 256 memslots, mixed scenario, ~20 s
  kvmtrace demo --slots 2000 --duration 30 --scenario unmap
  kvmtrace demo --plain                  # one line per interval instead of the live screen
""",
)
@click.option("--slots", default=256, show_default=True, type=click.IntRange(1, 32764), help="memslots in the demo VM")
@click.option("--scenario", default="mixed", show_default=True,
              type=click.Choice(["mixed", "unmap", "unmap-chunked", "map", "move-active", "move-inactive", "age", "churn"]),
              help="what the workload does to the VM")
@click.option("--duration", default=15.0, show_default=True, type=click.FloatRange(1, 3600), help="seconds the workload runs")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60), help="refresh interval, seconds")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, writable=True),
              help="where to write the CSV (default ./kvmtrace-demo-TIME.csv)")
@click.option("--plain", is_flag=True, help="plain lines instead of the live screen")
@modes_option
def demo(slots, scenario, duration, interval, csv_path, plain, modes):
    """Trace a real KVM VM that kvmtrace creates and drives.

    Starts the tracer, then the built-in workload (a VM with N memslots, driven like KVM's
    memslot_perf_test) in a child process; shows the live view until the workload ends or
    Ctrl-C; then prints what was traced next to the workload's own ground truth, and writes a
    CSV of the per-VM figures.
    """
    from ..tracer.session import TraceSession, interrupt_on_signals

    if csv_path is None:
        csv_path = os.path.abspath(time.strftime("kvmtrace-demo-%Y%m%d-%H%M%S.csv"))
    mode_list = parse_modes(modes)
    if not os.path.exists("/dev/kvm"):
        raise KvmtraceError("/dev/kvm does not exist: the demo needs KVM to create its VM",
                            "load KVM (modprobe kvm_intel or kvm_amd) or run on a host with virtualisation",
                            exit_code=3)
    truth_file = tempfile.NamedTemporaryFile(prefix="kvmtrace-truth-", suffix=".json", delete=False)
    truth_file.close()
    child = None
    final = None
    with interrupt_on_signals():
        with TraceSession(interval=interval, modes=mode_list) as session:
            cmd = [sys.executable, "-m", "kvmtrace.workload", "--slots", str(slots), "--scenario", scenario,
                   "--duration", str(duration), "--json-out", truth_file.name, "--quiet"]
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            click.echo(f"kvmtrace demo: workload VM pid {child.pid} ({slots} memslots, {scenario}, {duration:g} s); "
                       f"tracing all VMs on this host. Ctrl-C stops.", err=True)
            try:
                final = _show(session, child, plain, duration)
            finally:
                if child.poll() is None:
                    child.terminate()  # the workload releases its VM on SIGTERM
                try:
                    out, err = child.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    out, err = child.communicate()
            final = session.snapshot()
    truth = None
    try:
        with open(truth_file.name) as f:
            truth = json.load(f)
    except (OSError, ValueError):
        truth = None
    finally:
        os.unlink(truth_file.name)
    if child.returncode not in (0, None) and truth is None:
        raise KvmtraceError(f"the workload failed (exit {child.returncode}): {(err or '').strip()[-400:]}",
                            "run `kvmtrace workload` alone to see why")
    _summary(final, child.pid, truth, csv_path)


def _show(session, child, plain, duration):
    stop = lambda: child.poll() is not None  # noqa: E731
    try:
        from ..dashboard.live import run_live
    except ImportError:  # pragma: no cover - dashboard is part of the package
        run_live = None
    if run_live is not None:
        return run_live(session, duration=duration + 30, log=plain, stop=stop)
    last = None
    for snap in session.snapshots(duration=duration + 30, stop=stop):
        last = snap
    return last


def _match(traced, truth):
    if truth is None:
        return ""
    return "equal" if traced == truth else f"{traced - truth:+d}"


def _summary(snap, pid, truth, csv_path):
    """What was traced for the workload VM, next to its ground truth; CSV of every VM."""
    import pandas as pd

    from ..analysis.recording import escape_cell
    from ..analysis.tables import TEXT_COLUMNS, frames_from_snapshots

    vm = f"pid:{pid}"
    mine_hva = [h for h in snap.hva if h.pid == pid]
    mine_ms = [m for m in snap.memslot if m.pid == pid]
    click.echo("")
    click.echo(f"workload VM (pid {pid}): hva operations")
    click.echo(f"  {'op':<11}{'traced':>10}{'truth':>10}  {'':<8}{'latency mean':>20}  {'slots visited mean/max':>24}")
    ops = sorted({h.op for h in mine_hva} | set((truth or {}).get("hva_ops", {}) or {}))
    for op in ops:
        h = next((x for x in mine_hva if x.op == op), None)
        t = ((truth or {}).get("hva_ops") or {}).get(op)
        traced = h.count if h else 0
        lat = f"{h.lat_sum_ns / h.lat_count / 1000:.1f} us ({h.lat_provenance})" if h and h.lat_count else "-"
        sl = (f"{h.slots_sum / h.slots_count:.2f}/{h.slots_max} ({h.slots_provenance})"
              if h and h.slots_count else "-")
        click.echo(f"  {op:<11}{traced:>10}{'n/a' if t is None else t:>10}  {_match(traced, t):<8}{lat:>20}  {sl:>24}")
    click.echo(f"workload VM (pid {pid}): memslot updates")
    changes = sorted({m.change for m in mine_ms} | set(((truth or {}).get("memslot_updates") or {})))
    for ch in changes:
        m = [x for x in mine_ms if x.change == ch]
        traced = sum(x.count for x in m)
        t = ((truth or {}).get("memslot_updates") or {}).get(ch)
        lat = (f"{sum(x.lat_sum_ns for x in m) / traced / 1000:.1f} us ({m[0].lat_provenance})" if traced else "-")
        click.echo(f"  {ch:<11}{traced:>10}{'n/a' if t is None else t:>10}  {_match(traced, t):<8}{lat:>20}")
    click.echo("  truth: what the workload itself counted (n/a: the kernel decides, e.g. aging); "
               "traced: what kvmtrace measured.")
    if snap.lost_events:
        click.echo(f"  lost events: {snap.lost_events} (derived figures cover the events received)")
    frames = frames_from_snapshots([snap])
    parts = []
    for table in ("hva", "memslot"):
        df = frames[table].copy()
        df.insert(0, "table", table)
        parts.append(df)
    out = pd.concat(parts, ignore_index=True, sort=False)
    for col in TEXT_COLUMNS & set(out.columns):  # no formula injection from process names
        out[col] = out[col].map(lambda v: escape_cell(v) if isinstance(v, str) else v)
    try:
        out.to_csv(csv_path, index=False)
    except OSError as e:
        raise UsageError(f"cannot write {csv_path}: {e.strerror}", "pass --csv with a writable path")
    click.echo(f"CSV: {csv_path}")
