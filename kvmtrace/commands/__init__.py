"""One module per CLI command, each defining a click command named after its module.
They stay thin: parse options, call into tracer/, workload/, dashboard/, analysis/."""

import sys
from typing import Optional, Sequence, Tuple

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
self_cost_option = click.option(
    "--self-cost", type=click.Choice(["sampled", "full", "off"]), default="sampled", show_default=True,
    help="how kvmtrace measures its own in-kernel cost: BPF run-time statistics on 100 ms of every "
         "second (sampled), all the time (full: every run counted, but they add two clock reads to "
         "every BPF program run on the host), or not at all (off)")


class Number(click.ParamType):
    """A finite number within [lo, hi] (``lo_open``: lo itself excluded). NaN, infinities and
    out-of-range values are usage errors at parse time, before anything is created."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 name: str = "SECONDS", integer: bool = False):
        self.lo, self.hi, self.lo_open, self.name, self.integer = lo, hi, lo_open, name, integer

    def _range(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:.10g}"
        hi = "" if self.hi is None else f"<= {self.hi:.10g}"
        return " and ".join(x for x in (lo, hi) if x)

    def convert(self, value, param, ctx):
        import math

        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = int(str(value), 10) if self.integer else float(str(value))
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.integer else 'a number'}", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number (use a number {self._range()})", param, ctx)
        if (self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))) or (
                self.hi is not None and v > self.hi):
            self.fail(f"{value!r} is out of range (use a number {self._range()})", param, ctx)
        return v


# the numeric options every command shares, so one option means one range everywhere
INTERVAL = Number(0.1, 3600.0)  # seconds per interval: below 0.1 s the map reads dominate
DURATION = Number(0.0, 366 * 86400.0, lo_open=True)  # seconds, at most a year
TIMEOUT = Number(0.0, 366 * 86400.0, lo_open=True)


def ignore_late_interrupts() -> None:
    """The command is over and everything it wrote is saved: a late Ctrl-C (say, the second of
    two) while the interpreter shuts down has nothing left to stop and must not turn a clean
    exit into death by SIGINT. SIGTERM keeps its action. Only for a program run (``argv`` None),
    never for a command called in-process."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_click(command: click.Command, argv: Optional[Sequence[str]], prog_name: str) -> None:
    """Run a click command as a program: every KvmtraceError becomes one message with its remedy
    and an exit status, never a traceback (``kvmtrace`` and ``python -m kvmtrace.workload``)."""
    from ..errors import KvmtraceError

    for stream in (sys.stdout, sys.stderr):  # paths and labels with undecodable bytes print as given
        try:
            stream.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError):
            pass
    try:
        command.main(args=None if argv is None else list(argv), prog_name=prog_name, standalone_mode=False)
    except KvmtraceError as e:
        from ..text import printable  # a name or path in a message is data: one line, no escapes

        click.echo(f"kvmtrace: {printable(e.message)}" + (f"\n  fix: {printable(e.remedy)}" if e.remedy else ""),
                   err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("kvmtrace: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("kvmtrace: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    finally:
        if argv is None:
            ignore_late_interrupts()
    sys.exit(0)
