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
    assert d["HANDLERS_PER_SLOT"] == "1" and d["H_UNMAP_FN"] == "kvm_unmap_gfn_range"
    assert "MODE_FENTRY" in d and d["FENTRY_MODULE"] == "kvm"
    assert "HVA_EXACT_CHANGE_PTE" not in d


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
