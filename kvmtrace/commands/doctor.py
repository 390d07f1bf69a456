"""`kvmtrace doctor`: what this host supports and the probe plan kvmtrace would use.

``collect()`` gathers a plain-dict report (the ``--json`` output, schema in
docs/doctor.schema.json); ``render()`` prints it with rich. Exit status 0 when at least the
unmap op can be traced, 3 otherwise; 2 without the privilege to check (root or
CAP_BPF+CAP_PERFMON)."""

from __future__ import annotations

import json
import platform
import sys
from typing import List, Optional

import click

from ..errors import CapabilityMissing, PermissionProblem

SCHEMA_VERSION = 1
EXIT_OK = 0
EXIT_NO_UNMAP = CapabilityMissing.exit_code  # 3


def _parse_modes(text: Optional[str]):
    from ..tracer.plan import MODES
    from . import parse_modes

    return parse_modes(text) or MODES


def _plan_rows(plan) -> List[dict]:
    rows = []
    for p in plan.ops:
        rows.append({
            "op": p.op,
            "kind": p.kind,
            "target": p.target,
            "attach": p.attach,
            "latency": p.latency,
            "slots": p.slots,
            "scanned": p.scanned,
            "callbacks": list(p.callbacks),
            "handlers": list(p.handlers),
            "tracepoints": list(p.tracepoints),
            "change_arg": p.change_arg,
            "skipped": [{"alternative": s.alternative, "reason": s.reason} for s in p.skipped],
            "notes": list(p.notes),
        })
    return rows


def collect(modes=None, trial: bool = True, gathered=None) -> dict:
    """The doctor report as a JSON-ready dict. ``gathered`` (a kernel.GatheredFacts) may be
    given by tests; otherwise the live system is read."""
    from ..tracer import host, kernel
    from ..tracer.plan import MODES, resolve

    modes = modes or MODES
    g = gathered if gathered is not None else kernel.gather(trial=trial)
    f = g.facts
    plan = resolve(f, modes)
    priv = host.privileges()
    hdr = host.headers(f.release)
    devkvm = host.dev_kvm()
    vms, unreadable = host.vms()
    unmap = plan.for_op("unmap")
    ok = bool(unmap and unmap.available)
    report = {
        "schema_version": SCHEMA_VERSION,
        "kernel": {
            "release": f.release,
            "machine": platform.machine(),
            "config_source": g.config_source,
            "lockdown": g.lockdown,
            "tracefs": {"path": g.tracefs, "state": g.tracefs_state},
            "kprobes": {"available": f.kprobes, "reason": f.kprobes_reason},
            "fentry": {"available": f.fentry, "reason": f.fentry_reason},
            "module_fentry": {"available": f.module_fentry, "reason": f.module_fentry_reason},
            "ringbuf": {"available": f.ringbuf, "reason": g.ringbuf_reason},
            "tracepoints": list(f.tracepoints),
            "linear_scan": plan.linear_scan,
            "linear_scan_reason": plan.linear_scan_reason,
        },
        "privileges": {"euid": priv.euid, "root": priv.root, "capabilities": dict(priv.caps)},
        "bcc": {
            "version": g.bcc_version,
            "error": g.bcc_error,
            "headers": {"kind": hdr.kind, "path": hdr.path, "detail": hdr.detail},
        },
        "btf": {
            "vmlinux": g.btf.vmlinux,
            "modules": list(g.btf.modules),
            "error": g.btf.error,
            "functions": {k: list(v) for k, v in sorted((f.btf_funcs or {}).items())},
        },
        "kvm": {
            "dev_kvm": {"present": devkvm.present, "accessible": devkvm.accessible, "detail": devkvm.detail},
            "missing": not devkvm.present,
            "module": g.kvm_module,
            "built_in": (g.kvm_loaded and not g.kvm_module),
            "loaded": g.kvm_loaded,
        },
        "vms": [
            {"pid": v.pid, "comm": v.comm, "name": v.name, "vm_fds": v.vm_fds, "vcpus": v.vcpus} for v in vms
        ],
        "vms_unreadable_processes": unreadable,
        "modes": list(modes),
        "plan": _plan_rows(plan),
        "defines": {k: v for k, v in plan.defines},
        "problems": [p.as_dict() for p in kernel.diagnose(g, hdr, devkvm, plan)],
        "ok": ok,
        "exit_code": EXIT_OK if ok else EXIT_NO_UNMAP,
    }
    return report


# --- rendering ------------------------------------------------------------------------------


def _yn(v) -> str:
    return "yes" if v is True else "no" if v is False else "unknown"


