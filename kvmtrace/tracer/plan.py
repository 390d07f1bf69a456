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
    tracepoints: Tuple[str, ...] = ()  # "kvm:kvm_unmap_hva_range", "raw_syscalls:sys_enter", ...
    kprobes: Optional[bool] = None  # kprobe attach possible (CONFIG_KPROBES and not blocked)
    kprobes_reason: str = ""
    fentry: Optional[bool] = None  # a trial fentry load succeeded
    fentry_reason: str = ""
    module_fentry: Optional[bool] = None  # bcc can attach fentry to module functions (MODULE_KFUNC_PROBE)
    module_fentry_reason: str = ""
    ringbuf: Optional[bool] = None  # BPF ring buffer usable (5.8+)
    is_root: bool = True
    # struct name -> {member name: element count} for array members (e.g. kvm.memslots)
    btf_arrays: Optional[Dict[str, Dict[str, int]]] = None
    # kallsyms: base name -> compiler clone actually present ("kvm_set_memslot.isra.0"), recorded
    # only when the plain name is absent (a clone may have an altered signature)
    kallsyms_clones: Dict[str, str] = field(default_factory=dict)
    # where btf_structs/btf_sizes/btf_arrays came from when not (only) BTF, e.g.
    # "exact kernel headers at /usr/src/linux-headers-5.10.0-35-amd64" (no module BTF before 5.11)
    layout_source: str = ""


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
    attach: str  # "fentry", "kprobe", "tracepoint", or "none" when the op cannot be traced here
    target: str  # the callback/function or tracepoint(s) attached for entry/exit
    latency: str  # provenance: "exact", "syscall", "derived" or "none"
    slots: str  # provenance as for latency (for memslot: provenance of the change type)
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
    # memslot: the function whose `change` argument is read (kvm_set_memslot); "" when none
    change_func: str = ""
    # hva: how slots visited are counted: "handler" (per-slot handler calls nested in the
    # callback: once per call on 5.13+, once per distinct `slot` argument for the per-rmap
    # handlers before 5.13, see handler_slot_arg), "mirror" (tracepoint mode), "" (not available)
    slots_method: str = ""
    # position of the handlers' memslot argument when they run once per rmap rather than once
    # per slot (5.10's arch rmap handlers); None: every handler call is one slot
    handler_slot_arg: Optional[int] = None
    # parameter names (from BTF) of every function attached, for argument positions by name
    params: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

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
    linear_scan_reason: str = ""  # how linear_scan was decided (BTF feature, or version)
    remedies: Tuple[Tuple[str, str], ...] = ()  # (problem, fix) for every entry of problems
    # exact modes: (creation, destruction) functions probed so that each VM's lifetime is its
    # own identity (a struct kvm address reused by a later VM is another VM); () when not
    vm_lifetime: Tuple[str, ...] = ()
    vm_lifetime_reason: str = ""

    def define(self, name: str) -> Optional[int]:
        for k, v in self.defines:
            if k == name:
                return v
        return None

    def for_op(self, op: str) -> Optional[OpPlan]:
        for p in self.ops:
            if p.op == op:
                return p
        return None

    @property
    def modes(self) -> List[str]:
        return sorted({p.attach for p in self.ops if p.available})


# ------------------------------------------------------------------------------------------
# Compatibility tables. Every kernel difference kvmtrace knows about is here, with the change
# that made it necessary (see DESIGN.md section 2). Decisions are by feature (kallsyms, BTF,
# tracefs, trial loads); the release number is used only where no feature can tell, and the
# plan then says so.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HvaSpec:
    op: str
    # MMU-notifier callbacks in virt/kvm/kvm_main.c (entry + exit give the latency)
    callbacks: Tuple[str, ...]
    # per-slot handlers called once per overlapping memslot from __kvm_handle_hva_range
    # (5.13+, "KVM: Move x86's MMU notifier memslot walkers to generic code")
    gfn_handlers: Tuple[str, ...]
    # before 5.13 the callbacks call one arch function per operation, which walks the memslots
    # itself (x86: kvm_handle_hva_range in arch/x86/kvm/mmu/mmu.c)
    hva_handlers: Tuple[str, ...]
    # trace events at the top of the callback (generic since 5.13; x86 had none before)
    tracepoints: Tuple[str, ...]
    gone: str = ""  # when the op disappeared from the kernel
    # before 5.13 (x86): the handler kvm_handle_hva_range calls for every rmap (gfn, level) of
    # each memslot overlapping the range, slot after slot, with that memslot as its `slot`
    # argument: (kvm, rmap_head, slot, gfn, level, data). Counting the changes of `slot` over
    # these calls gives the slots visited exactly, at a cost that follows the kernel's own work
    # (pages unmapped) and not the memslot count.
    rmap_handlers: Tuple[str, ...] = ()


