"""kvmtrace bench: the workload at each memslot count x scenario, each run traced and recorded,
then the seed-style table. Two bench directories feed `kvmtrace compare` directly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import click

from . import INTERVAL, TIMEOUT, modes_option, parse_modes

# The child starts as this gate, so its pid is known (and traced) before the workload runs; the
# gate execs the workload (same pid) once the tracer is attached and writes a line to stdin.
GATE = "import os,sys; sys.stdin.buffer.readline(); os.execv(sys.argv[1], sys.argv[1:])"


def kernel_max_memslots() -> int:
    from ..workload.kvm import kernel_max_memslots as cap

    return cap()


def workload_cmd(slots: int, scenario: str, iterations: int, json_out: str, slot_size=None) -> list:
    cmd = [sys.executable, "-m", "kvmtrace.workload", "--slots", str(slots), "--scenario", scenario,
           "--iterations", str(iterations), "--json-out", json_out]
    if slot_size:
        cmd += ["--slot-size", str(slot_size)]
    return cmd


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.rstrip() for line in f.readlines()[-n:])
    except OSError:
        return ""


def run_one(directory, scenario, slots, iterations, interval, events, slot_size, timeout, flag, status, modes=None,
            run: int = 0) -> dict:
    """One traced workload run; returns its index entry."""
    import json

    from ..analysis.bench import run_dir_name
    from ..analysis.recording import Recorder
    from ..tracer.session import TraceSession
    from .record import run_recording, session_meta

    name = run_dir_name(scenario, slots, run)
    rdir = os.path.join(directory, "runs", name)
    os.makedirs(os.path.dirname(rdir), exist_ok=True)
    rec_path = os.path.join(rdir, "recording")
    os.makedirs(rdir, exist_ok=True)
    wl_json = os.path.join(rdir, "workload.json")
    log_path = os.path.join(rdir, "workload.log")
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = workload_cmd(slots, scenario, iterations, wl_json, slot_size)
    entry = {"scenario": scenario, "slots": slots, "run": run + 1, "iterations": iterations, "recording": os.path.join("runs", name, "recording"),
             "workload_json": os.path.join("runs", name, "workload.json"), "command": cmd[1:], "status": "failed"}
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", GATE] + cmd, stdin=subprocess.PIPE, stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        try:
            deadline = [None]
            timed_out = []

            def stop():
                if flag.is_set():
                    return True
                if child.poll() is not None:
                    return True
                if deadline[0] is not None and time.monotonic() > deadline[0]:
                    timed_out.append(True)
                    return True
                return False

            with TraceSession(pid=child.pid, interval=interval, events=events, modes=modes) as s:
                meta = {k: v for k, v in session_meta(s, f"{scenario}/{slots}", child.pid, interval, events).items() if v is not None}
                meta["bench"] = {"scenario": scenario, "slots": slots, "iterations": iterations, "run": run + 1}
                with Recorder(rec_path, meta=meta, events=events, plan=s.plan) as rec:
                    child.stdin.write(b"go\n")
                    child.stdin.close()
                    t0 = time.monotonic()
                    deadline[0] = t0 + timeout
                    run_recording(s, rec, stop=stop, status=status)
                    status.done()
            entry["duration_s"] = round(time.monotonic() - t0, 3)
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    entry["exit_code"] = child.returncode
    if flag.is_set():
        entry["status"] = "interrupted"
    elif timed_out:  # stopped before the workload ended: what was traced is not the whole run
        entry["status"] = "timeout"
        entry["error"] = f"the workload was still running after --timeout {timeout:g} s; run stopped"
    elif child.returncode != 0:
        entry["status"] = "failed"
        entry["error"] = _tail(log_path) or f"workload exited with {child.returncode}"
    else:
        try:
            with open(wl_json) as f:
                entry["workload"] = json.load(f)
            entry["status"] = "ok"
        except (OSError, ValueError) as e:
            entry["error"] = f"workload wrote no readable JSON ({e})"
    return entry


@click.command(
    epilog="""\b
Examples:
  kvmtrace bench -o bench-6.1                        # default slot counts and scenarios
  kvmtrace bench --slots 10,100,509 --scenario unmap,move-active -o b1
  kvmtrace bench --runs 1 -o quick                   # one run each: a look, compare says inconclusive
  kvmtrace compare bench-5.10 bench-6.1              # then compare two kernels (exit status 0-4)
