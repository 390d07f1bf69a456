"""kvmtrace doctor: report from fixture facts validated against docs/doctor.schema.json, the
human rendering, exit statuses, and (as root) the real command on this host."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from rich.console import Console

from kvmtrace.cli import cli
from kvmtrace.commands import doctor as D
from kvmtrace.tracer import kernel
from kvmtrace.tracer.kernel import BtfFacts, GatheredFacts, facts_from_json

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "doctor.schema.json").read_text())
FIX = ROOT / "tests" / "fixtures" / "kernels"


def gathered(name, **over):
    f = facts_from_json(json.loads((FIX / f"{name}.json").read_text()))
    if over:
        f = dataclasses.replace(f, **over)
    mod = next(iter(f.kallsyms.values()), "")
    return GatheredFacts(
        facts=f,
        btf=BtfFacts(vmlinux=f.btf_funcs is not None, modules=f.btf_modules, funcs=f.btf_funcs),
        config_source="/proc/config.gz", tracefs="/sys/kernel/tracing", tracefs_state="mounted",
        lockdown="integrity" if name.startswith("6.18") else "none", lockdown_source="test",
        kvm_module=mod, kvm_loaded=True, bcc_version="0.26.0", ringbuf_reason="ring buffer map created",
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in FIX.glob("*.json")))
def test_report_matches_schema(name):
    r = D.collect(gathered=gathered(name))
    jsonschema.validate(r, SCHEMA)
    assert r["ok"] and r["exit_code"] == 0
    assert [p["op"] for p in r["plan"]] == ["unmap", "age", "test_age", "change_pte", "memslot_update"]
    assert all(pr["fix"] for pr in r["problems"])


def test_render_this_host_kind():
    r = D.collect(gathered=gathered("6.18-builtin-host"))
    c = Console(width=120, no_color=True, record=True, file=open(os.devnull, "w"))
    D.render(r, c)
    text = c.export_text()
    lines = [ln.rstrip() for ln in text.splitlines()]
    assert any(ln.startswith("kprobes") and ln.endswith("no: CONFIG_KPROBES off") for ln in lines)
    assert any(ln.startswith("fentry") and ln.endswith("no: load refused (EPERM)") for ln in lines)
    row = next(ln for ln in lines if ln.startswith("│ unmap "))
    assert [c.strip() for c in row.strip("│").split("│")] == [
        "unmap", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall", "derived", "none"]
    row = next(ln for ln in lines if ln.startswith("│ memslot_update "))
    assert "syscall" in row and "derived (change type)" in row and "ioctl(KVM_SET_USER_MEMORY_REGION/2)" in row
    assert "  unmap: __kvm_handle_hva_range -- always inline, no symbol; probing its callers" in lines
    assert "  unmap: kprobe kvm_mmu_notifier_invalidate_range_start -- kprobe: CONFIG_KPROBES off" in lines
    assert "OK: unmap can be traced (tracepoint)." in lines
    assert "    fix: boot a kernel with CONFIG_KPROBES=y" in "\n".join(lines)


def test_exit_3_when_unmap_untraceable(monkeypatch):
    g = gathered("6.18-builtin-host", tracepoints=())
    monkeypatch.setattr(kernel, "gather", lambda trial=True: g)
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 3, res.output
    r = json.loads(res.output)
    jsonschema.validate(r, SCHEMA)
    assert r["ok"] is False
    assert any(p["problem"].startswith("unmap: cannot be traced") for p in r["problems"])


def test_no_dev_kvm_still_reports(monkeypatch):
    from kvmtrace.tracer import host

    monkeypatch.setattr(host, "dev_kvm", lambda path="/dev/kvm": host.DevKvm(False, False, "/dev/kvm missing"))
    r = D.collect(gathered=gathered("6.1-debian-module"))
    jsonschema.validate(r, SCHEMA)
    assert r["kvm"]["missing"] is True
    assert any(p["problem"].startswith("KVM missing") and "modprobe" in p["fix"] for p in r["problems"])


def test_bad_modes_is_usage_error():
    res = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "doctor", "--modes", "uprobe"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.startswith("kvmtrace: unknown attach mode(s) uprobe")
    assert "Traceback" not in res.stderr


root_only = pytest.mark.skipif(not kernel.can_bpf(), reason="needs root or CAP_BPF+CAP_PERFMON (kernel.can_bpf)")


@pytest.mark.root
@root_only
def test_live_doctor_json_validates():
    res = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "doctor", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = json.loads(res.stdout)
    jsonschema.validate(r, SCHEMA)
    assert res.returncode == r["exit_code"]
    assert "Traceback" not in res.stderr
    assert r["kernel"]["release"] == os.uname().release
    k = r["kernel"]
    if k["kprobes"]["reason"] == "CONFIG_KPROBES off" and k["fentry"]["reason"] == "load refused (EPERM)":
        # this development host (DESIGN.md section 4)
        plan = {p["op"]: p for p in r["plan"]}
        for op in ("unmap", "age", "test_age"):
            assert (plan[op]["attach"], plan[op]["latency"], plan[op]["slots"]) == ("tracepoint", "syscall", "derived")
        m = plan["memslot_update"]
        assert m["attach"] == "tracepoint" and m["tracepoints"] == ["raw_syscalls:sys_enter", "raw_syscalls:sys_exit"]
        assert r["defines"]["LINEAR_SCAN"] == 0 and r["exit_code"] == 0


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_not_root_one_line_exit_2():
    def drop():
        os.setgid(65534)
        os.setuid(65534)

    try:
        res = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "doctor"], capture_output=True, text=True,
                             cwd=ROOT, preexec_fn=drop, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), HOME="/tmp"))
    except PermissionError as e:  # the interpreter or the tree is out of nobody's reach
        pytest.skip(f"user nobody cannot execute {sys.executable} (a parent directory is not "
                    f"world-searchable): {e}")
    if res.returncode != 2 and "Permission denied" in res.stderr and "kvmtrace:" not in res.stderr:
        pytest.skip(f"user nobody cannot read this tree: {res.stderr[-200:]}")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "kvmtrace: doctor needs root, or CAP_BPF and CAP_PERFMON (run: sudo kvmtrace doctor)"]


def test_problems_are_typed_and_decided_by_code():
    """issue 10: remedies come from Problem codes set where the fact is found, never from
    matching words of a message (the same reason text gives the fix its code says)."""
    from kvmtrace.errors import CapabilityMissing, PermissionProblem, Problem
    from kvmtrace.tracer import host
    from kvmtrace.tracer.plan import resolve

    g = gathered("6.1-debian-module")
    hdr, dk = host.Headers("exact", "/x", "x"), host.DevKvm(True, True, "read/write")
    plan = resolve(g.facts)
    coded = {p.code: p for p in kernel.diagnose(dataclasses.replace(g, fentry_code="module_btf"), hdr, dk, plan)}
    assert "install bcc >= 0.31" in coded["fentry.module_btf"].fix
    uncoded = {p.code: p for p in kernel.diagnose(g, hdr, dk, plan)}
    assert "bcc >= 0.31" not in uncoded["fentry.unavailable"].fix
    assert coded["fentry.module_btf"].message == uncoded["fentry.unavailable"].message
    host_g = dataclasses.replace(gathered("6.18-builtin-host"), fentry_code="eperm")
    eperm = {p.code: p for p in kernel.diagnose(host_g, hdr, dk, resolve(host_g.facts))}["fentry.eperm"]
    assert "lockdown=integrity" in eperm.fix
    no_kvm = kernel.diagnose(g, hdr, host.DevKvm(True, False, "present but not accessible"), plan)
    p = next(x for x in no_kvm if x.code == "kvm.access")
    assert isinstance(p.error(), PermissionProblem) and p.error().exit_code == 2
    assert isinstance(Problem("x", "m", "f").error(), CapabilityMissing)
    r = D.collect(gathered=g)
    assert all(pr["code"] for pr in r["problems"])


def test_load_failures_become_typed_problems():
    """The one classification of bcc's text-only failures, for the tracer to raise."""
    from kvmtrace.errors import CapabilityMissing, PermissionProblem

    p = kernel.load_problem(Exception("Failed to load BPF program b'x': Operation not permitted"))
    assert p.code == "load.eperm" and isinstance(p.error(), PermissionProblem)
    p = kernel.load_problem(Exception("Failed to compile BPF module <text>"),
                            "<built-in>:1:10: fatal error: 'linux/kconfig.h' file not found\n")
    assert p.code == "load.headers" and "linux-headers-" in p.fix and isinstance(p.error(), CapabilityMissing)
    p = kernel.load_problem(Exception("Failed to attach BPF program: Invalid argument"))
    assert p.code == "load.einval" and "kvmtrace doctor" in p.fix