HVA_SPECS: Tuple[HvaSpec, ...] = (
    HvaSpec(
        "unmap",
        ("kvm_mmu_notifier_invalidate_range_start",),
        ("kvm_unmap_gfn_range",),
        ("kvm_unmap_hva_range",),
        ("kvm:kvm_unmap_hva_range",),
        rmap_handlers=("kvm_unmap_rmapp",),
    ),
    HvaSpec(
        "age",
        ("kvm_mmu_notifier_clear_flush_young", "kvm_mmu_notifier_clear_young"),
        ("kvm_age_gfn",),
        ("kvm_age_hva",),
        ("kvm:kvm_age_hva",),
        rmap_handlers=("kvm_age_rmapp",),
    ),
    HvaSpec(
        "test_age",
        ("kvm_mmu_notifier_test_young",),
        ("kvm_test_age_gfn",),
        ("kvm_test_age_hva",),
        ("kvm:kvm_test_age_hva",),
        rmap_handlers=("kvm_test_age_rmapp",),
    ),
    HvaSpec(
        "change_pte",
        ("kvm_mmu_notifier_change_pte",),
        ("kvm_set_spte_gfn",),
        ("kvm_set_spte_hva",),
        ("kvm:kvm_set_spte_hva",),
        gone="the change_pte notifier, kvm_set_spte_gfn and the kvm_set_spte_hva event were removed in 6.10",
        rmap_handlers=("kvm_set_pte_rmapp",),
    ),
)

# The memslot walker the callbacks share is __always_inline (5.13+), renamed in 6.15: there is
# never a symbol to probe, so its callers are probed instead.
HVA_WALKERS = ("__kvm_handle_hva_range", "kvm_handle_hva_range")

# kvm_set_memslot's `change` argument (the memslot update's change type). Its position is
# taken from BTF by parameter name where the kernel has BTF for KVM; otherwise by version, for
# the ranges where the version alone decides it:
#   5.7-5.12  kvm_set_memslot(kvm, mem, old, new, as_id, change): change is argument 5. The
#             function appeared in 5.7 with Sean Christopherson's memslot series ("KVM: Move
#             memslot deletion to helper function" / "KVM: Dynamically size memslot array").
#   5.13-5.16 ambiguous: "KVM: Ensure local memslot copies operate on up-to-date arch-specific
#             data" (Fixes: b10a038e84d1 "KVM: mmu: Add slots_arch_lock for memslot arch fields",
#             5.13; Cc: stable) removed `old`, giving (kvm, mem, new, as_id, change) with change
#             at 4, in 5.16 and in the stable trees it was backported to: only BTF can tell.
#   5.17+     kvm_set_memslot(kvm, old, new, change): change is argument 3 (the "KVM: Scalable
#             memslots implementation" series reworked memslot updates around old/new slots).
SET_MEMSLOT = "kvm_set_memslot"
SET_MEMSLOT_CHANGE_PARAM = "change"
SET_MEMSLOT_CHANGE_BY_VERSION = (((5, 7), (5, 12), 5), ((5, 17), (99, 99), 3))

# The memslot count on linear-scan kernels (before 5.17), and why it is the number of slots every
# hva lookup scans. Each address space's memslots are a sorted array of used_slots entries
# (struct kvm_memslots: used_slots, memslots[]), and the lookup for an hva range visits them all:
#   to 5.12 (x86) kvm_handle_hva_range() in arch/x86/kvm/mmu/mmu.c (Debian 11: 5.10): for each address space i <
#             KVM_ADDRESS_SPACE_NUM, kvm_for_each_memslot(memslot, __kvm_memslots(kvm, i)), which
#             (include/linux/kvm_host.h) runs memslot over slots->memslots[0 .. used_slots).
#   5.13-5.16 __kvm_handle_hva_range() in virt/kvm/kvm_main.c: the same two loops, now generic.
#   5.17+     an interval tree on hva (kvm_for_each_memslot_in_hva_range): no linear scan.
# So slots scanned per callback = the sum of used_slots over the address spaces (NR_AS = the
# element count of kvm.memslots), read once per callback: 2 reads per address space.
LINEAR_SCAN_LOOPS = {
    (0, 0): "kvm_handle_hva_range, arch/x86/kvm/mmu/mmu.c: every used slot of each address space",
    (5, 13): "__kvm_handle_hva_range, virt/kvm/kvm_main.c: every used slot of each address space",
}

