"""cflags from probe plans (pure: no root, no bcc)."""

import dataclasses
import json
import os

import pytest

from kvmtrace.errors import KvmtraceError
from kvmtrace.tracer.cflags import build_cflags
from kvmtrace.tracer.kernel import facts_from_json
from kvmtrace.tracer.plan import resolve

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "kernels")


def load(name):
    with open(os.path.join(FIX, name + ".json")) as f:
        return facts_from_json(json.load(f))


def defs(flags):
    return dict((f[2:].split("=", 1) + ["1"])[:2] for f in flags if f.startswith("-D"))


def test_fentry_612_counts_slots_with_handlers_even_without_change_pte():
    facts = load("6.12-debian-module")
    plan = resolve(facts)
    assert plan.for_op("unmap").attach == "fentry" and not plan.for_op("change_pte").available
    d = defs(build_cflags(plan, facts, fentry_module="kvm"))
    assert d["H_UNMAP_FN"] == "kvm_unmap_gfn_range" and "H_UNMAP_SLOT_ARG" not in d  # one call per slot
    assert "MODE_FENTRY" in d and d["FENTRY_MODULE"] == "kvm"
    assert "HVA_EXACT_CHANGE_PTE" not in d
    assert (d["VM_INIT_FN"], d["VM_DESTROY_FN"]) == ("kvm_arch_init_vm", "kvm_arch_destroy_vm") and "VM_LIFE" in d
    assert d["READ_MEMSLOTS"] == "0"  # interval tree: the count is kept from observed updates


def test_kprobe_510_counts_slots_per_memslot_argument_and_reads_the_count():
    facts = load("5.10-btf-builtin")
    structs = dict(facts.btf_structs)
    structs["kvm"] = dict(structs["kvm"], mmu_notifier=4096)  # not in this hand-made fixture
    facts = dataclasses.replace(facts, btf_structs=structs)
    plan = resolve(facts, modes=("kprobe",))
    d = defs(build_cflags(plan, facts))
    assert (d["H_UNMAP_FN"], d["H_UNMAP_SLOT_ARG"]) == ("kvm_unmap_rmapp", "2")
    assert (d["H_AGE_FN"], d["H_AGE_SLOT_ARG"]) == ("kvm_age_rmapp", "2")
    assert d["READ_MEMSLOTS"] == "1" and d["LINEAR_SCAN"] == "1" and d["NR_AS"] == "2"
    assert d["SET_MEMSLOT_CHANGE_ARG"] == "5" and "MS_DERIVE" not in d
    assert not any(k.startswith("OFF_SLOT") for k in d)  # no per-slot walk


def test_tracepoint_only_plan_has_no_vm_lifetime_probes():
    facts = load("6.18-builtin-host")
    d = defs(build_cflags(resolve(facts), facts))
    assert "VM_LIFE" not in d and d["READ_MEMSLOTS"] == "0"


def test_kprobe_61_positions_from_btf():
    facts = load("6.1-debian-module")
    plan = resolve(facts, modes=("kprobe", "tracepoint"))
    d = defs(build_cflags(plan, facts, pid=42))
    assert d["CB_UNMAP_RANGE_ARG"] == "1" and d["CB_AGE_START_ARG"] == "2" and d["CB_AGE_END_ARG"] == "3"
    assert d["SET_MEMSLOT_CHANGE_ARG"] == "3" and d["PID_FILTER"] == "42" and "MODE_FENTRY" not in d


def test_tracepoint_host_always_streams_hva_events_for_derivation():
    facts = load("6.18-builtin-host")
    plan = resolve(facts)
    d = defs(build_cflags(plan, facts))
    assert "HVA_TP_UNMAP" in d and "MS_TP" in d and "EVENTS" in d and "HVA_EXACT_UNMAP" not in d


def test_names_that_are_not_identifiers_are_refused():
    facts = load("6.1-debian-module")
    plan = resolve(facts, modes=("kprobe",))
    bad = dataclasses.replace(plan.for_op("unmap"), callbacks=("x); system(\"id\"",))
    ops = tuple(bad if p.op == "unmap" else p for p in plan.ops)
    with pytest.raises(KvmtraceError):
        build_cflags(dataclasses.replace(plan, ops=ops), facts)
    with pytest.raises(KvmtraceError):
        build_cflags(plan, facts, ringbuf_pages=1000)


def test_callback_state_in_task_storage_from_5_11_with_btf(tmp_path):
    from kvmtrace.tracer.cflags import exact_task_storage

    btf = tmp_path / "vmlinux"
    btf.write_bytes(b"")
    facts = load("6.1-debian-module")
    assert exact_task_storage(facts, str(btf))
    assert exact_task_storage(dataclasses.replace(facts, release="5.11.0"), str(btf))
    assert not exact_task_storage(dataclasses.replace(facts, release="5.10.0-35-amd64"), str(btf))
    assert not exact_task_storage(facts, str(tmp_path / "absent"))  # no BTF: no bpf_get_current_task_btf
    assert not exact_task_storage(dataclasses.replace(facts, release="weird"), str(btf))
    assert not exact_task_storage(None, str(btf))


def test_tracepoint_only_plan_keeps_no_callback_state():
    facts = load("6.18-builtin-host")
    assert "-DCB_TASK_STORAGE" not in build_cflags(resolve(facts), facts)
