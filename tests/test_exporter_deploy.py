"""deploy/: the Prometheus rules (`promtool check rules`, `promtool test rules`, every metric they
use is one the exporter serves), the Grafana dashboard (its structure and variables, every metric
its queries use is one the exporter serves; tests/test_exporter_prometheus.py runs every query
against a real Prometheus) and the systemd units (`systemd-analyze verify`, and the
`systemd-analyze security` verdict and exposures that docs/exporter.md states)."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
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


# ---------------------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout=10) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Prom:
    """A Prometheus server on a loopback port scraping one target every second."""

    def __init__(self, d: Path, target: str, rules: Path = None, jobs: str = None):
        """``jobs``: the scrape_configs entries (YAML), default one plain-HTTP job kvmtrace."""
        self.port = free_port()
        cfg = d / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files: ['{rules}']\n" if rules else "")
            + "scrape_configs:\n"
            + (jobs or f"  - job_name: kvmtrace\n    static_configs:\n      - targets: ['{target}']\n")
        )
        self.log = open(d / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [need_tool("prometheus", "prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={d / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None and get(f"http://127.0.0.1:{self.port}/-/ready", 2), 60,
                 "Prometheus to be ready")

    def api(self, path: str, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            doc = json.loads(get(url))
        except urllib.error.HTTPError as e:  # a bad query: 400 with Prometheus' error in the body
            pytest.fail(f"Prometheus refused {params}: {e.read().decode(errors='replace')}")
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str):
        return [(r["metric"], float(r["value"][1])) for r in self.api("query", query=expr)["result"]]

    def target_up(self) -> bool:
        return any(v == 1 for _, v in self.query('up{job="kvmtrace"}'))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def check_dashboard(prom: Prom, host: str, vm: str, changes: set):
    """Every query of deploy/grafana/kvmtrace.json, its variables set as Grafana sets them (the
    host and VM variables from their own queries), returns series with a number, the per-VM ones
    the workload's VM, the memslot updates by change type each type the workload made."""
    d = dashboard()
    wait_for(prom.target_up, 30, "Prometheus to scrape the exporter")
    variables = {}
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        values = {r[m.group(2)] for r, _ in prom.query(substitute(m.group(1), variables, "1m"))}
        want = {"host": host, "vm": vm}[v["name"]]
        assert want in values, (v["name"], values)
        variables[v["name"]] = regex_value(want)
    # a window that holds the whole workload ($__rate_interval is 4 scrape intervals at least).
    # A rate needs two scrapes of a series in its window: on a loaded host Prometheus may not
    # have them yet, so each query gets until the deadline to return a number
    end = time.monotonic() + 90
    sel = f'vm=~"{variables["vm"]}"'
    wait_for(lambda: {m["change"] for m, n in prom.query(f"count_over_time(kvmtrace_memslot_updates_total{{{sel}}}[5m])")
                      if n >= 2} == changes, 90, f"two scrapes of each memslot change type {changes}")
    by_change = {}
    for title, ref, expr in dashboard_queries(d):
        q = substitute(expr, variables, "5m")
        while True:
            res = prom.query(q)
            if any(math.isfinite(x) for _, x in res) or time.monotonic() > end:
                break
            time.sleep(1)
        print(f"{title} [{ref}]: {len(res)} series")
        assert res, f"dashboard panel {title!r} query {ref} returns no series: {q}"
        assert any(math.isfinite(x) for _, x in res), f"panel {title!r} query {ref} returns no number: {res}"
        if any("vm" in m for m, _ in res):
            assert any(m.get("vm") == vm and math.isfinite(x) for m, x in res), (title, ref, res)
        if "by (instance, vm, change) (rate(kvmtrace_memslot_updates_total" in q:
            by_change[title, ref] = {m["change"] for m, _ in res}
    # every change type of the workload, once each has been scraped twice
    for key in by_change:
        assert by_change[key] == changes, (key, by_change[key], changes)


def check_recording_rules(prom: Prom, vm_id: str):
    """deploy/prometheus's rules load and evaluate without error in the real server, and the
    recorded series keep job, instance and the VM labels."""
    def recorded():
        return prom.query(f'vm_op:kvmtrace_hva_operations:rate5m{{vm_id="{vm_id}",op="unmap"}}')

    (m, v), = wait_for(recorded, 40, "the recording rules to be evaluated")
    assert m["job"] == "kvmtrace" and m["instance"] and m["vm"] and v >= 0, m
    groups = prom.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"kvmtrace.recording", "kvmtrace.alerts"}
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
    assert not bad, bad


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


# ---------------------------------------------------------------------------- the dashboard, no root


def growing_snap(seq: int):
    """make_snap's figures times ``seq``: every counter and histogram rises from one snapshot
    to the next, as under traffic."""
    from dataclasses import replace

    from kvmtrace.snapshot import Log2Hist, SelfCost

    def grow(h):
        return Log2Hist.from_counts([c * seq for c in h.counts])

    s = make_snap(seq=seq, count=7 * seq, lost_events=4 * seq, map_full=seq, unattributed=9 * seq,
                  self_cpu_s=0.25 * seq,
                  cost=SelfCost("sampled: on 100 ms of every 1 s", 300_000 * seq, 40 * seq, 0.25 * seq,
                                (("tp_unmap", 200_000 * seq, 30 * seq), ("tp_ioctl", 100_000 * seq, 10 * seq)),
                                stats_s=0.1 * seq))
    hva = tuple(replace(h, lat_hist=grow(h.lat_hist), lat_count=h.lat_count * seq, lat_sum_ns=h.lat_sum_ns * seq,
                        slots_hist=grow(h.slots_hist), slots_count=h.slots_count * seq,
                        slots_sum=h.slots_sum * seq, underived=h.underived * seq) for h in s.hva)
    ms = tuple(replace(m, count=m.count * seq, errors=m.errors * seq, lat_hist=grow(m.lat_hist),
                       lat_sum_ns=m.lat_sum_ns * seq) for m in s.memslot)
    return replace(s, hva=hva, memslot=ms)


class GrowingSession:
    """TraceSession's consumer interface, a growing snapshot every 0.3 s."""

    def __init__(self):
        self.seq = 0

    def snapshot(self):
        self.seq += 1
        return growing_snap(self.seq)

    def snapshots(self, duration=None, stop=None):
        while not stop():
            time.sleep(0.3)
            yield self.snapshot()


def test_every_dashboard_query_returns_series_from_a_real_prometheus(tmp_path):
    """Without root: the real exporter server fed growing synthetic snapshots, Debian's
    Prometheus scraping it every second with the rules loaded, every dashboard query run as
    Grafana would send it (tests/test_exporter_prometheus.py does the same with the tracer and a
    real VM)."""
    from kvmtrace.exporter.collector import Exporter
    from kvmtrace.exporter.server import bind, serve

    ex = Exporter(memslots_limit=32764, plan_ops=[("unmap", "tracepoint", "kvm:kvm_unmap_hva_range", "syscall",
                                                   "derived")])
    server = bind("127.0.0.1", 0, ex)
    port = server.server_address[1]
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(GrowingSession(), ex, server, stop.is_set), daemon=True)
    t.start()
    prom = None
    try:
        prom = Prom(tmp_path, f"127.0.0.1:{port}", rules=RULES)
        check_dashboard(prom, f"127.0.0.1:{port}", "web1[100]#1", {"create", "unknown"})
        check_recording_rules(prom, "pid:100")
    finally:
        stop.set()
        t.join(timeout=30)
        if prom is not None:
            prom.stop()
