"""One definition of every streamed record (tracer/records.py) and of the kprobe program names:
the C is generated from it, and these tests fail when the two sides could disagree. Without root:
the generated header compiled by the host's C compiler; with root, every BPF build compiles the
same header with its offset assertions (test_tracer_e2e, test_bpf_load)."""

from __future__ import annotations

import ctypes as ct
import shutil
import subprocess

import pytest

from kvmtrace.consts import Op
from kvmtrace.tracer import records as R
from kvmtrace.tracer.cflags import source
from kvmtrace.tracer.plan import OpPlan, ProbePlan

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
TYPES = "typedef unsigned long long u64; typedef long long s64; typedef unsigned int u32; typedef int s32;\n"


def _compile(tmp_path, text: str, run: bool = True) -> subprocess.CompletedProcess:
    c = tmp_path / "t.c"
    c.write_text(TYPES + text)
    exe = tmp_path / "t"
    p = subprocess.run([CC, "-std=gnu11", "-o", str(exe), str(c)], capture_output=True, text=True)
    if p.returncode or not run:
        return p
    return subprocess.run([str(exe)], capture_output=True, text=True)


@needs_cc
def test_generated_c_lays_out_every_field_where_python_reads_it(tmp_path):
    offs = R.field_offsets()
    body = "#include <stdio.h>\n#include <stddef.h>\n" + R.c_header() + "int main(void) {\n"
    body += f'    printf("size %zu\\n", sizeof(struct event));\n'
    for key in offs:
        where, name = key.split(".")
        member = name if where == "head" else f"{where}.{name}"
        body += f'    printf("{key} %zu\\n", offsetof(struct event, {member}));\n'
    body += "    return 0;\n}\n"
    p = _compile(tmp_path, body)
    assert p.returncode == 0, p.stderr
    got = dict(line.split() for line in p.stdout.splitlines())
    assert int(got.pop("size")) == R.EVENT_SIZE == ct.sizeof(R.Event)
    assert {k: int(v) for k, v in got.items()} == offs
    # ctypes (what the decoders read) places every field at the same offset
    for key, off in offs.items():
        where, name = key.split(".")
        if where == "head":
            assert getattr(R.Event, name).offset == off
        else:
            assert R.HEAD_SIZE + getattr(R._BODIES[where], name).offset == off


@needs_cc
def test_a_c_layout_that_differs_from_python_does_not_compile(tmp_path):
    hdr = R.c_header()
    # the C side changed behind Python's back: a field inserted in a body
    moved = hdr.replace("struct ev_hva { u64 start;", "struct ev_hva { u64 extra; u64 start;")
    assert moved != hdr
    p = _compile(tmp_path, hdr + "int main(void) { return 0; }\n", run=False)
    assert p.returncode == 0, p.stderr
    p = _compile(tmp_path, moved + "int main(void) { return 0; }\n", run=False)
    assert p.returncode != 0 and "offset differs from records.py" in p.stderr


def test_the_bpf_source_declares_no_record_of_its_own():
    src = source()
    hdr = R.c_header()
    assert src.startswith(hdr)
    rest = src[len(hdr):]
    assert "struct event {" not in rest and "EV_HVA =" not in rest and "CNT_LOST =" not in rest
    assert "kp_enter_" not in rest and "kp_ms_outer_enter" not in rest  # names come from the macros


def test_pack_and_ctypes_and_struct_agree():
    raw = R.pack("memslot", ts=5, vm=0xFFFF888000001000, tgid=7, tid=8, lat_ns=900, gpa=1 << 30,
                 size=2 << 20, hva=0x7F0000000000, slot=(1 << 16) | 3, flags=1, change=2, ret=-22)
    assert len(raw) == R.EVENT_SIZE
    ev = R.Event.from_buffer_copy(raw)
    assert (ev.ts, ev.vm, ev.kind, ev.tgid, ev.tid) == (5, 0xFFFF888000001000, R.EV_MEMSLOT, 7, 8)
    m = ev.memslot
    assert (m.lat_ns, m.gpa, m.size, m.hva, m.slot, m.flags, m.change, m.ret) == (
        900, 1 << 30, 2 << 20, 0x7F0000000000, (1 << 16) | 3, 1, 2, -22)
    assert R.HEAD_STRUCT.unpack_from(raw)[:5] == (5, 0xFFFF888000001000, R.EV_MEMSLOT, 7, 8)
    assert R.BODY_STRUCT["memslot"].unpack_from(raw, R.HEAD_SIZE)[-1] == -22
    with pytest.raises(TypeError):
        R.pack("hva", gpa=1)  # a field of another kind


def test_misaligned_field_is_refused():
    with pytest.raises(ValueError, match="aligned"):
        R._layout((("a", "u32"), ("b", "u64")))