# VM lifetimes (exact modes): kvm_arch_init_vm(kvm, type) is called once per VM by the static
# kvm_create_vm(), kvm_arch_destroy_vm(kvm) once by the static kvm_destroy_vm() (also on
# kvm_create_vm's error path after arch init); both are global arch functions (arch/x86/kvm/x86.c)
# on every kernel kvmtrace supports, while kvm_create_vm/kvm_destroy_vm may be inlined.
VM_LIFETIME = ("kvm_arch_init_vm", "kvm_arch_destroy_vm")
# Enclosing functions timed for whole-update latency, best first. All take (kvm, mem).
#   __kvm_set_memory_region: exported, up to 6.13.
#   kvm_set_memory_region: 6.14+ the old __kvm_set_memory_region became this static function
#     (on older kernels it is the exported locking wrapper of __kvm_set_memory_region; both
#     enclose the whole update).
#   kvm_vm_ioctl_set_memory_region: the ioctl handler (often inlined into kvm_vm_ioctl).
REGION_FUNCS = ("__kvm_set_memory_region", "kvm_set_memory_region", "kvm_vm_ioctl_set_memory_region")
# The raw syscall hooks of tracepoint mode: the hva ops' latency and the memslot ioctls (the
# classic syscalls:sys_*_ioctl events would tax every system call of every task with perf's
# syscall handlers: kvmtrace.c)
SYSCALL_TRACEPOINTS = ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit")

# Functions and structs whose BTF the resolver (and the BPF code) needs; kernel.py gathers these.
FUNCS_OF_INTEREST: Tuple[str, ...] = tuple(
    dict.fromkeys(
        [f for s in HVA_SPECS for f in s.callbacks + s.gfn_handlers + s.hva_handlers + s.rmap_handlers]
        + list(HVA_WALKERS)
        + [SET_MEMSLOT]
        + list(REGION_FUNCS)
        + list(VM_LIFETIME)
    )
)
STRUCTS_OF_INTEREST: Dict[str, Tuple[str, ...]] = {
    "mmu_notifier_range": ("start", "end"),
    "kvm": ("memslots", "mmu_notifier"),  # mmu_notifier: struct kvm * from the callback's mn
    # used_slots/memslots only exist on linear-scan kernels (sorted array, before 5.17)
    "kvm_memslots": ("used_slots", "memslots", "generation"),
    # hva_node only exists on interval-tree kernels (5.17+)
    "kvm_memory_slot": ("userspace_addr", "npages", "id", "as_id", "base_gfn", "flags", "hva_node"),
}
TRACEPOINTS_OF_INTEREST: Tuple[str, ...] = tuple(
    [t for s in HVA_SPECS for t in s.tracepoints] + list(SYSCALL_TRACEPOINTS)
)

MODES = ("fentry", "kprobe", "tracepoint")

