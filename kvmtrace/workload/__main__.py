"""``python -m kvmtrace.workload [OPTIONS]`` = ``kvmtrace workload [OPTIONS]`` (for spawning the
workload as a child process without relying on the console script). Imports only the workload
command, not the CLI with its other commands."""

from ..commands import run_click
from ..commands.workload import workload

if __name__ == "__main__":
    run_click(workload, None, "python -m kvmtrace.workload")
