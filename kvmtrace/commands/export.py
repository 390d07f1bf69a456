"""kvmtrace export: one recording in a format other tools open (today: a Perfetto trace)."""

from __future__ import annotations

import click


@click.command(
    epilog="""\b
Examples:
  kvmtrace record --events --duration 30 -o run1  # raw events: one slice per operation
  kvmtrace export --perfetto run1                  # writes run1.perfetto-trace here
  kvmtrace export --perfetto run1 -o /tmp/run1.pftrace --force
  # open it in the Perfetto UI, or: trace_processor_shell -q query.sql run1.perfetto-trace
""",
)
@click.argument("recording", type=click.Path())
@click.option("--perfetto", "perfetto", is_flag=True,
              help="write a Perfetto trace: one track per VM with a slice per hva operation and memslot "
                   "update (op, range, memslots visited/scanned, provenance as arguments) and counter tracks "
                   "of the rates per interval")
@click.option("-o", "--output", type=click.Path(), default=None, metavar="FILE",
              help="the trace file to write (default: RECORDING's name + .perfetto-trace in the current directory)")
@click.option("--force", is_flag=True, help="replace an existing output file")
def export(recording, perfetto, output, force):
    """Export one recording (a `kvmtrace record -o` directory, or a `--rotate` directory) for
    other tools. --perfetto writes a Perfetto trace for ui.perfetto.dev and trace_processor.

    Slices need raw events (`kvmtrace record --events`); a recording without them gives the
    counter tracks only, and the command says so. Timestamps are CLOCK_MONOTONIC nanoseconds,
    as the raw events carry them. The file is written atomically and never replaces an existing
    one without --force. Progress goes to stderr for long exports."""
    import os

    from ..errors import UsageError
    from ..output import AtomicFile, check_new_file, shown

    if not perfetto:
        raise UsageError("export needs a format", "add --perfetto (the only format so far)")
    if output is None:
        base = os.path.basename(os.path.normpath(recording)) or "recording"
        output = f"{base}.perfetto-trace"
    check_new_file(output, "--output", force)  # before any work: never overwrite silently

    from ..analysis.perfetto import export_perfetto, protos
    from ..analysis.recording import read_inputs

    protos()  # a missing package: one line before the recording is read
    recs = read_inputs([recording])
    if len(recs) != 1:
        raise UsageError(f"{shown(recording)} holds {len(recs)} recordings; export takes one",
                         "pass one recording directory (e.g. one of those below it)")
    rec = recs[0]
    for w in rec.warnings:
        click.echo(f"kvmtrace: warning: {shown(w)}", err=True)

    def progress(done, total):
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        click.echo(f"kvmtrace: export: {done:,} of {total:,} raw events{pct}", err=True)

    with AtomicFile(output, "--output", mode="wb", replace=force) as f:
        s = export_perfetto(rec, f, progress=progress)
    if not s.has_events:
        click.echo(f"kvmtrace: {shown(recording)} holds no raw events: the trace has counter tracks only "
                   "(slices need a recording made with `kvmtrace record --events`)", err=True)
    click.echo(f"wrote {shown(output)}: {s.vms} VM{'s' if s.vms != 1 else ''}, {s.hva_slices:,} hva op slices, "
               f"{s.memslot_slices:,} memslot update slices, {s.counters:,} counter values ({s.bytes:,} bytes; "
               f"clock: {s.clock})")
