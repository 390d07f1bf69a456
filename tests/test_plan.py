"""Probe-plan resolver over kernel fixtures (tests/fixtures/kernels): no root needed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvmtrace.tracer.kernel import facts_from_json
from kvmtrace.tracer.plan import resolve, set_memslot_change_arg

FIX = Path(__file__).parent / "fixtures" / "kernels"


def facts(name, **over):
    f = facts_from_json(json.loads((FIX / f"{name}.json").read_text()))
    return dataclasses.replace(f, **over) if over else f


def skipped(op):
    return {s.alternative: s.reason for s in op.skipped}


def test_this_host_6_18_tracepoints_only():
    p = resolve(facts("6.18-builtin-host"))
    assert p.linear_scan is False and "hva_node" in p.linear_scan_reason
    for name, tp in (("unmap", "kvm:kvm_unmap_hva_range"), ("age", "kvm:kvm_age_hva"),
                     ("test_age", "kvm:kvm_test_age_hva")):
        op = p.for_op(name)
        assert (op.attach, op.latency, op.slots, op.tracepoints) == ("tracepoint", "syscall", "derived", (tp,))
        sk = skipped(op)
        assert sk["__kvm_handle_hva_range"] == "always inline, no symbol; probing its callers"
        assert any(r == "fentry: load refused (EPERM)" for r in sk.values())
        assert any(r == "kprobe: CONFIG_KPROBES off" for r in sk.values())
    mem = p.for_op("memslot_update")
    assert mem.attach == "tracepoint" and mem.latency == "syscall" and mem.slots == "derived"
    assert mem.tracepoints == ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit")
    assert "static kvm_set_memory_region in 6.14" in skipped(mem)["__kvm_set_memory_region"]
    cp = p.for_op("change_pte")
    assert cp.attach == "none" and all("6.10" in s.reason for s in cp.skipped)
    d = dict(p.defines)
    assert {k: d[k] for k in ("OFF_RANGE_START", "OFF_RANGE_END", "SET_MEMSLOT_CHANGE_ARG", "LINEAR_SCAN")} == {
        "OFF_RANGE_START": 8, "OFF_RANGE_END": 16, "SET_MEMSLOT_CHANGE_ARG": 3, "LINEAR_SCAN": 0}
    assert not any(k.startswith("OFF_SLOT") or k == "NR_AS" for k in d)  # interval tree: no walk defines
    assert p.problems == ()  # change_pte being gone is not a problem


def test_this_host_with_kprobes_and_fentry_would_be_exact():
    p = resolve(facts("6.18-builtin-host", fentry=True, fentry_reason="ok"))
    op = p.for_op("unmap")
    assert (op.attach, op.latency, op.slots, op.scanned) == ("fentry", "exact", "exact", "none")
    assert op.callbacks == ("kvm_mmu_notifier_invalidate_range_start",)
    assert op.handlers == ("kvm_unmap_gfn_range",) and op.slots_method == "handler"
    mem = p.for_op("memslot_update")
    # 6.14+: __kvm_set_memory_region became the static kvm_set_memory_region
    assert (mem.attach, mem.target, mem.change_func, mem.change_arg) == (
        "fentry", "kvm_set_memory_region", "kvm_set_memslot", 3)


def test_debian12_6_1_lab_capture_kprobes():
    p = resolve(facts("6.1-debian-module"))
    assert p.linear_scan is False
    for name in ("unmap", "age", "test_age", "change_pte"):
        op = p.for_op(name)
        assert (op.attach, op.latency, op.slots) == ("kprobe", "exact", "exact"), name
        assert any(a.startswith("fentry") and r.startswith("fentry on module kvm: bcc lacks module BTF support")
                   for a, r in skipped(op).items())
    assert p.for_op("change_pte").handlers == ("kvm_set_spte_gfn",)
    assert p.for_op("age").callbacks == ("kvm_mmu_notifier_clear_flush_young", "kvm_mmu_notifier_clear_young")
    mem = p.for_op("memslot_update")
    assert (mem.attach, mem.target, mem.change_arg, mem.slots) == ("kprobe", "__kvm_set_memory_region", 3, "exact")
    d = dict(p.defines)
    assert d["SET_MEMSLOT_CHANGE_ARG"] == 3 and d["LINEAR_SCAN"] == 0
    assert d["OFF_RANGE_START"] == 16 and d["OFF_RANGE_END"] == 24  # from the real 6.1 BTF
    assert "OFF_SLOT_UADDR" not in d  # walk defines only on linear-scan kernels


def test_debian13_6_12_lab_capture_module_fentry():
    p = resolve(facts("6.12-debian-module"))
    assert p.for_op("unmap").attach == "fentry"
    assert p.for_op("change_pte").attach == "none"
    assert p.for_op("memslot_update").target == "__kvm_set_memory_region"


def test_modes_restrict():
    p = resolve(facts("6.12-debian-module"), modes=("kprobe", "tracepoint"))
    op = p.for_op("unmap")
    assert op.attach == "kprobe"
    assert any("not among the requested modes" in r for r in skipped(op).values())
    p = resolve(facts("6.12-debian-module"), modes=("tracepoint",))
    assert p.modes == ["tracepoint"]
    with pytest.raises(ValueError):
        resolve(facts("6.12-debian-module"), modes=("uprobe",))


def test_5_15_linear_scan_with_gfn_handlers():
    p = resolve(facts("5.15-ubuntu-module"))
    assert p.linear_scan is True and "used_slots" in p.linear_scan_reason
    op = p.for_op("unmap")
    assert (op.attach, op.slots, op.scanned, op.slots_method) == ("kprobe", "exact", "exact", "handler")
    assert op.handler_slot_arg is None  # gfn handlers: one call per slot
    d = dict(p.defines)
    assert d["SET_MEMSLOT_CHANGE_ARG"] == 5 and d["LINEAR_SCAN"] == 1
    # the memslot count (= slots scanned) is read from used_slots: no per-slot walk, no slot layout
    assert {"OFF_KVM_MEMSLOTS", "NR_AS", "OFF_MEMSLOTS_USED"} <= set(d)
    assert not any(k.startswith("OFF_SLOT") or k in ("SIZEOF_MEMSLOT", "OFF_MEMSLOTS_ARRAY") for k in d)
    assert "__kvm_handle_hva_range, virt/kvm/kvm_main.c" in p.linear_scan_reason


def test_5_10_full_btf_counts_slots_from_rmap_handlers():
    p = resolve(facts("5.10-btf-builtin"))
    for name, h in (("unmap", "kvm_unmap_rmapp"), ("age", "kvm_age_rmapp"), ("test_age", "kvm_test_age_rmapp"),
                    ("change_pte", "kvm_set_pte_rmapp")):
        op = p.for_op(name)
        assert (op.attach, op.slots, op.scanned, op.slots_method) == ("fentry", "exact", "exact", "handler"), name
        assert op.handlers == (h,) and op.handler_slot_arg == 2  # (kvm, rmap_head, slot, ...)
    assert "__kvm_handle_hva_range" not in skipped(p.for_op("unmap"))  # no generic walker before 5.13
    assert p.for_op("memslot_update").change_arg == 5
    d = dict(p.defines)
    assert (d["OFF_KVM_MEMSLOTS"], d["NR_AS"]) == (48, 2)
    assert "kvm_handle_hva_range, arch/x86/kvm/mmu/mmu.c" in p.linear_scan_reason
    assert p.vm_lifetime == ("kvm_arch_init_vm", "kvm_arch_destroy_vm")


def test_5_10_without_rmap_handlers_has_no_slots_figure():
    f = facts("5.10-btf-builtin")
    syms = {k: v for k, v in f.kallsyms.items() if not k.endswith("_rmapp")}
    op = resolve(dataclasses.replace(f, kallsyms=syms)).for_op("unmap")
    assert (op.attach, op.slots, op.scanned, op.handlers) == ("fentry", "none", "exact", ())
    assert any("slots visited unavailable" in n for n in op.notes)


def test_5_10_debian_no_module_btf():
    p = resolve(facts("5.10-debian-module"))
    assert p.linear_scan is True and "version only" in p.linear_scan_reason
    op = p.for_op("unmap")
    # slots visited from the rmap handlers (memslot argument position by the 5.x prototype)
    assert (op.attach, op.latency, op.slots, op.scanned) == ("kprobe", "exact", "exact", "none")
    assert op.handlers == ("kvm_unmap_rmapp",) and op.handler_slot_arg == 2
    assert any("not verified by BTF" in n for n in op.notes)
    assert any("argument positions" in n and "not verified" in n for n in op.notes)
    # kvm_set_memslot's `change` by version: argument 5 on 5.7-5.12
    mem = p.for_op("memslot_update")
    assert (mem.attach, mem.slots, mem.change_arg, mem.change_func) == ("kprobe", "exact", 5, "kvm_set_memslot")
    assert any("by kernel version 5.10" in n for n in mem.notes)
    d = dict(p.defines)
    assert d["SET_MEMSLOT_CHANGE_ARG"] == 5
    assert "OFF_KVM_MEMSLOTS" not in d  # never guessed: this fixture has no layout for struct kvm
    assert any("slots scanned" in pr for pr in p.problems)
    assert all(fix for _, fix in p.remedies)


@pytest.mark.parametrize("release,pos", [("5.7.0", 5), ("5.12.19", 5), ("5.13.0", None), ("5.15.0-91-generic", None),
                                         ("5.16.20", None), ("5.17.0", 3), ("6.1.0-57-amd64", 3), ("5.6.0", None)])
def test_change_arg_by_version_only_where_the_version_decides(release, pos):
    f = facts("5.10-debian-module", release=release)
    got, how = set_memslot_change_arg(f)
    assert got == pos, how
    if pos is None:
        assert "unknown" in how
        mem = resolve(f).for_op("memslot_update")
        assert (mem.slots, mem.change_arg) == ("derived", None)


def test_change_arg_btf_wins_over_version():
    f = facts("5.10-debian-module", btf_funcs={"kvm_set_memslot": ("kvm", "mem", "new", "as_id", "change")})
    assert set_memslot_change_arg(f) == (4, "BTF parameter name")


def test_vm_lifetime_probed_in_exact_modes_only():
    assert resolve(facts("6.1-debian-module")).vm_lifetime == ("kvm_arch_init_vm", "kvm_arch_destroy_vm")
    tp = resolve(facts("6.18-builtin-host"))
    assert tp.vm_lifetime == () and "no exact-mode probe" in tp.vm_lifetime_reason
    f = facts("6.1-debian-module")
    syms = {k: v for k, v in f.kallsyms.items() if k != "kvm_arch_destroy_vm"}
    p = resolve(dataclasses.replace(f, kallsyms=syms))
    assert p.vm_lifetime == () and "merges the two" in p.vm_lifetime_reason


def test_no_btf_at_all_is_unknown_not_absent():
    p = resolve(facts("6.1-debian-module", btf_funcs=None, btf_structs=None, btf_sizes=None, btf_arrays=None,
                      btf_modules=()))
    op = p.for_op("unmap")
    assert op.attach == "kprobe" and op.slots == "exact"  # kallsyms still has the symbols
    sk = skipped(op)
    assert any("no BTF" in r for r in sk.values())
    assert "by kernel version only" in p.linear_scan_reason
    assert dict(p.defines) == {"LINEAR_SCAN": 0, "SET_MEMSLOT_CHANGE_ARG": 3}  # 5.17+: by version
    mem = p.for_op("memslot_update")
    assert mem.slots == "exact" and mem.change_arg == 3
    assert any(pr.startswith("no BTF") for pr in p.problems)


def test_inlined_symbol_named_when_btf_knows_it():
    f = facts("6.1-debian-module")
    syms = dict(f.kallsyms)
    del syms["kvm_set_memslot"]
    p = resolve(dataclasses.replace(f, kallsyms=syms))
    mem = p.for_op("memslot_update")
    assert "inlined everywhere" in skipped(mem)["kvm_set_memslot"]
    assert mem.slots == "derived" and mem.attach == "kprobe"


def test_compiler_clone_is_not_probed_silently():
    f = facts("6.1-debian-module")
    syms = dict(f.kallsyms)
    del syms["kvm_mmu_notifier_invalidate_range_start"]
    p = resolve(dataclasses.replace(f, kallsyms=syms, kallsyms_clones={
        "kvm_mmu_notifier_invalidate_range_start": "kvm_mmu_notifier_invalidate_range_start.isra.0"}))
    op = p.for_op("unmap")
    assert op.attach == "tracepoint"
    assert any("compiler clone" in r for r in skipped(op).values())


def test_nothing_traceable():
    p = resolve(facts("6.18-builtin-host", tracepoints=()))
    assert not p.for_op("unmap").available
    assert any(pr.startswith("unmap: cannot be traced") for pr in p.problems)