# Why a function or trace event may be missing: the kernel change behind it.
HISTORY: Dict[str, str] = {
    "__kvm_handle_hva_range": "__always_inline memslot walker, 5.13+",
    "kvm_handle_hva_range": "the 6.15 name of the __always_inline walker",
    "kvm_mmu_notifier_change_pte": "change_pte notifier removed in 6.10",
    "kvm_set_spte_gfn": "removed with change_pte in 6.10",
    "kvm_set_spte_hva": "arch function before 5.13, then kvm_set_spte_gfn",
    "kvm_unmap_hva_range": "arch function before 5.13, replaced by kvm_unmap_gfn_range",
    "kvm_age_hva": "arch function before 5.13, replaced by kvm_age_gfn",
    "kvm_test_age_hva": "arch function before 5.13, replaced by kvm_test_age_gfn",
    "kvm_unmap_gfn_range": "5.13+ (generic memslot walkers); older kernels call kvm_unmap_hva_range",
    "kvm_age_gfn": "5.13+; older kernels call kvm_age_hva",
    "kvm_test_age_gfn": "5.13+; older kernels call kvm_test_age_hva",
    "__kvm_set_memory_region": "became the static kvm_set_memory_region in 6.14",
    "kvm_vm_ioctl_set_memory_region": "static, usually inlined into kvm_vm_ioctl",
    "kvm_set_memslot": "5.7+; static, may be inlined",
    "kvm_unmap_rmapp": "x86 rmap handler before 5.13 (static, called through a pointer)",
    "kvm_age_rmapp": "x86 rmap handler before 5.13",
    "kvm_test_age_rmapp": "x86 rmap handler before 5.13",
    "kvm_set_pte_rmapp": "x86 rmap handler before 5.13",
    "kvm:kvm_set_spte_hva": "removed with change_pte in 6.10",
    "kvm:kvm_unmap_hva_range": "generic trace event since 5.13; x86 had none before",
    "kvm:kvm_age_hva": "generic trace event since 5.13; x86 had none before",
    "kvm:kvm_test_age_hva": "generic trace event since 5.13; x86 had none before",
    "raw_syscalls:sys_enter": "needs CONFIG_FTRACE_SYSCALLS",
    "raw_syscalls:sys_exit": "needs CONFIG_FTRACE_SYSCALLS",
}


def _hist(name: str) -> str:
    h = HISTORY.get(name)
    return f" ({h})" if h else ""
INTERVAL_TREE_SINCE = (5, 17)  # "KVM: Keep memslots in tree-based structures instead of array-based ones"


def parse_release(release: str) -> Optional[Tuple[int, int]]:
    import re

    m = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


class _Ctx:
    """Per-resolve helpers over the facts."""

    def __init__(self, facts: KernelFacts, modes):
        self.f = facts
        self.modes = tuple(m for m in MODES if m in set(modes))

    # --- symbols ------------------------------------------------------------------------

    def sym(self, name: str) -> bool:
        return name in self.f.kallsyms

    def module(self, name: str) -> str:
        return self.f.kallsyms.get(name, "")

    def btf_known(self, name: str) -> Optional[bool]:
        if self.f.btf_funcs is None:
            return None
        return name in self.f.btf_funcs

    def params(self, name: str) -> Optional[Tuple[str, ...]]:
        if self.f.btf_funcs is None:
            return None
        return self.f.btf_funcs.get(name)

    def why_missing(self, name: str) -> str:
        """Why a function has no kallsyms entry: inlined (BTF knows it) or absent."""
        clone = self.f.kallsyms_clones.get(name)
        if clone:
            return f"{name}: only the compiler clone {clone} exists (signature may be altered); not probed"
        known = self.btf_known(name)
        if known:
            return f"{name}: in BTF but not in kallsyms: inlined everywhere, no symbol to attach to"
        if known is None:
            return f"{name}: not in kallsyms (no BTF to tell inlined from absent){_hist(name)}"
        return f"{name}: not in kallsyms nor in BTF: absent from this kernel{_hist(name)}"

    # --- attach modes --------------------------------------------------------------------

    def mode_refusal(self, mode: str, funcs: Tuple[str, ...]) -> Optional[str]:
        """None when every function of ``funcs`` can be attached in ``mode``, else why not."""
        f = self.f
        if mode not in self.modes:
            return f"{mode}: not among the requested modes ({','.join(self.modes) or 'none'})"
        for fn in funcs:
            if not self.sym(fn):
                return self.why_missing(fn)
        if mode == "fentry":
            if f.btf_funcs is None:
                return "fentry: no BTF (fentry needs the functions' BTF)"
            for fn in funcs:
                mod = self.module(fn)
                if mod:
                    if f.module_fentry is not True:
                        why = f.module_fentry_reason or "bcc lacks module BTF support"
                        return f"fentry on module {mod}: {why}"
                elif f.fentry is False:
                    return f"fentry: {f.fentry_reason or 'trial load failed'}"
                elif f.fentry is None:
                    return f"fentry: not verified ({f.fentry_reason or 'no trial load was made'})"
                if fn not in f.btf_funcs:
                    return f"fentry: {fn} has no BTF prototype"
            return None
        if mode == "kprobe":
            if f.kprobes is False:
                return f"kprobe: {f.kprobes_reason or 'unavailable'}"
            if f.kprobes is None:
                return f"kprobe: availability unknown ({f.kprobes_reason or 'not checked'})"
            return None
        return None

    def tracepoints_refusal(self, tps: Tuple[str, ...]) -> Optional[str]:
        if "tracepoint" not in self.modes:
            return f"tracepoint: not among the requested modes ({','.join(self.modes) or 'none'})"
        have = set(self.f.tracepoints)
        missing = [t for t in tps if t not in have]
        if missing:
            return f"tracepoint {', '.join(missing)}: not present on this kernel{_hist(missing[0])}"
        return None


