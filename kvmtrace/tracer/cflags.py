"""Turn a probe plan into the -D flags that configure kvmtrace/bpf/kvmtrace.c.

No string from a user ever reaches the C code: options are validated integers, and the only
names are kernel function identifiers taken from kallsyms/BTF through the plan, checked against
a C identifier pattern here.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from ..consts import Op, c_defines
from ..errors import KvmtraceError
from .plan import KernelFacts, ProbePlan, parse_release

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Conventional argument positions, used only when BTF cannot tell (each is what every kernel
# from 4.x to 6.18 has; BTF parameter names win when present).
_DEFAULT_ARGS = {
    "kvm_mmu_notifier_invalidate_range_start": {"range": 1},
    "kvm_mmu_notifier_clear_flush_young": {"start": 2, "end": 3},
    "kvm_mmu_notifier_clear_young": {"start": 2, "end": 3},
    "kvm_mmu_notifier_test_young": {"address": 2},
    "kvm_mmu_notifier_change_pte": {"address": 2},
}

# enum kvm_mr_change has been KVM_MR_CREATE, KVM_MR_DELETE, KVM_MR_MOVE, KVM_MR_FLAGS_ONLY
# (0..3) since it was introduced in 3.8 (commit 7b6195a91d, "KVM: set_memory_region: Identify
# the requested change explicitly"). BTF enum values override these when the plan carries them.
_KMR_DEFAULT = {"KMR_CREATE": 0, "KMR_DELETE": 1, "KMR_MOVE": 2, "KMR_FLAGS_ONLY": 3}


# Task-local storage (BPF_MAP_TYPE_TASK_STORAGE) is usable from tracing programs, kprobes
# included, since 5.11 (commit a10787e6d58c, "bpf: Enable task local storage for tracing
# programs"); its helpers need the kernel's BTF (bpf_get_current_task_btf).
TASK_STORAGE_SINCE = (5, 11)
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def exact_task_storage(facts: Optional[KernelFacts], btf_path: str = VMLINUX_BTF) -> bool:
    """Exact modes keep each thread's callback state in task-local storage (a pointer chase,
    freed with the task) rather than an LRU hash keyed by thread id: 5.11+ with BTF. The
    release decides only because no BPF feature probe tells it without a trial load."""
    v = parse_release(facts.release) if facts is not None else None
    return v is not None and v >= TASK_STORAGE_SINCE and os.path.exists(btf_path)


def _ident(name: str) -> str:
    if not _IDENT.match(name or ""):
        raise KvmtraceError(f"refusing probe target {name!r}: not a kernel function identifier")
    return name


def _params(facts: Optional[KernelFacts], fn: str) -> Optional[Tuple[str, ...]]:
    if facts is None or facts.btf_funcs is None:
        return None
    return facts.btf_funcs.get(fn)


def arg_pos(facts: Optional[KernelFacts], fn: str, *names: str) -> Optional[int]:
    """Position of the first parameter of ``fn`` called one of ``names`` (BTF, else defaults)."""
    params = _params(facts, fn)
    if params is not None:
        for n in names:
            if n in params:
                return params.index(n)
        return None
    d = _DEFAULT_ARGS.get(fn, {})
    for n in names:
        if n in d:
            return d[n]
    return None


def build_cflags(
    plan: ProbePlan,
    facts: Optional[KernelFacts] = None,
    pid: Optional[int] = None,
    ringbuf: bool = True,
    ringbuf_pages: int = 4096,
    events: bool = False,
    fentry_module: Optional[str] = None,
) -> List[str]:
    """The -D flags for this plan. ``events`` asks for raw hva events in exact modes
    (tracepoint mode always streams them: slots are derived from them in userspace)."""
    flags: List[str] = list(c_defines())
    defines: Dict[str, int] = dict(plan.defines)
    for k, v in _KMR_DEFAULT.items():
        defines.setdefault(k, v)
    exact_modes = set()
    any_tp_hva = False
    for op in Op:
        p = plan.for_op(op.label)
        if p is None or not p.available:
            continue
        name = op.name
        if p.attach == "tracepoint":
            flags.append(f"-DHVA_TP_{name}")
            any_tp_hva = True
            continue
        exact_modes.add(p.attach)
        flags.append(f"-DHVA_EXACT_{name}")
        cbs = [_ident(c) for c in p.callbacks]
        if not cbs:
            raise KvmtraceError(f"probe plan for {op.label} has no callback to attach")
        flags.append(f"-DCB_{name}_FN={cbs[0]}")
        if op == Op.AGE and len(cbs) > 1:
            flags.append(f"-DCB_AGE2_FN={cbs[1]}")
        if p.handlers and p.slots_method == "handler":  # per-slot (5.13+) or per-rmap handlers
            flags.append(f"-DH_{name}_FN={_ident(p.handlers[0])}")
            if p.handler_slot_arg is not None:  # count changes of the memslot argument
                flags.append(f"-DH_{name}_SLOT_ARG={int(p.handler_slot_arg)}")
        fn = cbs[0]
        if op == Op.UNMAP:
            pos = arg_pos(facts, fn, "range")
            if pos is None:
                raise KvmtraceError(f"cannot find the range argument of {fn} in BTF")
            flags.append(f"-DCB_UNMAP_RANGE_ARG={pos}")
            for d in ("OFF_RANGE_START", "OFF_RANGE_END"):
                if d not in defines:
                    raise KvmtraceError(f"{d} (struct mmu_notifier_range offset) unknown: no BTF for it")
        elif op == Op.AGE:
            s, e = arg_pos(facts, fn, "start"), arg_pos(facts, fn, "end")
            if s is None or e is None:
                raise KvmtraceError(f"cannot find start/end arguments of {fn} in BTF")
            flags += [f"-DCB_AGE_START_ARG={s}", f"-DCB_AGE_END_ARG={e}"]
        else:
            s = arg_pos(facts, fn, "address", "start")
            e = arg_pos(facts, fn, "end")
            if s is None:
                raise KvmtraceError(f"cannot find the address argument of {fn} in BTF")
            flags += [f"-DCB_{name}_START_ARG={s}", f"-DCB_{name}_END_ARG={-1 if e is None else e}"]
    if any_tp_hva:
        flags.append("-DEVENTS_TP_HVA")
    ms = plan.for_op("memslot_update")
    if ms is not None and ms.available:
        if ms.attach == "tracepoint":
            flags.append("-DMS_TP")
        else:
            exact_modes.add(ms.attach)
            if not ms.callbacks:
                raise KvmtraceError("probe plan for memslot updates names no function")
            outer = _ident(ms.callbacks[0])
            flags += ["-DMS_EXACT", f"-DMS_OUTER_FN={outer}"]
            if ms.handlers and ms.change_arg is not None:
                flags += [f"-DMS_SET_FN={_ident(ms.handlers[0])}", f"-DSET_MEMSLOT_CHANGE_ARG={int(ms.change_arg)}"]
                defines.pop("SET_MEMSLOT_CHANGE_ARG", None)
            else:  # change type derived in userspace from the mirrored slot table
                flags.append("-DMS_DERIVE")
            params = _params(facts, outer)
            flags.append(f"-DMS_OUTER_NARGS={len(params) if params is not None else 2}")
    if any(f.startswith("-DHVA_EXACT_") for f in flags) and exact_task_storage(facts):
        flags.append("-DCB_TASK_STORAGE")
    if len(exact_modes) > 1:
        raise KvmtraceError(f"one run uses one exact attach mode, plan mixes {sorted(exact_modes)}")
    if exact_modes:
        if "OFF_KVM_MMU_NOTIFIER" not in defines and any(
            (plan.for_op(o.label) and plan.for_op(o.label).attach in ("kprobe", "fentry")) for o in Op
        ):
            raise KvmtraceError("offset of struct kvm.mmu_notifier unknown: no BTF for struct kvm")
        if exact_modes == {"fentry"}:
            flags.append("-DMODE_FENTRY")
            if fentry_module:
                flags.append(f"-DFENTRY_MODULE={_ident(fentry_module)}")
    linear = 1 if plan.linear_scan else 0
    defines.setdefault("LINEAR_SCAN", linear)
    # linear-scan kernels: the memslot count (= slots scanned) is read at every callback
    count = linear and all(k in defines for k in ("OFF_KVM_MEMSLOTS", "NR_AS", "OFF_MEMSLOTS_USED"))
    defines["READ_MEMSLOTS"] = 1 if count else 0
    if exact_modes and plan.vm_lifetime:
        init, destroy = (_ident(f) for f in plan.vm_lifetime)
        flags += ["-DVM_LIFE", f"-DVM_INIT_FN={init}", f"-DVM_DESTROY_FN={destroy}"]
    for k, v in sorted(defines.items()):
        _ident(k)
        flags.append(f"-D{k}={int(v)}")
    if pid is not None:
        flags.append(f"-DPID_FILTER={int(pid)}")
    if events or any_tp_hva:
        flags.append("-DEVENTS")
    if events and any_tp_hva:
        flags.append("-DEVENTS_LAT")
    if ringbuf:
        pages = int(ringbuf_pages)
        if pages <= 0 or pages & (pages - 1):
            raise KvmtraceError(f"ring buffer pages must be a power of two, not {pages}")
        flags += ["-DUSE_RINGBUF", f"-DRINGBUF_PAGES={pages}"]
    return flags


def source() -> str:
    """The BPF C source, from the package data, after the record definitions generated from
    tracer/records.py (the one definition of struct event)."""
    from .records import c_header

    try:
        from importlib.resources import files  # Python 3.9+

        return c_header() + files("kvmtrace.bpf").joinpath("kvmtrace.c").read_text()
    except (ImportError, AttributeError):  # pragma: no cover
        import pkgutil

        return c_header() + pkgutil.get_data("kvmtrace.bpf", "kvmtrace.c").decode()


