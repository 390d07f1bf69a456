"""kvmtrace command line. Commands are thin: they parse options and hand over to the tracer,
workload, dashboard or analysis modules. Every KvmtraceError becomes one message with its
remedy and an exit status here, in ``main``; nothing else prints tracebacks."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import KvmtraceError

CONTEXT_SETTINGS = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="kvmtrace")
def cli():
    """Trace what KVM's MMU-notifier hva path and memslot updates cost, per VM.

    \b
    Start here:
      kvmtrace doctor          what this host supports and how each op would be traced
      kvmtrace demo            create a real VM, drive it, trace it live, report
    """


# Commands are added below by their modules' owners (one block each).


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="kvmtrace", standalone_mode=False)
    except KvmtraceError as e:
        click.echo(f"kvmtrace: {e}", err=True)
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
    sys.exit(0)


if __name__ == "__main__":
    main()