def _linear_scan(facts: KernelFacts) -> Tuple[Optional[bool], str]:
    """Is the hva -> memslot lookup a linear scan (before 5.17)? By BTF feature first."""
    st = facts.btf_structs
    if st is not None:
        slot = st.get("kvm_memory_slot")
        slots = st.get("kvm_memslots")
        if slot is not None and "hva_node" in slot:
            return False, "BTF: kvm_memory_slot.hva_node present (interval tree on hva, 5.17+)"
        if slots is not None and "used_slots" in slots:
            return True, "BTF: kvm_memslots.used_slots present (sorted memslot array, linear scan)"
    v = parse_release(facts.release)
    if v is None:
        return None, "unknown: no BTF for struct kvm_memslots and an unparsable release"
    lin = v < INTERVAL_TREE_SINCE
    return lin, (
        f"by kernel version only (no BTF for kvm_memory_slot/kvm_memslots): {v[0]}.{v[1]} "
        f"{'<' if lin else '>='} 5.17"
    )


def _offset(facts: KernelFacts, struct: str, member: str) -> Optional[int]:
    if facts.btf_structs is None:
        return None
    return facts.btf_structs.get(struct, {}).get(member)


def _defines(facts: KernelFacts, linear: Optional[bool]) -> Tuple[List[Tuple[str, int]], List[str]]:
    """BPF defines from BTF (never guessed) and the problems of missing ones."""
    out: List[Tuple[str, int]] = []
    missing: List[str] = []

    def put(name, value, what):
        if value is None:
            missing.append(f"{name} ({what})")
        else:
            out.append((name, int(value)))

    put("OFF_RANGE_START", _offset(facts, "mmu_notifier_range", "start"), "mmu_notifier_range.start")
    put("OFF_RANGE_END", _offset(facts, "mmu_notifier_range", "end"), "mmu_notifier_range.end")
    put("OFF_KVM_MMU_NOTIFIER", _offset(facts, "kvm", "mmu_notifier"), "kvm.mmu_notifier")
    pos, _how = set_memslot_change_arg(facts)
    if pos is not None:
        out.append(("SET_MEMSLOT_CHANGE_ARG", pos))
    else:
        missing.append(f"SET_MEMSLOT_CHANGE_ARG ({SET_MEMSLOT} `change` parameter)")
    if linear is not None:
        out.append(("LINEAR_SCAN", 1 if linear else 0))
    if linear:
        arrays = facts.btf_arrays or {}
        put("OFF_KVM_MEMSLOTS", _offset(facts, "kvm", "memslots"), "kvm.memslots")
        put("NR_AS", arrays.get("kvm", {}).get("memslots"), "element count of kvm.memslots")
        put("OFF_MEMSLOTS_USED", _offset(facts, "kvm_memslots", "used_slots"), "kvm_memslots.used_slots")
    return out, missing


# what the BPF code needs to read the memslot count on linear-scan kernels (LINEAR_SCAN_LOOPS)
_COUNT_DEFINES = ("OFF_KVM_MEMSLOTS", "NR_AS", "OFF_MEMSLOTS_USED")


