"""record and bench commands against a fake TraceSession (the documented API) and a fake
workload child: the command plumbing without root. The real tracer is exercised by root tests."""

from __future__ import annotations

import json
import os
import sys

import pytest

from kvmtrace.analysis.recording import read_inputs, read_recording
from kvmtrace.analysis.synth import SynthOp, SynthVm, simulate
from kvmtrace.cli import main


class FakeSession:
    instances = []
    until_stop = False  # like the real session: keep yielding until stop() (bench) instead of 3 snapshots

    def __init__(self, pid=None, interval=1.0, events=False, modes=None, self_cost="sampled"):
        self.pid, self.interval, self.events = pid, interval, events
        self.plan = None
        self.meta = {"host": "fakehost", "kernel": "6.18-fake", "bcc": "0"}
        self.interrupted = False
        vm = SynthVm("pid:%d" % (pid or 1), pid or 1, comm="=cmd", memslots=64)
        self._snaps, self._evs = simulate([vm], [SynthOp(vm.vm_id, op="unmap", per_interval=50, slots=1)], intervals=3)
        self._i = 0
        FakeSession.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def snapshots(self, duration=None, stop=None):
        import time

        for i, s in enumerate(self._snaps):
            self._i = i
            yield s
            if stop is not None and stop():
                return
        while self.until_stop and not stop():
            time.sleep(0.02)
        if self.until_stop:
            yield self._snaps[-1]

    def take_events(self):
        return list(self._evs[self._i]) if self.events else []


@pytest.fixture
def fake_session(monkeypatch):
    import kvmtrace.tracer.session as session_mod

    FakeSession.instances = []
    FakeSession.until_stop = False
    monkeypatch.setattr(session_mod, "TraceSession", FakeSession, raising=False)
    return FakeSession


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_record_writes_every_interval(tmp_path, capsys, fake_session):
    p = str(tmp_path / "rec")
    code, out, err = run_cli(["record", "-o", p, "--events", "--label", "L", "--pid", "321", "--interval", "0.5"], capsys)
    assert code == 0, err
    assert "recorded 3 intervals" in out and "150 hva ops" in out
    r = read_recording(p)
    assert int(r["hva"]["count"].sum()) == 150 and len(r["hva_events"]) == 150
    assert r.meta["label"] == "L" and r.meta["host"] == "fakehost" and r.meta["pid_filter"] == 321
    assert r.meta["status"] == "complete" and r.meta["session"]["bcc"] == "0"
    assert fake_session.instances[0].pid == 321 and fake_session.instances[0].interval == 0.5
    # not a tty: no carriage-return status line
    assert "\r" not in err


def test_record_csv_and_existing_path(tmp_path, capsys, fake_session):
    p = str(tmp_path / "rec")
    code, _, err = run_cli(["record", "-o", p, "--format", "csv"], capsys)
    assert code == 0, err
    assert os.path.exists(os.path.join(p, "hva.csv"))
    code, _, err = run_cli(["record", "-o", p], capsys)
    assert code == 2 and "already exists" in err


FAKE_WORKLOAD = r'''
import json, sys, os
a = sys.argv
out = a[a.index("--json-out") + 1]
n = int(a[a.index("--slots") + 1])
json.dump({"pid": os.getpid(), "slots": n, "iterations": 2, "iter_avg_s": 0.001 * n, "iter_best_s": 0.0009 * n,
           "hva_ops": {"unmap": 100}, "memslot_updates": {"create": n}}, open(out, "w"))
'''


def test_bench_runs_gate_records_and_prints_table(tmp_path, capsys, fake_session, monkeypatch):
    import kvmtrace.commands.bench as b

    script = tmp_path / "fake_workload.py"
    script.write_text(FAKE_WORKLOAD)
    monkeypatch.setattr(b, "kernel_max_memslots", lambda: 509)
    monkeypatch.setattr(b, "workload_cmd", lambda slots, scen, it, out, size=None: [
        sys.executable, str(script), "--slots", str(slots), "--scenario", scen, "--json-out", out])
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(fake_session, "until_stop", True)
    d = str(tmp_path / "bench")
    code, out, err = run_cli(["bench", "--slots", "10,509", "--scenario", "unmap", "-o", d, "--iterations", "2",
                              "--runs", "1"], capsys)
    assert code == 0, err
    idx = json.load(open(os.path.join(d, "kvmtrace-bench.json")))
    assert [(r["scenario"], r["slots"], r["status"]) for r in idx["runs"]] == [("unmap", 10, "ok"), ("unmap", 509, "ok")]
    assert idx["runs"][1]["workload"]["iter_avg_s"] == pytest.approx(0.509)
    # the session traced the child's pid, which is the pid the workload reported (gate execs in place)
    assert [s.pid for s in fake_session.instances] == [r["workload"]["pid"] for r in idx["runs"]]
    recs = read_inputs([d])
    assert [r.source for r in recs] == ["unmap/10", "unmap/509"]
    assert "509 ms" in out and "bench" in out
    code, out, err = run_cli(["bench", "--slots", "600", "--scenario", "unmap", "-o", str(tmp_path / "b2")], capsys)
    assert code == 2 and "above this kernel's memslot limit (509" in err
    assert not os.path.exists(tmp_path / "b2")
