"""Every exact-mode (kprobe) program passes the kernel verifier on this host: compiled from the
probe plan this kernel's BTF gives, loaded without attaching (kprobes are compiled out here, but
kprobe programs load). fentry programs cannot even load here (EPERM), so the kernel lab proves
them; the tracepoint programs are loaded and attached for real by test_tracer_e2e."""

from __future__ import annotations

import dataclasses

import pytest

from kvmtrace.tracer import host, session as S
from kvmtrace.tracer.cflags import build_cflags, source
from kvmtrace.tracer.records import kprobe_programs

pytestmark = pytest.mark.root

ok, why = host.can_trace()
if not ok:
    pytest.skip(why, allow_module_level=True)
try:
    BPF = S.import_bcc()
except Exception as e:  # product's own capability check
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def facts():
    from kvmtrace.tracer.kernel import gather

    g = gather(trial=False)
    if not g.facts.btf_funcs:
        pytest.skip("no BTF on this kernel: exact-mode defines cannot be derived")
    if "kvm_mmu_notifier_invalidate_range_start" not in g.facts.kallsyms:
        pytest.skip("KVM not loaded")
    # what the resolver would decide on the same kernel with kprobes enabled
    return dataclasses.replace(g.facts, kprobes=True, kprobes_reason="assumed for the verifier test")


def _load_all(plan, cflags, expected_prefixes):
    b = BPF(text=source().encode(), cflags=cflags)
    try:
        names = []
        for _probe, _fn, fn in kprobe_programs(plan):  # the names the session attaches
            names.append(fn)
            b.load_func(fn, BPF.KPROBE)  # raises if the verifier rejects it
        assert names, "no kprobe program was generated"
        for p in expected_prefixes:
            assert any(n.startswith(p) for n in names), (p, names)
        return names
    finally:
        b.cleanup()


def test_kprobe_programs_pass_the_verifier(facts):
    from kvmtrace.tracer.plan import resolve

    plan = resolve(facts, modes=("kprobe",))
    assert plan.for_op("unmap").attach == "kprobe"
    cflags = build_cflags(plan, facts, events=True)
    names = _load_all(plan, cflags, ["kp_enter_UNMAP_", "kp_exit_UNMAP_", "kp_handler_", "kp_ms_outer_enter",
                                     "kp_vm_init", "kp_vm_destroy"])
    assert len(names) >= 11


def test_linear_scan_count_and_rmap_handlers_pass_the_verifier(facts):
    """The 5.10 shape with this kernel's callbacks: the memslot count read from used_slots of 2
    address spaces at every callback, and handlers counted per distinct memslot argument (what
    matters to the verifier is the code, not the offsets)."""
    from kvmtrace.tracer.plan import resolve

    plan = resolve(facts, modes=("kprobe",))
    count = dict(OFF_KVM_MEMSLOTS=2504, NR_AS=2, OFF_MEMSLOTS_USED=1036)
    defines = tuple((k, v) for k, v in plan.defines if k != "LINEAR_SCAN") + (("LINEAR_SCAN", 1),) + tuple(count.items())
    ops = tuple(dataclasses.replace(p, handler_slot_arg=2) if p.kind == "hva" and p.handlers else p for p in plan.ops)
    plan = dataclasses.replace(plan, linear_scan=True, defines=defines, ops=ops)
    cflags = build_cflags(plan, facts, pid=1234, events=True)
    assert "-DREAD_MEMSLOTS=1" in cflags and "-DH_UNMAP_SLOT_ARG=2" in cflags
    _load_all(plan, cflags, ["kp_enter_UNMAP_", "kp_handler_", "kp_vm_init"])


def test_perf_buffer_variant_compiles_and_loads(facts):
    from kvmtrace.tracer.plan import resolve

    plan = resolve(facts, modes=("kprobe",))
    cflags = build_cflags(plan, facts, ringbuf=False, events=True)
    assert "-DUSE_RINGBUF" not in cflags
    _load_all(plan, cflags, ["kp_enter_UNMAP_"])


def test_thread_state_in_task_storage_and_in_the_hash_both_load(facts):
    """5.11+ with BTF keeps the callback state in task-local storage; older kernels (5.10) in
    the thread-keyed LRU hash: both variants pass the verifier."""
    from kvmtrace.tracer.plan import resolve

    plan = resolve(facts, modes=("kprobe",))
    cflags = build_cflags(plan, facts)
    assert "-DCB_TASK_STORAGE" in cflags  # this host: 6.x with BTF
    _load_all(plan, cflags, ["kp_enter_UNMAP_", "kp_exit_UNMAP_", "kp_handler_"])
    old = dataclasses.replace(facts, release="5.10.0-35-amd64")
    cflags = build_cflags(plan, old)
    assert "-DCB_TASK_STORAGE" not in cflags
    _load_all(plan, cflags, ["kp_enter_UNMAP_", "kp_exit_UNMAP_", "kp_handler_"])