def set_memslot_change_arg(facts: KernelFacts) -> Tuple[Optional[int], str]:
    """Position of kvm_set_memslot's `change` argument and how it was decided: by BTF parameter
    name when BTF describes the function, else by version where the version decides it
    (SET_MEMSLOT_CHANGE_BY_VERSION); (None, why) otherwise."""
    params = (facts.btf_funcs or {}).get(SET_MEMSLOT)
    if params is not None:
        if SET_MEMSLOT_CHANGE_PARAM in params:
            return params.index(SET_MEMSLOT_CHANGE_PARAM), "BTF parameter name"
        return None, f"BTF prototype of {SET_MEMSLOT} has no `{SET_MEMSLOT_CHANGE_PARAM}` parameter"
    v = parse_release(facts.release)
    if v is not None:
        for lo, hi, pos in SET_MEMSLOT_CHANGE_BY_VERSION:
            if lo <= v <= hi:
                return pos, (f"kernel version {v[0]}.{v[1]} (no BTF for {SET_MEMSLOT}; argument {pos} on "
                             f"{lo[0]}.{lo[1]}-{'' if hi[0] == 99 else f'{hi[0]}.{hi[1]}'})")
    return None, (f"no BTF prototype of {SET_MEMSLOT} and kernel {facts.release}: position of `change` "
                  "unknown ((kvm, mem, old, new, as_id, change) on 5.7-5.12, (kvm, mem, new, as_id, change) "
                  "on some 5.13-5.16 trees, (kvm, old, new, change) on 5.17+)")


RMAP_SLOT_ARG = 2  # (kvm, rmap_head, slot, gfn, level, data): every x86 rmap handler of 5.x


def _arg_pos(ctx: "_Ctx", fn: str, name: str, default: int) -> int:
    params = ctx.params(fn)
    if params is not None and name in params:
        return params.index(name)
    return default


def _resolve_hva(spec: HvaSpec, ctx: _Ctx, linear: Optional[bool], defs: Dict[str, int]) -> OpPlan:
    f = ctx.f
    skipped: List[Skipped] = []
    notes: List[str] = []
    callbacks = tuple(c for c in spec.callbacks if ctx.sym(c))
    for c in spec.callbacks:
        if not ctx.sym(c) and callbacks:
            notes.append(ctx.why_missing(c) + "; its calls are not seen")
    count_ok = all(k in defs for k in _COUNT_DEFINES)
    range_ok = spec.op != "unmap" or ("OFF_RANGE_START" in defs and "OFF_RANGE_END" in defs)

    # per-slot handlers: gfn handlers (5.13+) are called per overlapping memslot; before 5.13 an
    # arch hva function walks the memslots itself.
    gfn = tuple(h for h in spec.gfn_handlers if ctx.sym(h))
    rmap = tuple(h for h in spec.rmap_handlers if ctx.sym(h))
    walker_present = [w for w in HVA_WALKERS if ctx.sym(w)]

    if callbacks:
        if gfn and not walker_present:
            # 5.13+: the callbacks share an __always_inline walker (kvm_handle_hva_range in 6.15+)
            skipped.append(Skipped("__kvm_handle_hva_range", "always inline, no symbol; probing its callers"))
        for mode in ("fentry", "kprobe"):
            handlers: Tuple[str, ...] = ()
            why = ctx.mode_refusal(mode, callbacks)
            if why is not None:
                skipped.append(Skipped(f"{mode} {'+'.join(callbacks)}", why))
                continue
            slots, method, scanned = "none", "", "none"
            slot_arg: Optional[int] = None
            if gfn and ctx.mode_refusal(mode, gfn) is None:
                handlers, slots, method = gfn, "exact", "handler"
            elif rmap and ctx.mode_refusal(mode, rmap) is None:
                # before 5.13: per-rmap handlers with the memslot as argument
                handlers, slots, method = rmap, "exact", "handler"
                slot_arg = _arg_pos(ctx, rmap[0], "slot", RMAP_SLOT_ARG)
                if ctx.params(rmap[0]) is None:
                    notes.append(f"{rmap[0]}: memslot taken from argument {slot_arg}, the position of "
                                 "(kvm, rmap_head, slot, gfn, level, data) on 5.x, not verified by BTF")
            else:
                cands = gfn or rmap or spec.gfn_handlers + spec.rmap_handlers
                notes.append("slots visited unavailable: " + (
                    ctx.mode_refusal(mode, cands) or "no per-slot handler symbol"))
            if linear:
                if count_ok:
                    scanned = "exact"
                else:
                    notes.append("slots scanned unavailable: no BTF offsets for kvm.memslots / "
                                 "kvm_memslots.used_slots")
            if not range_ok:
                notes.append("no BTF offsets for mmu_notifier_range.start/end: range sizes not recorded")
            params = tuple((fn, ctx.params(fn)) for fn in callbacks + handlers if ctx.params(fn) is not None)
            unverified = [fn for fn in callbacks + handlers if ctx.params(fn) is None]
            if unverified:
                notes.append(f"no BTF prototype for {', '.join(unverified)}: argument positions are the "
                             "ones every supported kernel uses, not verified against this one")
            return OpPlan(
                op=spec.op, kind="hva", attach=mode, target="+".join(callbacks), latency="exact",
                slots=slots, callbacks=callbacks, handlers=handlers, scanned=scanned,
                slots_method=method, skipped=tuple(skipped), notes=tuple(notes), params=params,
                handler_slot_arg=slot_arg,
            )
    else:
        reason = "; ".join(ctx.why_missing(c) for c in spec.callbacks)
        for mode in ("fentry", "kprobe"):
            skipped.append(Skipped(f"{mode} {'+'.join(spec.callbacks)}", reason))

    why = ctx.tracepoints_refusal(spec.tracepoints)
    if why is None:
        if linear:
            notes.append("linear-scan kernel: slots scanned = memslot count of the mirrored table")
        return OpPlan(
            op=spec.op, kind="hva", attach="tracepoint", target=",".join(spec.tracepoints),
            latency="syscall", slots="derived", tracepoints=spec.tracepoints,
            scanned="derived" if linear else "none", slots_method="mirror",
            skipped=tuple(skipped), notes=tuple(notes),
        )
    skipped.append(Skipped(f"tracepoint {','.join(spec.tracepoints)}", why))
    return OpPlan(
        op=spec.op, kind="hva", attach="none", target="", latency="none", slots="none",
        skipped=tuple(skipped), notes=tuple(notes),
    )


