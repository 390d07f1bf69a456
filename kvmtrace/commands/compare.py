"""kvmtrace compare: run-level before/after statistics of recordings or bench directories, one
verdict per row, and an exit status for CI."""

from __future__ import annotations

import click

MIN_EFFECT = 0.05  # analysis.compare.MIN_EFFECT (not imported here: the CLI starts without pandas)


def _min_effect(ctx, param, value):
    from ..errors import UsageError

    text = str(value).strip()
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        v = float("nan")
    if not (0 < v < 1):
        raise UsageError(f"--min-effect {value!r}: expected a fraction in (0, 1) or a percentage",
                         "e.g. --min-effect 5% (or 0.05)")
    return v


@click.command(
    epilog="""\b
Each side is a recording, a directory holding recordings (one per run, searched recursively),
or a `kvmtrace bench` directory (its --runs runs per configuration). Runs are the unit of
replication: record at least 5 per side (docs/analysis.md).
\b
Examples:
  kvmtrace compare before/ after/                   # directories of recordings, one per run
  kvmtrace compare bench-5.10 bench-6.1             # two `bench --runs 5` directories
  kvmtrace compare bench-5.10 bench-6.1 --min-effect 10% --csv cmp.csv --html cmp.html
  kvmtrace compare before/ after/ --json > cmp.json; echo $?
\b
Verdict per row (ratio = after / before of the geometric means over runs; Welch t interval
on the log scale, the rows' intervals simultaneous at 95%; m = --min-effect):
  regression    interval above 1 and ratio above 1+m
  improvement   interval below 1 and ratio below 1/(1+m)
  same          interval inside [1/(1+m), 1+m]
  inconclusive  anything else, fewer than 2 runs on a side, or a row on one side only
\b
Exit status (the highest applicable in the order 2, 4, 1, 3, 0):
  0  no regression, every row decided (same or improvement)
  1  a regression beyond --min-effect
  2  bad input (unreadable, or a recording against a bench directory)
  3  no regression, but some row inconclusive
  4  an input recording carries warnings (damaged, incomplete, crashed, lost
     events, ...) and --accept-warnings was not given
""",
)
@click.argument("before", type=click.Path())
@click.argument("after", type=click.Path())
@click.option("--min-effect", default=f"{MIN_EFFECT:.0%}", show_default=True, callback=_min_effect,
              help="smallest change that counts (fraction or percentage); smaller changes are 'same'")
@click.option("--accept-warnings", is_flag=True,
              help="compare recordings that carry warnings without exit status 4 (the warnings are still shown)")
@click.option("--json", "as_json", is_flag=True,
              help="print the comparison as JSON on stdout instead of the text (schema: docs/compare.schema.json)")
@click.option("--csv", "csv_file", type=click.Path(), default=None, help="write the comparison table as CSV")
@click.option("--html", "html_file", type=click.Path(), default=None,
              help="write a self-contained HTML page (before and after overlaid: latency CDFs and histograms, "
                   "against the memslot count)")
@click.option("--force", is_flag=True, help="replace existing --csv/--html files")
def compare(before, after, min_effect, accept_warnings, as_json, csv_file, html_file, force):
    """Compare BEFORE and AFTER run by run: per op and memslot change type (x scenario x memslot
    count for bench directories) the p50 and p99 latency, slots visited and scanned, and the
    workload's time per iteration, each as one figure per run; the ratio of geometric means with
    its interval (all rows' intervals hold together at 95%) and one verdict per row. Every warning of an input recording is shown per
    side. A figure one side lacks shows as "509 -> -": nothing is hidden."""
    from ..analysis import export
    from ..analysis.compare import check_kinds, describe, exit_status, to_json
    from ..analysis.compare import compare as do_compare
    from ..analysis.recording import read_inputs
    from ..analysis.render import compare_renderables, print_renderables
    from ..analysis.report import EVENT_COLUMNS

    cols = {"hva_events": ["op", "latency_ns", "lat_provenance"], "memslot_events": ["change", "latency_ns", "lat_provenance"]}
    assert set(cols) <= set(EVENT_COLUMNS)
    export.check_file(csv_file, "--csv", force)  # before any work: never overwrite, never mkdir -p
    export.check_file(html_file, "--html", force)

    recs_b, recs_a = read_inputs([before], event_columns=cols), read_inputs([after], event_columns=cols)
    check_kinds(recs_b, recs_a)
    df = do_compare(recs_b, recs_a, min_effect=min_effect)
    sides = describe(recs_b, before), describe(recs_a, after)
    nwarn = len(sides[0]["warnings"]) + len(sides[1]["warnings"])
    status = exit_status(df, nwarn, accept_warnings)
    if csv_file:
        export.write_csv(df.drop(columns=["line"]), csv_file, force)
        click.echo(f"wrote {csv_file}", err=as_json)
    if html_file:
        from ..analysis.html import compare_html

        export.write_text(html_file, compare_html(df, *sides, status=status, recs=(recs_b, recs_a)), "--html", force)
        click.echo(f"wrote {html_file}", err=as_json)
    if as_json:
        click.echo(export.dumps(to_json(df, *sides, status, accept_warnings)))
    else:
        print_renderables(compare_renderables(df, *sides, status=status))
    if status:  # one line on stderr too: with --json, stdout is the document
        from ..analysis.render import EXIT_TEXT

        click.echo(f"kvmtrace: compare: {EXIT_TEXT[status]} (exit status {status})", err=True)
        raise SystemExit(status)