def _plan():
    def hva(op, cbs, handlers=(), method="handler"):
        return OpPlan(op=op, kind="hva", attach="kprobe", target="+".join(cbs), latency="exact",
                      slots="exact", callbacks=cbs, handlers=handlers, slots_method=method)
    return ProbePlan(ops=(
        hva("unmap", ("kvm_mmu_notifier_invalidate_range_start",), ("kvm_unmap_gfn_range",)),
        hva("age", ("kvm_mmu_notifier_clear_flush_young", "kvm_mmu_notifier_clear_young"), ("kvm_age_gfn",)),
        hva("test_age", ("kvm_mmu_notifier_test_young",), method="walk"),
        OpPlan(op="change_pte", kind="hva", attach="tracepoint", target="kvm:kvm_set_spte_hva",
               latency="syscall", slots="derived"),
        OpPlan(op="memslot_update", kind="memslot", attach="kprobe", target="__kvm_set_memory_region",
               latency="exact", slots="exact", callbacks=("__kvm_set_memory_region",),
               handlers=("kvm_set_memslot",), change_arg=3),
    ), linear_scan=False)


def test_kprobe_program_names():
    assert R.kprobe_programs(_plan()) == [
        ("kprobe", "kvm_mmu_notifier_invalidate_range_start", "kp_enter_UNMAP_kvm_mmu_notifier_invalidate_range_start"),
        ("kretprobe", "kvm_mmu_notifier_invalidate_range_start", "kp_exit_UNMAP_kvm_mmu_notifier_invalidate_range_start"),
        ("kprobe", "kvm_unmap_gfn_range", "kp_handler_kvm_unmap_gfn_range"),
        ("kprobe", "kvm_mmu_notifier_clear_flush_young", "kp_enter_AGE_kvm_mmu_notifier_clear_flush_young"),
        ("kretprobe", "kvm_mmu_notifier_clear_flush_young", "kp_exit_AGE_kvm_mmu_notifier_clear_flush_young"),
        ("kprobe", "kvm_mmu_notifier_clear_young", "kp_enter_AGE2_kvm_mmu_notifier_clear_young"),
        ("kretprobe", "kvm_mmu_notifier_clear_young", "kp_exit_AGE2_kvm_mmu_notifier_clear_young"),
        ("kprobe", "kvm_age_gfn", "kp_handler_kvm_age_gfn"),
        ("kprobe", "kvm_mmu_notifier_test_young", "kp_enter_TEST_AGE_kvm_mmu_notifier_test_young"),
        ("kretprobe", "kvm_mmu_notifier_test_young", "kp_exit_TEST_AGE_kvm_mmu_notifier_test_young"),
        ("kprobe", "__kvm_set_memory_region", "kp_ms_outer_enter"),
        ("kretprobe", "__kvm_set_memory_region", "kp_ms_outer_exit"),
        ("kprobe", "kvm_set_memslot", "kp_ms_set_enter"),
    ]
    assert {o.name for o in Op} >= {"UNMAP", "AGE", "TEST_AGE"}


@needs_cc
def test_c_macros_expand_to_the_names_python_attaches(tmp_path):
    """The C program names (macro expansion, as in kvmtrace.c's CB_ENTER/CB_EXIT/HANDLER_PROG
    and memslot programs) equal the names kprobe_programs() gives the session."""
    names = [n for _p, _f, n in R.kprobe_programs(_plan())]
    lines = ["#define XSTR(x) STR(x)", "#define STR(x) #x"] + R.c_prog_macros()
    lines.append("#define CB_ENTER(OPN, FN) KP_CB_PROG(enter, OPN, FN)")  # as kvmtrace.c nests it
    lines.append("#define CB_EXIT(OPN, FN) KP_CB_PROG(exit, OPN, FN)")
    calls = {
        "kp_enter_UNMAP_kvm_mmu_notifier_invalidate_range_start": "CB_ENTER(UNMAP, kvm_mmu_notifier_invalidate_range_start)",
        "kp_exit_UNMAP_kvm_mmu_notifier_invalidate_range_start": "CB_EXIT(UNMAP, kvm_mmu_notifier_invalidate_range_start)",
        "kp_handler_kvm_unmap_gfn_range": "KP_HANDLER_PROG(kvm_unmap_gfn_range)",
        "kp_enter_AGE2_kvm_mmu_notifier_clear_young": "CB_ENTER(AGE2, kvm_mmu_notifier_clear_young)",
        "kp_ms_outer_enter": "KP_MS_OUTER_ENTER", "kp_ms_outer_exit": "KP_MS_OUTER_EXIT",
        "kp_ms_set_enter": "KP_MS_SET_ENTER",
    }
    assert set(calls) <= set(names)
    body = "#include <stdio.h>\n" + "\n".join(lines) + "\nint main(void) {\n"
    body += "".join(f'    puts(XSTR({c}));\n' for c in calls.values()) + "    return 0;\n}\n"
    p = _compile(tmp_path, body)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == list(calls)


def test_the_vm_list_sizes_python_reads_are_the_kernel_programs():
    """The seeding writes a process's VM list in the kernel's layout: its sizes must be C's."""
    import re

    src = source()
    for name in ("VM_PER_PROC", "VM_LIST_MAX"):
        m = re.search(r"^#define %s (\d+)" % name, src, re.M)
        assert m, name
        assert int(m.group(1)) == getattr(R, name), name
