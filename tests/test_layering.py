"""The import graph keeps its layers (docs/INTERFACES.md): scripts/import-graph.py --check."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import-graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_goes_up_a_layer_or_into_tracer_internals():
    g = _graph()
    assert g.check(g.imports()) == []


def test_the_check_catches_a_consumer_importing_tracer_internals():
    g = _graph()
    edges = {"kvmtrace.dashboard.view": {"kvmtrace.tracer.plan"}, "kvmtrace.snapshot": {"kvmtrace.analysis.report"}}
    problems = g.check(edges)
    assert any("dashboard.view -> kvmtrace.tracer.plan" in p for p in problems)
    assert any("snapshot -> kvmtrace.analysis.report: model imports consumers above it" in p for p in problems)
