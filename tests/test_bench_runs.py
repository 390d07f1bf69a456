"""bench --runs: every run its own process, tracer session and recording, round-robin over the
configurations; compare reads them as runs (fake session, fake workload: no root)."""

from __future__ import annotations

import json
import os
import sys

from kvmtrace.analysis.compare import compare
from kvmtrace.analysis.recording import read_inputs

from .test_analysis_commands import FAKE_WORKLOAD, fake_session, run_cli  # noqa: F401 (fixture)


def test_bench_runs_repeat_each_configuration_in_its_own_process(tmp_path, capsys, fake_session, monkeypatch):  # noqa: F811
    import kvmtrace.commands.bench as b

    script = tmp_path / "fake_workload.py"
    script.write_text(FAKE_WORKLOAD)
    monkeypatch.setattr(b, "kernel_max_memslots", lambda: 509)
    monkeypatch.setattr(b, "workload_cmd", lambda slots, scen, it, out, size=None: [
        sys.executable, str(script), "--slots", str(slots), "--scenario", scen, "--json-out", out])
    monkeypatch.setattr(fake_session, "until_stop", True)
    d = tmp_path / "bench"
    code, out, err = run_cli(["bench", "--slots", "10,509", "--scenario", "unmap", "-o", str(d), "--runs", "3"], capsys)
    assert code == 0, err
    idx = json.load(open(d / "kvmtrace-bench.json"))
    assert idx["runs_per_config"] == 3
    # round-robin: run 1 of every configuration, then run 2, ...
    assert [(r["slots"], r["run"]) for r in idx["runs"]] == [(10, 1), (509, 1), (10, 2), (509, 2), (10, 3), (509, 3)]
    assert [r["recording"] for r in idx["runs"][:4]] == [
        "runs/unmap-10/recording", "runs/unmap-509/recording", "runs/unmap-10-r2/recording", "runs/unmap-509-r2/recording"]
    pids = [r["workload"]["pid"] for r in idx["runs"]]
    assert len(set(pids)) == 6 and [s.pid for s in fake_session.instances] == pids  # a process and session per run
    assert "run 3/3" in err
    recs = read_inputs([str(d)])
    assert len(recs) == 6 and all(os.path.isdir(r.path) for r in recs)
    df = compare(recs, recs)
    it = df[(df.kind == "iteration") & (df.slots == 509)].iloc[0]
    assert it["runs_before"] == it["runs_after"] == 3 and it["ratio"] == 1.0