def _resolve_memslot(ctx: _Ctx) -> OpPlan:
    f = ctx.f
    skipped: List[Skipped] = []
    notes: List[str] = []
    region = ""
    for fn in REGION_FUNCS:
        if ctx.sym(fn):
            region = fn
            break
        skipped.append(Skipped(fn, ctx.why_missing(fn)))
    have_set = ctx.sym(SET_MEMSLOT)
    change_arg, change_how = set_memslot_change_arg(f)
    if not have_set:
        skipped.append(Skipped(SET_MEMSLOT, ctx.why_missing(SET_MEMSLOT)))

    timed = region or (SET_MEMSLOT if have_set else "")
    if timed:
        for mode in ("fentry", "kprobe"):
            funcs = (timed,) + ((SET_MEMSLOT,) if have_set and timed != SET_MEMSLOT else ())
            why = ctx.mode_refusal(mode, funcs)
            if why is not None:
                skipped.append(Skipped(f"{mode} {'+'.join(funcs)}", why))
                continue
            change = "exact" if (have_set and change_arg is not None) else "derived"
            if have_set and change_arg is None:
                notes.append(f"{change_how}; change type derived from a mirrored slot table instead")
            elif have_set and ctx.params(SET_MEMSLOT) is None:
                notes.append(f"`change` is argument {change_arg} of {SET_MEMSLOT}, by {change_how}")
            elif not have_set:
                notes.append("change type derived from a mirrored slot table (no kvm_set_memslot symbol)")
            if timed == SET_MEMSLOT:
                notes.append("no enclosing region function: latency covers kvm_set_memslot only")
            params = tuple((fn, ctx.params(fn)) for fn in funcs if ctx.params(fn) is not None)
            return OpPlan(
                op="memslot_update", kind="memslot", attach=mode, target=timed, latency="exact",
                slots=change, callbacks=(timed,),
                handlers=(SET_MEMSLOT,) if have_set and change == "exact" else (),
                change_arg=change_arg if change == "exact" else None,
                change_func=SET_MEMSLOT if change == "exact" else "",
                skipped=tuple(skipped), notes=tuple(notes), params=params,
            )
    why = ctx.tracepoints_refusal(SYSCALL_TRACEPOINTS)
    if why is None:
        return OpPlan(
            op="memslot_update", kind="memslot", attach="tracepoint", target="ioctl(KVM_SET_USER_MEMORY_REGION/2)",
            latency="syscall", slots="derived", tracepoints=SYSCALL_TRACEPOINTS, slots_method="mirror",
            skipped=tuple(skipped), notes=tuple(notes),
        )
    skipped.append(Skipped(f"tracepoint {','.join(SYSCALL_TRACEPOINTS)}", why))
    return OpPlan(
        op="memslot_update", kind="memslot", attach="none", target="", latency="none", slots="none",
        skipped=tuple(skipped), notes=tuple(notes),
    )


