"""Fault suite for recordings (no tracer needed; root only for the tmpfs mounts):

- disk full during record, on a small tmpfs: one error line, status incomplete, nothing half
  written, no traceback, and what was kept reads back as a consistent prefix;
- SIGKILL at random points during record and during compaction: every readable result is a
  prefix of the intervals written and never exceeds the truth.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from kvmtrace.analysis.recorder import Recorder
from kvmtrace.analysis.recording import META_FILE, read_recording
from kvmtrace.errors import DataFileError, KvmtraceError
from tests.recfakes import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, LC_ALL="C.UTF-8")

RECORD = """
import sys
import kvmtrace.tracer.session as S
from tests.recfakes import CountingSession
CountingSession.per_interval = int(sys.argv[1])
CountingSession.max_snaps = int(sys.argv[2])
S.TraceSession = CountingSession
from kvmtrace.cli import main
main(sys.argv[3:])
"""


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(size):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode(errors='replace').strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def stray(p):
    return [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_disk_full_during_record(small_fs, fmt):
    mnt = small_fs("1m")
    p = mnt / "rec"
    r = subprocess.run([sys.executable, "-c", RECORD, "500", "100", "record", "-o", str(p), "--events",
                        "--format", fmt, "--interval", "0.01", "--duration", "60"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errs = [line for line in r.stderr.splitlines() if line.startswith("kvmtrace: ") and "attached" not in line]
    assert len(errs) == 1 and errs[0].startswith(f"kvmtrace: disk full while writing {p}: recording stopped, "
                                                 "status incomplete"), r.stderr
    assert "fix: free space" in r.stderr
    meta = json.loads((p / META_FILE).read_text())
    assert meta["status"] == "incomplete" and meta["error"] == "writing: disk full"
    assert stray(p) == [] and not (p / ".kvmtrace-reserve").exists()
    rec = read_recording(str(p))
    n = meta["intervals"]
    assert n > 0 and rec["intervals"]["interval"].tolist() == list(range(n))
    assert int(rec["hva"]["count"].sum()) == 500 * n == len(rec["hva_events"])
    assert not any("DAMAGED" in w for w in rec.warnings)
    assert any("recording stopped early (writing: disk full)" in w for w in rec.warnings)


def test_disk_full_during_compaction(small_fs):
    mnt = small_fs("2m")
    snaps, evs = synth(60, 2000, True)
    p = str(mnt / "rec")
    rec = Recorder(p, events=True, fsync=False, compact_every=5)
    with pytest.raises(KvmtraceError, match="disk full while (writing|compacting)") as e:
        prev = None
        for i, s in enumerate(snaps):
            rec.write(s.delta(prev), evs[i])
            prev = s
        rec.close()
    assert "Traceback" not in str(e.value)
    rec.close()  # closing after a failure is a no-op, not a second error
    meta = json.loads(open(os.path.join(p, META_FILE)).read())
    assert meta["status"] == "incomplete" and stray(p) == []
    r = read_recording(p)
    n = meta["intervals"]
    assert r["intervals"]["interval"].tolist() == list(range(n)) and n > 0
    assert len(r["hva_events"]) == 2000 * n


def test_disk_full_before_the_first_interval(small_fs):
    mnt = small_fs("64k")
    with pytest.raises(KvmtraceError, match="disk full while starting"):
        Recorder(str(mnt / "rec"), reserve=128 * 1024)
    with pytest.raises(DataFileError):
        read_recording(str(mnt / "rec"))


# ----------------------------------------------------------------------------------- SIGKILL

def write_then_exit(p, n, per, every, fmt):
    """Child after fork: record ``n`` intervals (``per`` unmaps each) and close, then exit."""
    try:
        snaps, evs = synth(n, per, True)
        rec = Recorder(p, fmt=fmt, events=True, fsync=False, compact_every=every)
        prev = None
        for i, s in enumerate(snaps):
            rec.write(s.delta(prev), evs[i])
            prev = s
        rec.close()
    finally:
        os._exit(0)


def check_prefix(p, per):
    """A recording after SIGKILL: refused as incomplete, or a prefix of the intervals whose
    counts equal exactly what those intervals held (never more than the truth)."""
    try:
        r = read_recording(p)
    except DataFileError as e:
        assert "Traceback" not in str(e)
        return 0
    iv = r["intervals"]["interval"].tolist()
    assert iv == list(range(len(iv)))
    assert int(r["hva"]["count"].sum()) == per * len(iv) == len(r["hva_events"])
    assert int(r["memslot"]["count"].sum()) == len(iv)
    assert not any("DAMAGED" in w for w in r.warnings), r.warnings
    return len(iv)


@pytest.mark.parametrize("fmt,every", [("parquet", 3), ("parquet", 1), ("csv", 1)])
def test_sigkill_at_random_points_leaves_a_prefix(tmp_path, fmt, every):
    rng = random.Random(1234 + every)
    synth(40, 300, True)
    seen = set()
    deadline = time.monotonic() + 20
    kills = 0
    while kills < 10 and time.monotonic() < deadline:
        p = str(tmp_path / f"r{kills}")
        pid = os.fork()  # no interpreter start per kill: the suite stays fast
        if pid == 0:
            write_then_exit(p, 40, 300, every, fmt)
        time.sleep(rng.uniform(0, 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        seen.add(check_prefix(p, 300))
    assert kills >= 8
    print(f"SIGKILL {fmt} compact_every={every}: prefixes read {sorted(seen)}")
    assert len(seen) >= 2, seen  # the kills landed at different points
