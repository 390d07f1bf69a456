"""`kvmtrace top`: live per-VM view of hva operations and memslot updates."""

from __future__ import annotations

import click

from . import INTERVAL, Number, modes_option, parse_modes, self_cost_option

from ..consts import Op
from ..dashboard.keys import help_lines
from ..errors import CapabilityMissing

SORTS = ("ops", "latency", "slots", "pid")


@click.command(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
@click.option("-i", "--interval", type=INTERVAL, default=1.0, show_default=True,
              help="seconds between refreshes (0.1 to 3600)")
@click.option("-d", "--duration", type=Number(0.1, 366 * 86400.0), default=None,
              help="stop after this many seconds (at least 0.1)")
@click.option("-1", "--once", is_flag=True, help="trace one interval, print a plain table, exit")
@click.option("-l", "--log", is_flag=True, help="one line per interval (totals over the shown VMs)")
@click.option("--csv", "csv_path", metavar="FILE", default=None,
              help="append per-VM rows of every interval to FILE (new, or an earlier top --csv file of yours)")
@click.option("-s", "--sort", type=click.Choice(SORTS), default="ops", show_default=True, help="row order")
@click.option("-p", "--pid", "pids", type=click.IntRange(1), multiple=True, help="only this VMM process (repeatable)")
@modes_option
@self_cost_option
@click.option("--vm", "vms", multiple=True, help="only VMs whose name or command contains this (repeatable)")
@click.option(
    "--op", "ops", type=click.Choice([o.label for o in Op]), multiple=True, help="only these hva ops (repeatable)"
)
def top(interval, duration, once, log, csv_path, sort, pids, modes, self_cost, vms, ops):
    """Live per-VM view of KVM hva operations (MMU-notifier callbacks) and memslot updates.

    \b
    One row per VM: VMM pid, name, memslots, vCPUs, ops/s per op, p50/p99 latency (estimated
    from a log2 histogram; the provenance says how latency was measured), memslots visited per
    op (mean, max) and memslot updates/s by change type. When stdout is not a terminal a
    plain table is printed every interval. Ctrl-C, q, SIGTERM or SIGHUP restore the terminal
    and print a summary since start.

    \b
    Keys on a terminal (kvm_stat's where they fit; sort moved from s to < >, pause from p to space):
    {keys}

    \b
    Examples:
      kvmtrace top                       live view, refreshed every second
      kvmtrace top --once                one interval as a plain table
      kvmtrace top --log --csv top.csv   one line per interval, per-VM rows in top.csv
      kvmtrace top --pid 4242 --op unmap only one VMM process, only unmap
    """
    from ..dashboard.live import make_options, run_live
    from ..dashboard.plain import CsvSink

    make_options(sort, pids, vms, ops, interval)  # usage errors before loading BPF
    if once and log:
        raise click.UsageError("--once and --log exclude each other")
    if csv_path:
        CsvSink.check(csv_path)
    try:
        from ..tracer.session import TraceSession
    except ImportError as e:
        raise CapabilityMissing(
            f"the tracer is not available: {e}",
            "reinstall kvmtrace (make setup) and check `kvmtrace doctor`",
        ) from None
    session_pid = pids[0] if len(pids) == 1 else None
    with TraceSession(pid=session_pid, interval=interval, modes=parse_modes(modes), self_cost=self_cost) as session:
        run_live(
            session,
            duration=duration,
            once=once,
            log=log,
            csv_path=csv_path,
            sort=sort,
            pids=pids,
            vms=vms,
            ops=ops,
            interval=interval,
        )


top.help = top.help.replace("{keys}", "\n    ".join("  " + line for line in help_lines()))