def render(r: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    from ..text import display, printable

    k = r["kernel"]
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column("what", style="bold", no_wrap=True)
    facts.add_column("value", overflow="fold")

    def fact(what: str, value: str) -> None:
        # values carry host text (process names, paths, library messages): Text, never markup
        facts.add_row(what, Text(printable(value)))

    caps = r["privileges"]["capabilities"]
    capstr = " ".join(f"{c}={'yes' if v else 'no'}" for c, v in caps.items())
    fact("kernel", f"{k['release']} ({k['machine']})")
    fact("privileges", f"{'root' if r['privileges']['root'] else 'euid ' + str(r['privileges']['euid'])}; {capstr}")
    fact("lockdown", k["lockdown"] or "unknown")
    b = r["btf"]
    fact("BTF", f"vmlinux {_yn(b['vmlinux'])}" + (
        f"; modules: {', '.join(b['modules'])}" if b["modules"] else "")
        + (f" ({b['error']})" if b["error"] else ""))
    fact("kprobes", f"{_yn(k['kprobes']['available'])}: {k['kprobes']['reason']}")
    kvm = r["kvm"]
    if kvm["module"]:
        fact("fentry", f"{_yn(k['module_fentry']['available'])} (module {kvm['module']}): "
             f"{k['module_fentry']['reason']}")
    else:
        fact("fentry", f"{_yn(k['fentry']['available'])}: {k['fentry']['reason']}")
    fact("ring buffer", f"{_yn(k['ringbuf']['available'])}: {k['ringbuf']['reason']}")
    fact("tracefs", f"{k['tracefs']['path'] or '-'} ({k['tracefs']['state']})")
    fact("tracepoints", ", ".join(k["tracepoints"]) or "none of interest")
    bcc = r["bcc"]
    fact("bcc", (bcc["version"] or f"missing ({bcc['error']})")
         + f"; headers: {bcc['headers']['kind']} ({bcc['headers']['detail']})")
    ls = k["linear_scan"]
    fact("memslot lookup", ("linear scan" if ls else "interval tree" if ls is False else "unknown")
         + f" ({k['linear_scan_reason']})")
    dk = kvm["dev_kvm"]
    fact("KVM", ("MISSING: " if kvm["missing"] else "") + f"/dev/kvm {dk['detail']}; "
         + (f"module {kvm['module']}" if kvm["module"] else "built in" if kvm["built_in"] else "not loaded"))
    if r["vms"]:
        vmtxt = "; ".join(
            f"pid {v['pid']} {display(v['comm'])}" + (f" '{display(v['name'])}'" if v["name"] else "")
            + f" ({v['vcpus']} vCPU{'s' if v['vcpus'] != 1 else ''}"
            + (f", {v['vm_fds']} VMs" if v["vm_fds"] > 1 else "") + ")"
            for v in r["vms"])
    else:
        vmtxt = "none running"
    if r["vms_unreadable_processes"]:
        vmtxt += f" ({r['vms_unreadable_processes']} processes not readable)"
    fact("VMs now", vmtxt)
    console.print(facts)
    console.print()

    t = Table(title="Probe plan", title_justify="left", show_lines=False)
    t.add_column("op", no_wrap=True)
    t.add_column("attach", no_wrap=True)
    t.add_column("target", overflow="fold", min_width=24)
    t.add_column("latency", no_wrap=True)
    t.add_column("slots", no_wrap=True)
    t.add_column("scanned", no_wrap=True)
    for p in r["plan"]:
        t.add_row(*(Text(printable(v)) for v in (p["op"], p["attach"], p["target"] or "-", p["latency"],
                  p["slots"] + (" (change type)" if p["kind"] == "memslot" else ""), p["scanned"])))
    console.print(t)
    console.print("Skipped alternatives:")
    for p in r["plan"]:
        for s in p["skipped"]:
            console.print(Text(printable(f"  {p['op']}: {s['alternative']} -- {s['reason']}")))
        for n in p["notes"]:
            console.print(Text(printable(f"  {p['op']}: note: {n}")))
    if r["defines"]:
        console.print(Text(printable("BTF defines: " + " ".join(f"{k}={v}" for k, v in r["defines"].items()))))
    console.print()
    if r["problems"]:
        console.print("Problems:")
        for pr in r["problems"]:
            console.print(Text(printable(f"  - {pr['problem']}")))
            console.print(Text(printable(f"    fix: {pr['fix']}")))
    if r["ok"]:
        console.print(Text(f"OK: unmap can be traced ({r['plan'][0]['attach']})."))
    else:
        console.print("NOT OK: the unmap op cannot be traced on this host (see problems).", highlight=False)


@click.command(
    "doctor",
    epilog="""\b
Examples:
  kvmtrace doctor                       # what this host supports and the probe plan
  kvmtrace doctor --json | jq .plan     # the plan, machine-readable (docs/doctor.schema.json)
  kvmtrace doctor --modes kprobe,tracepoint   # the plan without fentry
""",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable report (schema: docs/doctor.schema.json)")
@click.option("--modes", default=None, metavar="LIST",
              help="attach modes to consider, comma-separated (default fentry,kprobe,tracepoint)")
def doctor(as_json: bool, modes: Optional[str]):
    """What this host supports and the probe plan kvmtrace would use.

    Exit status 0 when at least the unmap op can be traced, 3 otherwise."""
    from ..tracer import host

    mode_tuple = _parse_modes(modes)
    ok, _why = host.can_trace()
    if not ok:
        raise PermissionProblem(
            "doctor needs root, or CAP_BPF and CAP_PERFMON (run: sudo kvmtrace doctor)", "", exit_code=2)
    report = collect(mode_tuple)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=False))
    else:
        from rich.console import Console

        tty = sys.stdout.isatty()
        console = Console(no_color=not tty, highlight=False, width=None if tty else 120)
        render(report, console)
    if report["exit_code"]:
        sys.exit(report["exit_code"])
