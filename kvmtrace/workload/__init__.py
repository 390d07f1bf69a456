"""The built-in real-VM workload: a KVM VM with N memslots driven through memslot_perf_test-like
scenarios, with exact ground truth (see ``core`` for the per-syscall notifier rules).

    from kvmtrace.workload import Workload
    with Workload(slots=64, scenario="unmap", iterations=1) as wl:
        wl.run()
    truth = wl.ground_truth()

As a child process: ``python -m kvmtrace.workload --wait-start --json-out truth.json``
prints ``READY <pid>``, waits for a line on stdin, runs, and prints ``DONE``.
"""

from __future__ import annotations

from .core import (
    DEFAULT_SCENARIO,
    DEFAULT_SLOTS,
    MAX_PAGES,
    SCENARIOS,
    Workload,
    WorkloadInterrupted,
    default_slot_size,
)
from .sizes import format_size, parse_size

__all__ = [
    "Workload",
    "WorkloadInterrupted",
    "SCENARIOS",
    "DEFAULT_SCENARIO",
    "DEFAULT_SLOTS",
    "MAX_PAGES",
    "default_slot_size",
    "parse_size",
    "format_size",
]
