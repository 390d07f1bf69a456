"""kvmtrace command line. Commands are thin: they parse options and hand over to the tracer,
workload, dashboard or analysis modules. Every KvmtraceError becomes one message with its
remedy and an exit status in ``main`` (commands.run_click); nothing prints tracebacks."""

from __future__ import annotations

import click

from . import __version__

CONTEXT_SETTINGS = dict(help_option_names=["-h", "--help"], max_content_width=100)


# name -> (module under kvmtrace.commands, one-line help). Modules load only when their command
# runs, so `kvmtrace --help` and report commands never import bcc or pandas needlessly.
COMMANDS = {
    "doctor": "what this host supports and the probe plan kvmtrace would use",
    "workload": "create a real KVM VM with N memslots and drive a scenario (ground truth)",
    "demo": "run the built-in workload VM and trace it live, then report",
    "top": "live per-VM view of hva operations and memslot updates",
    "record": "record per-interval aggregates (and raw events) to Parquet or CSV",
    "report": "summarise recordings: per VM and op latency, slots visited, memslot updates",
    "compare": "compare two recordings or bench runs (before/after a kernel change)",
    "export": "write a recording as a Perfetto trace (slices per operation, rate counters)",
    "bench": "run the workload across memslot counts and scenarios under the tracer",
    "exporter": "serve Prometheus metrics per VM from the tracer (production hosts)",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [c for c in COMMANDS if self._module(c) is not None]

    @staticmethod
    def _module(name):
        import importlib.util

        return importlib.util.find_spec(f"kvmtrace.commands.{name}")

    def get_command(self, ctx, name):
        if name not in COMMANDS or self._module(name) is None:
            return None
        import importlib

        mod = importlib.import_module(f"kvmtrace.commands.{name}")
        return getattr(mod, name)

    def format_commands(self, ctx, formatter):
        rows = [(c, COMMANDS[c]) for c in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="kvmtrace")
def cli():
    """Trace what KVM's MMU-notifier hva path and memslot updates cost, per VM.

    \b
    Start here:
      kvmtrace doctor          what this host supports and how each op would be traced
      kvmtrace demo            create a real VM, drive it, trace it live, report
    """


def main(argv=None):
    from .commands import run_click

    run_click(cli, argv, "kvmtrace")


if __name__ == "__main__":
    main()
