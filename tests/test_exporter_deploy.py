"""deploy/: the Prometheus rules (`promtool check rules`, `promtool test rules`, every metric they
use is one the exporter serves) and the systemd units (`systemd-analyze verify`, and the
`systemd-analyze security` verdict and exposures that docs/exporter.md states)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_exporter import make_snap, need_tool, promtool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "kvmtrace-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "kvmtrace-rules.test.yml"
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
DOC = ROOT / "docs" / "exporter.md"
KVMTRACE = Path(sys.executable).parent / "kvmtrace"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_promtool_check_rules():
    p = run([promtool(), "check", "rules", str(RULES)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_promtool_test_rules():
    p = run([promtool(), "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def exported_names():
    from kvmtrace.exporter.collector import Exporter, render

    ex = Exporter(memslots_limit=32764)
    ex.update(make_snap())
    names = set()
    for line in render(ex).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            if kind == "counter":
                names.add(name + "_total" if not name.endswith("_total") else name)
    return names


def test_rules_use_only_metrics_the_exporter_serves():
    # metric names, not the recording rules' own level:metric:operation names
    used = set(re.findall(r"(?<![:\w])(kvmtrace_[a-z_]+)\b(?!:)", RULES.read_text()))
    assert used, "no kvmtrace metric in the rules"
    missing = used - exported_names()
    assert not missing, f"rules use metrics the exporter does not serve: {sorted(missing)}"


def local_unit(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's kvmtrace (verify checks it exists);
    nothing else changes."""
    text = unit.read_text()
    assert "/opt/kvmtrace/bin/kvmtrace " in text
    out = tmp_path / unit.name
    out.write_text(text.replace("/opt/kvmtrace/bin/kvmtrace ", f"{KVMTRACE} "))
    return out


def test_units_exist():
    assert {u.name for u in UNITS} == {"kvmtrace-exporter.service", "kvmtrace-record.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit, tmp_path):
    tool = need_tool("systemd-analyze", "systemd")
    p = run([tool, "verify", str(local_unit(unit, tmp_path))])
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def security(unit: Path, tmp_path: Path):
    tool = need_tool("systemd-analyze", "systemd")
    p = run([tool, "security", "--offline=yes", "--no-pager", str(local_unit(unit, tmp_path))])
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", p.stdout)
    assert m, p.stdout + p.stderr
    exposed = [l.split()[1] for l in p.stdout.splitlines() if l.startswith("✗")]
    return float(m.group(1)), m.group(2), exposed


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_security_verdict_and_every_exposure_are_documented(unit, tmp_path):
    level, verdict, exposed = security(unit, tmp_path)
    doc = DOC.read_text()
    assert f"`{unit.name}`: {level} {verdict}" in doc, \
        f"docs/exporter.md must state the verdict of {unit.name}: {level} {verdict}"
    assert level <= 4.0  # "OK" or better; a looser unit needs a reason in the docs first
    for setting in exposed:
        key = setting.split("=")[0] + "="
        assert f"`{key}" in doc, f"docs/exporter.md does not explain the exposure {setting} of {unit.name}"


def unit_capabilities(unit: Path):
    m = re.search(r"^CapabilityBoundingSet=(.*)$", unit.read_text(), re.M)
    return [c.strip() for c in m.group(1).split()]


def test_both_units_grant_the_same_capabilities():
    assert len({tuple(unit_capabilities(u)) for u in UNITS}) == 1


def test_every_exported_metric_is_described_once_in_the_docs():
    from kvmtrace.exporter.collector import Exporter, render
    from kvmtrace.snapshot import SelfCost

    ex = Exporter(memslots_limit=32764, plan_ops=[("unmap", "tracepoint", "t", "syscall", "derived")])
    ex.update(make_snap(cost=SelfCost("enabled", 10, 1, 0.1, (("p", 10, 1),))))
    families = set()
    for line in render(ex).decode().splitlines():
        if line.startswith("# TYPE kvmtrace_"):
            name, kind = line.split()[2:4]
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            families.add(name)
    doc = DOC.read_text()
    rows = re.findall(r"^\| `(kvmtrace_[a-z_]+)` \|", doc, re.M)
    dup = {r for r in rows if rows.count(r) > 1}
    assert not dup, f"described more than once: {sorted(dup)}"
    missing = families - set(rows)
    assert not missing, f"exported but not described in docs/exporter.md: {sorted(missing)}"
    stale = set(rows) - families
    assert not stale, f"described but not exported: {sorted(stale)}"
