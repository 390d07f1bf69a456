"""`kvmtrace workload`: create a real KVM VM with N memslots, drive a scenario, report what it
caused (ground truth for checking a tracer). Thin: options here, the work in kvmtrace.workload."""

from __future__ import annotations

import sys

import click

from ..errors import UsageError
from . import DURATION
from ..workload import DEFAULT_SCENARIO, DEFAULT_SLOTS, MAX_PAGES, SCENARIOS, format_size, parse_size


class SizeParam(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(value, what="--" + param.name.replace("_", "-") if param else "size")
        except UsageError as e:
            self.fail(f"{e.message} ({e.remedy})", param, ctx)


def _fmt_s(v) -> str:
    return "n/a" if v is None else f"{v:.6f}s"


def render_report(gt: dict) -> list:
    """Human lines, in the spirit of memslot_perf_test's output."""
    lines = []
    lines.append(
        f"Workload pid {gt['pid']}: scenario {gt['scenario']}, {gt['slots']} memslots x "
        f"{format_size(gt['slot_size'])} (kernel limit {gt['nr_memslots_cap'] or 'unknown'}), "
        f"vCPU: {gt['vcpu']}"
    )
    lines.append(f"Memslot setup took {_fmt_s(gt['slot_setup_s'])}")
    n = gt["iterations"]
    lines.append(
        f"Test took {_fmt_s(gt['run_s'])} for {n} iteration{'s' if n != 1 else ''}: "
        f"average {_fmt_s(gt['iter_avg_s'])}, best {_fmt_s(gt['iter_best_s'])}"
    )
    parts = []
    for op, cnt in gt["hva_ops"].items():
        if cnt is None:
            parts.append(f"{op} not exact (the kernel decides)")
            continue
        extra = []
        out = gt["hva_ops_outside_slots"].get(op)
        if out:
            extra.append(f"{out} outside any slot")
        vis = gt["hva_slots_visited"].get(op)
        if vis is not None:
            extra.append(f"{vis} slots visited")
        parts.append(f"{op} {cnt}" + (f" ({', '.join(extra)})" if extra else ""))
    lines.append("hva operations caused: " + "; ".join(parts))
    ar = gt.get("age_requests") or {}
    if any(ar.values()):
        lines.append(
            "age requests: "
            + ", ".join(f"{k.replace('_pages', '').replace('madv_', 'MADV_').upper()} {v} pages" for k, v in ar.items() if v)
        )
    lines.append(
        "memslot updates: " + ", ".join(f"{k} {v}" for k, v in gt["memslot_updates"].items())
    )
    for note in gt.get("notes") or []:
        lines.append(f"note: {note}")
    return lines


@click.command(
    "workload",
    context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100),
)
@click.option("--slots", "-n", type=click.IntRange(min=1), default=DEFAULT_SLOTS, show_default=True,
              help="memslots to create (at most the kernel's KVM_CAP_NR_MEMSLOTS).")
@click.option("--scenario", "-s", type=click.Choice(SCENARIOS), default=DEFAULT_SCENARIO, show_default=True,
              help="what to drive (see below).")
@click.option("--iterations", "-i", type=click.IntRange(min=1), default=None,
              help="iterations to run [default: 3 unless --duration].")
@click.option("--duration", "-d", type=DURATION, default=None,
              help="run iterations until SEC seconds have passed (at least one).", metavar="SEC")
@click.option("--slot-size", type=SizeParam(), default=None,
              help="bytes per memslot, e.g. 4k, 64k, 2M [default: 128 MiB / slots, 4k..2M].")
@click.option("--pages", type=click.IntRange(min=1, max=MAX_PAGES), default=None,
              help="4 KiB pages unmapped one by one per iteration (unmap, map, mixed) "
                   "[default: all slot memory; 2048 for mixed].")
@click.option("--vcpu/--no-vcpu", default=True, show_default=True,
              help="try one vCPU running a tiny real-mode program first.")
@click.option("--wait-start", is_flag=True,
              help="after the VM exists and before any memslot is created, print 'READY <pid>' "
                   "and wait for a line on stdin (lets a tracer attach first).")
@click.option("--json-out", default=None, metavar="FILE",
              help="write the ground truth (pid, hva ops, memslot updates, slot ranges, timings) as JSON "
                   "(a new file in an existing directory).")
@click.option("--force", is_flag=True, help="replace the --json-out file if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="print only the READY/DONE protocol lines.")
def workload(slots, scenario, iterations, duration, slot_size, pages, vcpu, wait_start, json_out, force, quiet):
    """Create a real KVM VM with N memslots and drive a scenario from the host side.

    Modelled on the kernel's memslot_perf_test. Prints the memslot setup time, per-iteration
    average and best times, and exactly which hva operations (MMU-notifier callbacks) and
    memslot updates it caused, so a tracer's counts can be checked against it. The VM and
    its memory are released on exit, also on Ctrl-C and SIGTERM.

    \b
    Scenarios:
      unmap          madvise(MADV_DONTNEED) page by page over slot memory
      unmap-chunked  the same in 2 MiB chunks
      map            fault half the pages in while unmapping the other half, then swap
      move-active    move the last (in-use) slot to another guest address and back
      move-inactive  the same with a slot whose memory is never touched
      age            MADV_COLD + MADV_PAGEOUT on populated memory (the kernel decides
                     whether KVM ages anything: age counts are reported as not exact)
      churn          memslot create, dirty logging on/off, move there and back, delete
      mixed          all of the above, plus unmaps of memory no slot covers and ranges
                     spanning three adjacent slots (default)
      multi-vm       3 VMs one after another, then 2 at once, in this one process, with
                     ground truth per VM ('vms' in --json-out); one run: --slots and --pages
                     size the first VM (default 50 pages, 64 KiB slots), no vCPU

    \b
    Protocol (for tracers spawning it): 'READY <pid>' once the VM exists (waits for a
    stdin line with --wait-start), 'DONE' after the VM is released.

    \b
    Examples:
      kvmtrace workload                                   # mixed, 64 slots, 3 iterations
      kvmtrace workload --slots 32000 --scenario unmap --iterations 1
      kvmtrace workload -n 64 -s unmap --pages 5000 --json-out truth.json
      kvmtrace workload -s churn --duration 5 --quiet
      python -m kvmtrace.workload --wait-start -q --json-out truth.json
    """
    from ..output import check_new_file
    from ..workload import Workload

    if json_out:  # fail before creating a VM, not after the run
        check_new_file(json_out, "--json-out", force)

    out = (lambda s: None) if quiet else click.echo

    def ready(pid: int) -> None:
        click.echo(f"READY {pid}")
        sys.stdout.flush()
        if wait_start:
            sys.stdin.readline()

    if scenario == "multi-vm":  # several VMs in this process: a Workload of its own
        from ..workload.multivm import MultiVmWorkload as Workload  # noqa: F811
    wl = Workload(
        slots=slots,
        slot_size=slot_size,
        scenario=scenario,
        iterations=iterations,
        duration=duration,
        pages=pages,
        vcpu=vcpu,
        on_ready=ready,
        log=out,
    )
    with wl:
        wl.run()
    gt = wl.ground_truth()
    if json_out:
        wl.write_ground_truth(json_out)
    for line in render_report(gt):
        out(line)
    if json_out:
        out(f"ground truth written to {json_out}")
    click.echo("DONE")
    sys.stdout.flush()
