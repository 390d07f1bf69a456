"""The probe plan: for each hva op and each memslot-update path, what to attach, how, and with
what provenance, plus why each better alternative was skipped.

Pure Python over ``KernelFacts`` (kallsyms names, BTF function prototypes, tracepoint list,
capability flags), so it is unit-tested with fixtures of several kernels without root. Every
kernel-compatibility decision of kvmtrace lives in ``resolve`` (and the tables next to it), each
with the kernel change that made it necessary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class KernelFacts:
    """Inputs of the resolver. ``None`` means *unknown* (e.g. no BTF), never *absent*."""

    release: str
    # symbol name -> module name ("" for vmlinux), from /proc/kallsyms (text symbols only)
    kallsyms: Dict[str, str] = field(default_factory=dict)
    # function name -> ordered parameter names, from BTF FUNC/FUNC_PROTO (vmlinux + modules);
    # None when no BTF is available at all
    btf_funcs: Optional[Dict[str, Tuple[str, ...]]] = None
    # struct name -> {member name: byte offset}, from BTF, for the structs the BPF code reads
    btf_structs: Optional[Dict[str, Dict[str, int]]] = None
    # struct name -> byte size
    btf_sizes: Optional[Dict[str, int]] = None
    # functions that have a BTF FUNC record but are inlined everywhere / not in kallsyms are
    # simply absent from kallsyms; this set names modules that carry their own BTF
    btf_modules: Tuple[str, ...] = ()
    tracepoints: Tuple[str, ...] = ()  # "kvm:kvm_unmap_hva_range", "syscalls:sys_enter_ioctl", ...
    kprobes: Optional[bool] = None  # kprobe attach possible (CONFIG_KPROBES and not blocked)
    kprobes_reason: str = ""
    fentry: Optional[bool] = None  # a trial fentry load succeeded
    fentry_reason: str = ""
    module_fentry: Optional[bool] = None  # bcc can attach fentry to module functions (MODULE_KFUNC_PROBE)
    module_fentry_reason: str = ""
    ringbuf: Optional[bool] = None  # BPF ring buffer usable (5.8+)
    is_root: bool = True


@dataclass(frozen=True)
class Skipped:
    alternative: str  # e.g. "fentry kvm_mmu_notifier_invalidate_range_start"
    reason: str


@dataclass(frozen=True)
class OpPlan:
    """How one hva op (``kind == "hva"``) or the memslot update path (``kind == "memslot"``)
    is traced."""

    op: str  # "unmap", "age", "test_age", "change_pte", or "memslot_update"
    kind: str  # "hva" | "memslot"
    attach: str  # consts.Attach value; "none" when the op cannot be traced here
    target: str  # the callback/function or tracepoint(s) attached for entry/exit
    latency: str  # consts.Provenance value
    slots: str  # consts.Provenance value (for memslot: provenance of the change type)
    # hva: callback functions (entry+exit) and the per-slot handlers counted inside them
    callbacks: Tuple[str, ...] = ()
    handlers: Tuple[str, ...] = ()
    tracepoints: Tuple[str, ...] = ()
    # memslot: function whose `change` argument gives the change type, its position (0-based)
    # and the enclosing function timed for whole-update latency
    change_arg: Optional[int] = None
    scanned: str = "none"  # provenance of slots scanned (linear-scan kernels)
    skipped: Tuple[Skipped, ...] = ()
    notes: Tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.attach != "none"


@dataclass(frozen=True)
class ProbePlan:
    ops: Tuple[OpPlan, ...]
    linear_scan: Optional[bool]  # memslot lookup is a linear scan (kernels before 5.17)
    # struct offsets (from BTF) the BPF code needs, as define name -> value
    defines: Tuple[Tuple[str, int], ...] = ()
    problems: Tuple[str, ...] = ()

    def for_op(self, op: str) -> Optional[OpPlan]:
        for p in self.ops:
            if p.op == op:
                return p
        return None

    @property
    def modes(self) -> List[str]:
        return sorted({p.attach for p in self.ops if p.available})
