"""compare on the real workload (root): an A/A comparison stays quiet, an A/B with a real
difference gets the matching verdicts and exit status.

Cost: 9 runs, each its own process and tracer start (BPF compile, ~7 s of CPU): about 2 minutes
of CPU in all (measured: 1m49 user + 10 s sys; 5 to 11 minutes wall on a host at load 13-20). The A/B difference is the workload's slot size: unmap-chunked over 64
memslots of 2 MiB (each 2 MiB unmap visits 1 slot; 128 MiB to fault in per iteration) against
64 memslots of 64 KiB (each 2 MiB unmap visits 32 slots; 4 MiB per iteration): slots visited per
op is a regression, time per iteration an improvement, whatever the host's noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvmtrace.tracer import session as S

pytestmark = pytest.mark.root
WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)

KT = [sys.executable, "-m", "kvmtrace.cli"]
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), COLUMNS="160")


def bench(out, slot_size, runs):
    subprocess.run(KT + ["bench", "--slots", "64", "--scenario", "unmap-chunked", "--slot-size", slot_size,
                         "--iterations", "3", "--runs", str(runs), "-o", str(out)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)


def split(src, dst, keep):
    """A bench directory holding the runs ``keep`` (0-based) of ``src``, pointing at its recordings."""
    idx = json.loads((src / "kvmtrace-bench.json").read_text())
    idx["runs"] = [dict(r, recording=os.path.relpath(src / r["recording"], dst)) for i, r in enumerate(idx["runs"]) if i in keep]
    dst.mkdir()
    (dst / "kvmtrace-bench.json").write_text(json.dumps(idx))
    return dst


def compare(before, after):
    p = subprocess.run(KT + ["compare", str(before), str(after), "--json"], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 2, p.stderr
    doc = json.loads(p.stdout)
    return p.returncode, doc, {(r["op"], r["metric"]): r for r in doc["rows"]}


def test_aa_quiet_and_ab_decided(tmp_path):
    bench(tmp_path / "big", "2M", runs=6)
    bench(tmp_path / "small", "64k", runs=3)
    # A/A: runs 1, 3, 5 against runs 2, 4, 6 of the same configuration (interleaved: no drift)
    a1 = split(tmp_path / "big", tmp_path / "aa1", {0, 2, 4})
    a2 = split(tmp_path / "big", tmp_path / "aa2", {1, 3, 5})
    code, doc, rows = compare(a1, a2)
    print("A/A:", [r["line"] for r in doc["rows"]])
    assert doc["sides"]["before"]["warnings"] == [] and doc["sides"]["after"]["warnings"] == []
    assert ("time/iter", "time/iter") in rows and ("unmap", "p50") in rows and ("unmap", "visited") in rows
    assert all(r["runs_before"] == r["runs_after"] == 3 for r in doc["rows"])
    assert doc["summary"]["regression"] == doc["summary"]["improvement"] == 0, doc["summary"]
    assert code in (0, 3) and code == doc["exit_status"]
    # A/B: 2 MiB slots (6 runs) against 64 KiB slots (3 runs)
    code, doc, rows = compare(tmp_path / "big", tmp_path / "small")
    print("A/B:", [r["line"] for r in doc["rows"]])
    assert rows[("unmap", "visited")]["verdict"] == "regression" and rows[("unmap", "visited")]["ratio"] > 10
    assert rows[("time/iter", "time/iter")]["verdict"] == "improvement"
    assert code == 1 == doc["exit_status"]
