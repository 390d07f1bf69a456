"""One module per CLI command, each defining a click command named after its module.
They stay thin: parse options, call into tracer/, workload/, dashboard/, analysis/."""

from typing import Optional, Tuple

import click

MODES_HELP = ("attach modes to consider, comma-separated subset of fentry,kprobe,tracepoint "
              "(default: the best this kernel allows; see `kvmtrace doctor`)")


def parse_modes(text: Optional[str]) -> Optional[Tuple[str, ...]]:
    """--modes value -> tuple of modes (None = all), or a UsageError naming the fix."""
    from ..errors import UsageError
    from ..tracer.plan import MODES

    if not text:
        return None
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"unknown attach mode(s) {', '.join(bad) or '(none)'}",
                         f"--modes takes a comma-separated subset of {','.join(MODES)}")
    return modes


modes_option = click.option("--modes", default=None, metavar="LIST", help=MODES_HELP)
