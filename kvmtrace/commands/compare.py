"""kvmtrace compare: before/after statistics of two recordings or bench directories."""

from __future__ import annotations

import click


@click.command(
    epilog="""\b
Examples:
  kvmtrace compare before after                      # two recordings or two bench directories
  kvmtrace compare bench-5.10 bench-6.1              # scenario x memslot-count table, before -> after
  kvmtrace compare bench-5.10 bench-6.1 --csv cmp.csv --html cmp.html
""",
)
@click.argument("before", type=click.Path())
@click.argument("after", type=click.Path())
@click.option("--csv", "csv_file", type=click.Path(), default=None, help="write the comparison table as CSV")
@click.option("--html", "html_file", type=click.Path(), default=None, help="write a self-contained HTML page")
@click.option("--force", is_flag=True, help="replace existing --csv/--html files")
def compare(before, after, csv_file, html_file, force):
    """Compare BEFORE and AFTER (recordings or `kvmtrace bench` directories). A header names
    both sides (label, kernel, host, attach mode); then per op and memslot change type the
    absolute figures before -> after (count, p50, p99, slots visited and scanned) with the
    ratio, its 95% confidence interval and a Mann-Whitney test; one verdict line per row.
    Two bench directories print the scenario x memslot-count table with before -> after cells.
    A figure one side lacks shows as "509 -> -": nothing is hidden."""
    from ..analysis import export
    from ..analysis.compare import compare as do_compare
    from ..analysis.recording import read_inputs
    from ..analysis.render import compare_renderables, print_renderables
    from ..analysis.report import EVENT_COLUMNS

    cols = {"hva_events": ["op", "latency_ns", "lat_provenance"], "memslot_events": ["change", "latency_ns", "lat_provenance"]}
    assert set(cols) <= set(EVENT_COLUMNS)
    export.check_file(csv_file, "--csv", force)  # before any work: never overwrite, never mkdir -p
    export.check_file(html_file, "--html", force)
    from ..analysis.compare import describe

    recs_b, recs_a = read_inputs([before], event_columns=cols), read_inputs([after], event_columns=cols)
    df = do_compare(recs_b, recs_a)
    sides = describe(recs_b, before), describe(recs_a, after)
    if csv_file:
        export.write_csv(df, csv_file, force)
        click.echo(f"wrote {csv_file}")
    if html_file:
        from ..analysis.html import compare_html

        export.write_text(html_file, compare_html(df, *sides), "--html", force)
        click.echo(f"wrote {html_file}")
    print_renderables(compare_renderables(df, *sides))
