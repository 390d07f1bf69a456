"""deploy/: the Prometheus rules (`promtool check rules`, `promtool test rules`, every metric they
use is one the exporter serves), the Grafana dashboard (its structure and variables, every metric
its queries use is one the exporter serves; tests/test_exporter_prometheus.py runs every query
against a real Prometheus) and the systemd units (`systemd-analyze verify`, and the
`systemd-analyze security` verdict and exposures that docs/exporter.md states)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_exporter import make_snap, need_tool, promtool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "kvmtrace-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "kvmtrace-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvmtrace.json"
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

    from kvmtrace.snapshot import SelfCost

    ex = Exporter(memslots_limit=32764)
    ex.update(make_snap(cost=SelfCost("enabled", 10, 1, 0.1, (("p", 10, 1),))))
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


def test_recording_rules_keep_the_identity_labels():
    """Every aggregation of the rules keeps job and instance, and per VM vm_id and vm (promtool
    test rules checks the recorded label sets of the main ones)."""
    import yaml

    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            for by in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", r["expr"]):
                kept = {x.strip() for x in by.split(",")}
                assert {"job", "instance"} <= kept, (r.get("record") or r.get("alert"), by)
                if r.get("record", "").startswith("vm"):
                    assert "on" in r["expr"] or {"vm_id", "vm"} <= kept, (r["record"], by)


# ---------------------------------------------------------------------------- Grafana


def dashboard():
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dash=None):
    """(panel title, refId, PromQL with Grafana's variables) of every panel's every query."""
    dash = dash or dashboard()
    out = []
    for p in dash["panels"]:
        for q in [p] + p.get("panels", []):  # a collapsed row holds its panels
            for t in q.get("targets", []):
                out.append((q["title"], t["refId"], t["expr"]))
    return out


def regex_value(s: str) -> str:
    """A label value as Grafana puts a multi-value variable into a PromQL regex: regex
    metacharacters escaped, then backslashes doubled for the PromQL string."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\1", s).replace("\\", "\\\\")


def substitute(expr: str, variables: dict, rate_interval: str) -> str:
    """The query Grafana sends: $__rate_interval and every template variable replaced."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def legends(dash):
    return [(p["title"], t["refId"], t.get("legendFormat", "")) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_structure_and_variables():
    d = dashboard()
    assert d["uid"] == "kvmtrace" and d["schemaVersion"] >= 39
    var = {v["name"]: v for v in d["templating"]["list"]}
    assert var["datasource"]["type"] == "datasource" and var["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for name, metric, label in (("host", "kvmtrace_tracer_up", "instance"), ("vm", "kvmtrace_vm_info", "vm")):
        v = var[name]
        assert v["type"] == "query" and v["datasource"] == ds and v["multi"] and v["includeAll"], name
        m = re.fullmatch(r"label_values\((\w+)(\{.*\})?, (\w+)\)", v["query"]["query"])
        assert m and m.group(1) == metric and m.group(3) == label, v["query"]
        assert v["definition"] == v["query"]["query"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), (p["title"], t["refId"])
    queries = dashboard_queries(d)
    # per host rates, per VM rates and latency quantiles, memslot updates by change type,
    # kvmtrace's own cost, and its lost / map_full / unattributed counters
    text = "\n".join(q for _, _, q in queries)
    for needed in ("sum by (instance, op) (rate(kvmtrace_hva_operations_total",
                   "sum by (instance, vm, op) (rate(kvmtrace_hva_operations_total",
                   "histogram_quantile(0.99, sum by (instance, vm, op, le) (rate(kvmtrace_hva_latency_seconds_bucket",
                   "sum by (instance, vm, change) (rate(kvmtrace_memslot_updates_total",
                   "kvmtrace_tracer_cpu_seconds_total", "kvmtrace_bpf_run_seconds_total",
                   "kvmtrace_lost_events_total", "kvmtrace_map_full_total", "kvmtrace_unattributed_operations_total"):
        assert needed in text, needed
    for title, ref, q in queries:  # every query follows the host variable, every per-VM one the VM variable
        assert 'instance=~"$host"' in q, (title, ref)
        if re.search(r"\bby \([^)]*\bvm\b", q) or "{{vm}}" in dict(((t, r), l) for t, r, l in legends(d))[title, ref]:
            assert q.count('vm=~"$vm"') == q.count("kvmtrace_"), (title, ref)
    # nothing left to substitute but the variables
    for _, _, q in queries:
        substitute(q, {"host": ".*", "vm": ".*"}, "1m")


def test_dashboard_uses_only_metrics_the_exporter_serves():
    d = dashboard()
    text = "\n".join(q for _, _, q in dashboard_queries(d))
    text += "\n".join(v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query")
    used = set(re.findall(r"(?<![:\w])(kvmtrace_[a-z_]+)\b", text))
    missing = used - exported_names()
    assert not missing, f"the dashboard uses metrics the exporter does not serve: {sorted(missing)}"


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
