"""kvmtrace demo: create a real KVM VM (the built-in workload, in a child process), trace it
live, then report and write a CSV. Thin: the comparison with the ground truth is
workload/verify.py, the CSV analysis/export.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import click

from ..errors import KvmtraceError
from ..consts import SINGLE_VM_SCENARIOS as SCENARIOS
from . import Number, modes_option, parse_modes


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """The workload child gets SIGTERM when the demo dies, even by SIGKILL (it runs in a session
    of its own, so a terminal's Ctrl-C reaches only the demo, which then stops it cleanly)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@click.command(
    "demo",
    epilog="""\b
Examples:
  kvmtrace demo                          # 256 memslots, mixed scenario, ~20 s
  kvmtrace demo --slots 2000 --duration 30 --scenario unmap
  kvmtrace demo --plain                  # one line per interval instead of the live screen
  kvmtrace demo --csv demo.csv --force   # replace demo.csv if it exists
""",
)
@click.option("--slots", default=256, show_default=True, type=click.IntRange(1, 32764), help="memslots in the demo VM")
@click.option("--scenario", default="mixed", show_default=True, type=click.Choice(SCENARIOS),
              help="what the workload does to the VM (see `kvmtrace workload --help`)")
@click.option("--duration", default=15.0, show_default=True, type=Number(1, 3600),
              help="seconds the workload runs (1 to 3600)")
@click.option("--interval", default=1.0, show_default=True, type=Number(0.1, 60),
              help="refresh interval, seconds (0.1 to 60)")
@click.option("--csv", "csv_path", metavar="FILE",
              help="where to write the CSV (default ./kvmtrace-demo-TIME.csv); its directory must exist")
@click.option("--force", is_flag=True, help="replace the --csv file if it exists")
@click.option("--plain", is_flag=True, help="plain lines instead of the live screen")
@modes_option
def demo(slots, scenario, duration, interval, csv_path, force, plain, modes):
    """Trace a real KVM VM that kvmtrace creates and drives.

    Starts the tracer, then the built-in workload (a VM with N memslots, driven like KVM's
    memslot_perf_test) in a child process; shows the live view until the workload ends or
    Ctrl-C (or SIGTERM/SIGHUP); then prints what was traced next to the workload's own ground
    truth, and writes a CSV of the per-VM figures. After an interruption the ground truth is
    incomplete and shown as n/a; the traced figures and the CSV are still written.
    """
    from ..analysis import export
    from ..snapshot import departed, with_vms
    from ..tracer.session import TraceSession
    from .record import stop_on_signals

    mode_list = parse_modes(modes)
    if csv_path is None:
        csv_path = os.path.abspath(time.strftime("kvmtrace-demo-%Y%m%d-%H%M%S.csv"))
    export.check_file(csv_path, "--csv", force)  # before the run, not after it
    if not os.path.exists("/dev/kvm"):
        raise KvmtraceError("/dev/kvm does not exist: the demo needs KVM to create its VM",
                            "load KVM (modprobe kvm_intel or kvm_amd) or run on a host with virtualisation",
                            exit_code=3)
    tmpdir = tempfile.mkdtemp(prefix="kvmtrace-demo-")
    try:
        truth_path = os.path.join(tmpdir, "truth.json")
        flag = threading.Event()
        with stop_on_signals(flag):
            with TraceSession(interval=interval, modes=mode_list) as session:
                child, err, seen = _run(session, flag, slots, scenario, duration, plain, truth_path)
                final = session.snapshot()
        # the workload's VM ended, and the tracer forgets a VM once its final figures are read:
        # they are in the last snapshot of the live view
        final = with_vms(final, departed(seen, final).values())
        truth = _read_truth(truth_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    interrupted = flag.is_set()
    if not interrupted and child.returncode != 0 and truth is None:
        raise KvmtraceError(f"the workload failed (exit {child.returncode}): {(err or '').strip()[-400:]}",
                            "run `kvmtrace workload` alone to see why")
    from ..workload.verify import summary_lines

    note = "interrupted: the workload stopped early, so there is no ground truth (n/a)" if truth is None else ""
    for line in summary_lines(final, child.pid, truth, note):
        click.echo(line)
    export.write_csv(export.snapshot_frame(final), csv_path, force=force, option="--csv")
    click.echo(f"CSV: {csv_path}")


def _run(session, flag, slots, scenario, duration, plain, truth_path):
    """Start the workload child, show the live view until it ends or a signal; stop it."""
    from ..dashboard.live import run_live

    cmd = [sys.executable, "-m", "kvmtrace.workload", "--slots", str(slots), "--scenario", scenario,
           "--duration", repr(float(duration)), "--json-out", truth_path, "--quiet"]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, preexec_fn=_die_with_parent)
    click.echo(f"kvmtrace demo: workload VM pid {child.pid} ({slots} memslots, {scenario}, {duration:g} s); "
               f"tracing all VMs on this host. Ctrl-C stops.", err=True)
    err = ""
    try:
        seen = run_live(session, duration=duration + 30, log=plain, signals=False,
                        stop=lambda: flag.is_set() or child.poll() is not None)
    finally:
        if child.poll() is None:
            child.terminate()  # the workload releases its VM on SIGTERM
        try:
            _, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
    return child, err, seen


def _read_truth(path):
    try:
        with open(path) as f:
            truth = json.load(f)
        return truth if isinstance(truth, dict) else None
    except (OSError, ValueError):
        return None