\b
Cost: every run is its own process and tracer start (BPF compile, ~7 s of CPU here) plus
the workload: the defaults (25 configurations x 5 runs) take about 20-30 minutes.
""",
)
@click.option("--slots", "slots_text", default="10,30,50,100,509", show_default=True, help="memslot counts, comma-separated")
@click.option("--scenario", "scen_text", default="unmap,unmap-chunked,move-active,move-inactive,map", show_default=True,
              help="workload scenarios, comma-separated")
@click.option("-o", "--output", "directory", required=True, type=click.Path(),
              help="bench directory to create (its parent must exist)")
@click.option("--iterations", type=click.IntRange(1, 1_000_000), default=3, show_default=True,
              help="workload iterations per run")
@click.option("--runs", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="runs per configuration, each its own process and recording (compare needs >= 2 per side; "
                   "docs/analysis.md)")
@click.option("--interval", type=INTERVAL, default=0.5, show_default=True, help="tracer interval, seconds (0.1 to 3600)")
@click.option("--events", is_flag=True, help="record raw events too (exact percentiles and tests; more overhead)")
@click.option("--slot-size", default=None, help="passed to the workload's --slot-size")
@click.option("--timeout", type=TIMEOUT, default=900.0, show_default=True,
              help="seconds before a run is stopped (and marked timeout, not ok)")
@modes_option
def bench(slots_text, scen_text, directory, iterations, runs, interval, events, slot_size, timeout, modes):
    """Run the workload at each memslot count x scenario, --runs times each (every run its own
    process under its own tracer start, recorded into DIR; the runs go round-robin over the
    configurations so slow drift of the host spreads over all of them), and print the seed-style
    table (time per iteration, per-op latency, slots visited and scanned; one row per run).
    `kvmtrace compare DIR_BEFORE DIR_AFTER` compares two bench directories run by run."""
    from ..analysis.bench import check_slots, new_index, parse_scenarios, parse_slots, save_index, seed_table
    from ..analysis.recording import read_inputs
    from ..analysis.render import bench_renderables, print_renderables
    from ..errors import KvmtraceError, UsageError
    from ..output import check_new_dir, make_dir
    from .record import StatusLine, stop_on_signals

    slots = parse_slots(slots_text)
    scenarios = parse_scenarios(scen_text)
    mode_list = parse_modes(modes)
    if slot_size is not None:
        from ..workload import parse_size

        from ..workload.kvm import PAGE_SIZE

        slot_size = parse_size(slot_size, what="--slot-size")
        if slot_size % PAGE_SIZE:
            raise UsageError(f"--slot-size {slot_size} is not a multiple of the page size ({PAGE_SIZE})",
                             "use a multiple of 4k, e.g. 4k, 64k, 2M")
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise UsageError(f"{directory} already exists", "choose a new directory for the bench output")
    check_new_dir(directory, "-o")
    check_slots(slots, kernel_max_memslots())
    make_dir(directory, "-o")
    idx = new_index({"host": os.uname().nodename, "kernel": os.uname().release, "slots": slots,
                     "scenarios": scenarios, "iterations": iterations, "runs_per_config": runs, "interval_s": interval,
                     "raw_events": events})
    save_index(directory, {**idx, "runs": []})
    flag = threading.Event()
    status = StatusLine()
    failed = []
    total = len(slots) * len(scenarios) * runs
    n = 0
    with stop_on_signals(flag):
        for run, scenario, nslots in ((k, sc, ns) for k in range(runs) for sc in scenarios for ns in slots):
            if flag.is_set():
                break
            n += 1
            click.echo(f"[{n}/{total}] {scenario} with {nslots} memslots, {iterations} iterations, run {run + 1}/{runs}",
                       err=True)
            entry = run_one(directory, scenario, nslots, iterations, interval, events, slot_size, timeout, flag, status,
                            modes=mode_list, run=run)
            if entry["status"] == "ok":
                idx["runs"].append(entry)
            else:
                failed.append(entry)
                idx.setdefault("failed_runs", []).append(entry)
                click.echo(f"  {entry['status']}: {entry.get('error', '')}", err=True)
            save_index(directory, idx)
    if idx["runs"]:
        print_renderables(bench_renderables(seed_table(read_inputs([directory]))))
    click.echo(f"bench output in {directory} ({len(idx['runs'])} runs ok, {len(failed)} not); "
               f"compare two with: kvmtrace compare BEFORE_DIR AFTER_DIR", err=True)
    if flag.is_set():
        raise KvmtraceError("bench interrupted; completed runs are kept", exit_code=130)
    if failed:
        raise KvmtraceError(f"{len(failed)} bench run(s) failed; see workload.log in {directory}/runs/", exit_code=1)