def _fix_for(problem: str, facts: KernelFacts) -> str:
    p = problem.lower()
    if "config_kprobes" in p or "kprobe_events" in p:
        return "boot a kernel built with CONFIG_KPROBES=y (every distribution kernel has it)"
    if "lockdown" in p:
        return "boot with lockdown=none (or without Secure Boot lockdown) to allow kprobes/fentry"
    if "fentry" in p and "module" in p:
        return "install bcc >= 0.31 (MODULE_KFUNC_PROBE support) or use kprobes"
    if "fentry" in p:
        return "kprobes or tracepoints are used instead; for fentry use a kernel that permits BPF trampolines"
    if "btf offsets" in p:
        return ("boot a kernel with BTF for KVM: CONFIG_DEBUG_INFO_BTF=y, and CONFIG_DEBUG_INFO_BTF_MODULES=y "
                "(5.11+) when KVM is a module")
    if "btf" in p:
        return "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (and CONFIG_DEBUG_INFO_BTF_MODULES=y)"
    if "tracepoint" in p and "not present on this kernel" in p:
        return ("this kernel has no such tracepoint: use kprobe or fentry mode (drop --modes, or "
                "include kprobe in it), which needs CONFIG_KPROBES=y or fentry support")
    if "tracepoint" in p or "tracefs" in p:
        return "mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) and use a kernel with CONFIG_FTRACE_SYSCALLS=y"
    return "see `kvmtrace doctor` for the plan of the other ops"


def resolve(facts: KernelFacts, modes=MODES) -> ProbePlan:
    """The probe plan for this kernel: per hva op and for memslot updates, fentry > kprobe >
    tracepoint by feature, each skipped alternative with its reason."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown attach mode(s) {bad}; choose from {MODES}")
    ctx = _Ctx(facts, modes)
    linear, linear_reason = _linear_scan(facts)
    defs, missing = _defines(facts, linear)
    d = dict(defs)
    ops = [_resolve_hva(spec, ctx, linear, d) for spec in HVA_SPECS]
    ops.append(_resolve_memslot(ctx))

    problems: List[str] = []
    if facts.btf_funcs is None:
        problems.append("no BTF: argument positions and struct offsets unknown; exact slot walks "
                        "and range sizes degrade")
    for op in ops:
        spec = next((h for h in HVA_SPECS if h.op == op.op), None)
        gone = spec is not None and spec.gone and not any(ctx.sym(c) for c in spec.callbacks) \
            and not any(t in facts.tracepoints for t in spec.tracepoints)
        if not op.available and not gone:
            problems.append(f"{op.op}: cannot be traced here ({op.skipped[-1].reason if op.skipped else 'no path'})")
    if linear and any(p.attach in ("fentry", "kprobe") for p in ops) and not all(k in d for k in _COUNT_DEFINES):
        problems.append("linear-scan kernel without BTF offsets for the memslot array: slots scanned "
                        "and the memslot count not available; missing " + ", ".join(
                            m for m in missing if m.split(" ", 1)[0] in _COUNT_DEFINES))
    exact = [p for p in ops if p.attach in ("fentry", "kprobe")]
    life: Tuple[str, ...] = ()
    life_reason = "no exact-mode probe in the plan"
    if exact:
        mode = exact[0].attach
        why = ctx.mode_refusal(mode, VM_LIFETIME)
        if why is None:
            life = VM_LIFETIME
            life_reason = f"{mode} {'+'.join(VM_LIFETIME)}: each VM's creation and destruction observed"
        else:
            life_reason = (f"{why}: VMs told apart by struct kvm address and VMM only (an address reused "
                           "by a later VM of the same process merges the two)")
    if facts.layout_source:
        linear_reason += f"; KVM struct layouts from {facts.layout_source}"
    remedies = tuple((p, _fix_for(p, facts)) for p in problems)
    if linear and facts.release:
        v = parse_release(facts.release)
        loop = None
        for since, text in sorted(LINEAR_SCAN_LOOPS.items()):
            if v is not None and v >= since:
                loop = text
        if loop:
            linear_reason += f"; the lookup loop: {loop}"
    return ProbePlan(
        ops=tuple(ops), linear_scan=linear, defines=tuple(defs), problems=tuple(problems),
        linear_scan_reason=linear_reason, remedies=remedies, vm_lifetime=life,
        vm_lifetime_reason=life_reason,
    )
