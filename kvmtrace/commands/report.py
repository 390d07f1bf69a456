"""kvmtrace report: summarise one or more recordings (or bench directories) into one report."""

from __future__ import annotations

import click


@click.command(
    epilog="""\b
Examples:
  kvmtrace report run1                               # tables on the terminal
  kvmtrace report run1 --json > report.json          # docs/report.schema.json
  kvmtrace report host-a host-b --csv out/ --html report.html
  kvmtrace report fleet/                             # every recording below: per host, all hosts
  kvmtrace report run1 --accept-warnings             # exit 0 even if run1 lost events

\b
Exit status:
  0  report written, no input carries a warning
  2  bad input or option (one line says what and how to fix it)
  4  report written, but an input carries warnings (damaged, crashed, incomplete,
     lost_events, map_full, underived, empty, ...): they are listed first in the text,
     in "warnings" in --json, in warnings.csv with --csv, at the top of --html;
     --accept-warnings makes it 0
""",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--csv", "csv_dir", type=click.Path(), default=None,
              help="write one CSV per table into this directory (created 0750; an existing one must be yours "
                   "and writable by nobody else)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (schema: docs/report.schema.json)")
@click.option("--html", "html_file", type=click.Path(), default=None, help="write a self-contained HTML page with plots (per VM and op over time, latency CDFs and "
                   "histograms, memslots visited, against the memslot count)")
@click.option("--force", is_flag=True, help="replace existing --csv/--html files")
@click.option("--accept-warnings", is_flag=True,
              help="exit 0 although an input carries warnings (they are still shown); without it such a report exits 4")
def report(paths, csv_dir, as_json, html_file, force, accept_warnings):
    """Summarise recordings: per VM and op count, rate, latency percentiles, slots visited and
    scanned; memslot updates by change type; hva ops by the memslot count at the operation;
    lost events. Each VM is named apart as name-or-comm[pid]#n (n-th VM of that process) with
    its largest and final memslot count; JSON and CSV also carry its stable id.

    Several PATHs (e.g. one per host) merge into one report; a directory holding recordings
    (e.g. fleet/host=H/date=D/NAME, docs/recording-format.md) stands for all of them.

    Every warning an input carries (damaged or unfinished recording, lost raw events, a full
    in-kernel map, underived figures, no KVM activity at all) is shown in every output; the
    report is written, then the exit status is 4 unless --accept-warnings is given. CSV files
    are exact: integers as integers, other numbers at full precision, start/end as ISO 8601
    UTC with nanoseconds, empty cells where a figure does not apply."""
    from ..analysis import export
    from ..analysis.input_warnings import check_accepted
    from ..analysis.recording import read_inputs
    from ..analysis.report import EVENT_COLUMNS, Report, build_report, to_json

    export.check_csv_dir(csv_dir, Report.TABLES, force)  # before any work: never overwrite, never mkdir -p
    export.check_file(html_file, "--html", force)
    recs = read_inputs(list(paths), event_columns=EVENT_COLUMNS)
    rep = build_report(recs)
    if csv_dir:
        written = export.write_csv_tables({t: rep[t] for t in Report.TABLES}, csv_dir, force)
        click.echo(f"wrote {len(written)} CSV files to {csv_dir}", err=as_json)
    if html_file:
        from ..analysis.html import report_html

        export.write_text(html_file, report_html(rep, recs=recs), "--html", force)
        click.echo(f"wrote {html_file}", err=as_json)
    if as_json:
        click.echo(export.dumps(to_json(rep)))
    else:
        from ..analysis.render import print_renderables, report_renderables

        print_renderables(report_renderables(rep))
    check_accepted(rep.warnings, accept_warnings)
