"""Tracepoint mode's in-kernel slot tables on this host: the programs that keep them sorted load
with a wide margin under the verifier's limit, and a kernel that refuses them still traces, with
every op of its VMs counted underived, never guessed."""

from __future__ import annotations

import ctypes as ct
import os
import re
import time

import pytest

from kvmtrace.tracer import session as S

from .test_tracer_e2e import run_workload

pytestmark = pytest.mark.root

WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)

SHIFT_PROGRAMS = ("tp_shift_right", "tp_shift_left")
VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: instructions the verifier may process
BPF_LOG_STATS = 4


def verifier_processed(bpf, name):
    """Load one program of a compiled bcc module again, with the verifier's statistics: the
    instructions it processed (its fd is closed at once)."""
    from bcc import BPF
    from bcc.libbcc import lib

    fn = name.encode()
    buf = ct.create_string_buffer(1 << 16)
    fd = lib.bcc_func_load(bpf.module, BPF.TRACEPOINT, fn, lib.bpf_function_start(bpf.module, fn),
                           lib.bpf_function_size(bpf.module, fn), lib.bpf_module_license(bpf.module),
                           lib.bpf_module_kern_version(bpf.module), BPF_LOG_STATS, buf, len(buf), None, -1)
    log = buf.value.decode(errors="replace")
    if fd >= 0:
        os.close(fd)
    m = re.search(r"processed (\d+) insns", log)
    assert m, f"{name}: no verifier statistics (fd {fd}): {log[-300:]!r}"
    return int(m.group(1))


def test_the_verifier_walks_the_shift_programs_far_below_its_limit():
    """Regression: 6.12 refused tp_shift_right with E2BIG (its verifier stopped at 1,000,000
    processed instructions, ~205 of 1,024 loop steps in) because clang compiled the per-entry
    comparisons into jumps and every jump multiplied the paths walked; this host's verifier
    needed 538,652 for the same program. Compilers and kernels differ by 2x and more, so the
    bound is a quarter of the limit."""
    with S.TraceSession(interval=0.5, modes=("tracepoint",)) as s:
        assert s.slot_tables == "in kernel"
        got = {n: verifier_processed(s.bpf, n) for n in SHIFT_PROGRAMS}
    assert all(v <= VERIFIER_LIMIT // 4 for v in got.values()), got


def test_a_kernel_that_refuses_the_shift_programs_still_traces_with_every_op_underived(tmp_path, monkeypatch):
    """The fallback: counts, latency and memslot change types exact; slots visited never guessed."""
    from bcc import BPF

    load = BPF.load_func

    def refuse(self, name, *a, **kw):
        if (name.decode() if isinstance(name, bytes) else name) in SHIFT_PROGRAMS:
            raise Exception(f"Failed to load BPF program {name}: Argument list too long")
        return load(self, name, *a, **kw)

    monkeypatch.setattr(BPF, "load_func", refuse)
    with S.TraceSession(interval=0.5, modes=("tracepoint",)) as s:
        why = "unavailable: the kernel refused the slot-table programs (Failed to load BPF program"
        assert s.slot_tables.startswith(why) and s.slot_tables.endswith("Argument list too long)")
        assert s.meta["tp.slot_tables"] == s.slot_tables
        truth = run_workload(tmp_path, "--slots", "8", "--scenario", "unmap", "--pages", "300", "--iterations", "1")
        time.sleep(0.3)
        snap = s.snapshot()
    (h,) = [h for h in snap.hva if h.pid == truth["pid"] and h.op == "unmap"]
    assert h.count == truth["hva_ops"]["unmap"] >= 300
    assert (h.underived, h.slots_count, h.slots_sum) == (h.count, 0, 0)
    assert h.lat_count == h.count
    got = {m.change: m.count for m in snap.memslot if m.pid == truth["pid"]}
    assert got == {k: v for k, v in truth["memslot_updates"].items() if v}
