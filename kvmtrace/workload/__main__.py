"""``python -m kvmtrace.workload [OPTIONS]`` = ``kvmtrace workload [OPTIONS]`` (for spawning the
workload as a child process without relying on the console script)."""

import sys

from ..cli import main

if __name__ == "__main__":
    main(["workload", *sys.argv[1:]])
