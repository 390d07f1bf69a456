"""kvmtrace record's own behaviour against a fake TraceSession (no root): numeric options
validated before anything is created, output paths, privacy, the `attached` line, non-UTF-8
paths and labels, continuous recording (--rotate, --keep, SIGHUP) and a second signal while
the recording closes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from kvmtrace.analysis.recording import META_FILE, read_inputs, read_recording
from kvmtrace.analysis.rotation import read_rotated
from tests.recfakes import CountingSession
from tests.test_analysis_commands import run_cli


@pytest.fixture
def fake(monkeypatch):
    import kvmtrace.tracer.session as session_mod

    CountingSession.instances = []
    CountingSession.max_snaps = 400
    monkeypatch.setattr(session_mod, "TraceSession", CountingSession, raising=False)
    return CountingSession


@pytest.mark.parametrize("args,msg", [
    (["--interval", "nan"], "--interval must be a finite number of seconds >= 0.01 and <= 3600, not nan"),
    (["--interval", "inf"], "--interval must be"),
    (["--interval", "0"], "--interval must be"),
    (["--interval", "1e-9"], "--interval must be"),
    (["--duration", "nan"], "--duration must be a finite number of seconds > 0, not nan"),
    (["--duration", "inf"], "--duration must be"),
    (["--duration", "-1"], "--duration must be"),
    (["--pid", "0"], "--pid must be an integer >= 1"),
    (["--rotate", "nan"], "--rotate must be"),
    (["--rotate", "0.5"], "--rotate must be"),
    (["--rotate", "soon"], "--rotate 'soon' is not a duration"),
    (["--rotate", "1m", "--keep", "0"], "--keep must be an integer >= 1"),
    (["--keep", "3"], "--keep only applies with --rotate"),
    (["--share-group", "no-such-group-kvmtrace"], "no such group"),
])
def test_bad_numbers_are_refused_before_anything_is_created(tmp_path, capsys, fake, args, msg):
    p = tmp_path / "rec"
    code, out, err = run_cli(["record", "-o", str(p)] + args, capsys)
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert err.startswith("kvmtrace: ") and "fix: " in err
    assert not p.exists() and fake.instances == []


def test_missing_parent_is_not_created(tmp_path, capsys, fake):
    p = tmp_path / "a" / "b" / "rec"
    code, out, err = run_cli(["record", "-o", str(p), "--duration", "0.1"], capsys)
    assert code == 2 and f"parent directory {tmp_path / 'a' / 'b'} does not exist" in err
    assert f"mkdir -p {tmp_path / 'a' / 'b'}" in err
    assert not (tmp_path / "a").exists() and fake.instances == []


def test_existing_recording_is_never_overwritten(tmp_path, capsys, fake):
    p = tmp_path / "rec"
    code, out, err = run_cli(["record", "-o", str(p), "--duration", "0.05", "--interval", "0.01"], capsys)
    assert code == 0, err
    before = (p / META_FILE).read_bytes()
    code, out, err = run_cli(["record", "-o", str(p), "--duration", "0.05", "--interval", "0.01"], capsys)
    assert code == 2 and "already exists" in err and len(fake.instances) == 1
    assert (p / META_FILE).read_bytes() == before


def modes_of(p):
    out = {}
    for d, dirs, files in os.walk(p):
        out[d] = stat.S_IMODE(os.stat(d).st_mode)
        for f in files:
            out[os.path.join(d, f)] = stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
    return out


def test_recordings_are_private_by_default(tmp_path, capsys, fake):
    p = tmp_path / "rec"
    old = os.umask(0o022)
    try:
        code, out, err = run_cli(["record", "-o", str(p), "--events", "--duration", "0.1", "--interval", "0.02"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    modes = modes_of(p)
    assert len(modes) > 8
    assert {m for f, m in modes.items() if os.path.isdir(f)} == {0o700}
    assert {m for f, m in modes.items() if not os.path.isdir(f)} == {0o600}


def test_share_group_makes_it_group_readable(tmp_path, capsys, fake):
    import grp

    g = grp.getgrgid(os.getgid()).gr_name
    p = tmp_path / "rec"
    code, out, err = run_cli(["record", "-o", str(p), "--duration", "0.05", "--interval", "0.01", "--share-group", g],
                             capsys)
    assert code == 0, err
    modes = modes_of(p)
    assert {m for f, m in modes.items() if os.path.isdir(f)} == {0o750}
    assert {m for f, m in modes.items() if not os.path.isdir(f)} == {0o640}
    assert {os.stat(f).st_gid for f in modes} == {os.getgid()}


def test_attached_line_on_stderr_once(tmp_path, capsys, fake):
    p = tmp_path / "rec"
    code, out, err = run_cli(["record", "-o", str(p), "--duration", "0.05", "--interval", "0.01"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("kvmtrace: attached")]
    assert lines == [f"kvmtrace: attached, recording to {p}"]
    assert "kvmtrace: attached" not in out


SCRIPT = """
import sys
import kvmtrace.tracer.session as S
from tests.recfakes import CountingSession
from tests.test_analysis_commands import run_cli
S.TraceSession = CountingSession
from kvmtrace.cli import main
main(sys.argv[1:])
"""


def test_non_utf8_path_and_label_no_traceback(tmp_path):
    root = os.fsencode(str(tmp_path))
    p = root + b"/rec-\xff\xfe"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), LC_ALL="C.UTF-8")
    r = subprocess.run([sys.executable, "-c", SCRIPT, b"record", b"-o", p, b"--label", b"lab\xffel", b"--duration",
                        b"0.1", b"--interval", b"0.02"], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert os.path.isdir(p)
    for args in ([b"report", p], [b"report", p, b"--json"]):
        r = subprocess.run([sys.executable, "-m", "kvmtrace.cli"] + args, capture_output=True, env=env, timeout=120)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["sources"][0]["label"] == "lab\ufffdel"


def test_rotation_no_gap_keep_and_report_over_the_directory(tmp_path, capsys, fake):
    p = tmp_path / "rot"
    code, out, err = run_cli(["record", "-o", str(p), "--rotate", "1", "--interval", "0.05", "--duration", "3.5"],
                             capsys)
    assert code == 0, err
    s = fake.instances[0]
    idx = json.loads((p / "kvmtrace-rotation.json").read_text())
    assert len(idx["recordings"]) >= 2 and idx["deleted"] == []  # about 4; fewer on a loaded machine
    total = 0
    for n in idx["recordings"]:
        r = read_recording(str(p / n))
        assert r.meta["status"] == "complete" and r.warnings == []
        total += int(r["hva"]["count"].sum())
    assert total == s.truth_unmaps()  # counts differenced across every boundary: no gap, no overlap
    rep = read_rotated(str(p))
    assert int(rep["hva"]["count"].sum()) == s.truth_unmaps()
    assert rep["intervals"]["interval"].tolist() == list(range(len(rep["intervals"])))
    assert sum(int(r["hva"]["count"].sum()) for r in read_inputs([str(p)])) == s.truth_unmaps()
    code, out, err = run_cli(["report", str(p), "--json"], capsys)
    assert code == 0, err
    unmap = [h for h in json.loads(out)["hva_ops"] if h["op"] == "unmap"]
    assert sum(h["count"] for h in unmap) == s.truth_unmaps()
    assert [line for line in err.splitlines() if "attached" in line] == []


def test_rotation_keep_deletes_the_oldest(tmp_path, capsys, fake):
    p = tmp_path / "rot"
    code, out, err = run_cli(["record", "-o", str(p), "--rotate", "1", "--keep", "1", "--interval", "0.05",
                              "--duration", "3.5"], capsys)
    assert code == 0, err
    idx = json.loads((p / "kvmtrace-rotation.json").read_text())
    assert len(idx["recordings"]) == 1 and len(idx["deleted"]) >= 1
    assert sorted(os.listdir(p)) == sorted(idx["recordings"] + ["kvmtrace-rotation.json"])
    rep = read_rotated(str(p))
    assert any("deleted by --keep" in w for w in rep.warnings)


def test_sighup_rotates_now(tmp_path, capsys, fake, monkeypatch):
    import kvmtrace.tracer.session as session_mod

    class HupSession(CountingSession):
        def snapshots(self, duration=None, stop=None):
            for snap in super().snapshots(duration, stop):
                if self.i == 4:  # once, while the first recording runs (the handler is installed)
                    os.kill(os.getpid(), signal.SIGHUP)
                yield snap

    monkeypatch.setattr(session_mod, "TraceSession", HupSession, raising=False)
    p = tmp_path / "rot"
    code, out, err = run_cli(["record", "-o", str(p), "--rotate", "1h", "--interval", "0.05", "--duration", "1.2"],
                             capsys)
    assert code == 0, err
    idx = json.loads((p / "kvmtrace-rotation.json").read_text())
    assert len(idx["recordings"]) == 2
    first = read_recording(str(p / idx["recordings"][0]))
    assert first.meta["stopped_by"] == "rotate" and len(first["intervals"]) == 5
    rep = read_rotated(str(p))
    assert int(rep["hva"]["count"].sum()) == fake.instances[0].truth_unmaps()


def test_second_signal_while_closing_keeps_every_event(tmp_path, monkeypatch):
    """Ctrl-C twice: the second arrives while a journal is being compacted into a part (it used
    to leave an empty part that readers preferred over the journal, status still complete)."""
    import pyarrow.parquet as pq

    from kvmtrace.analysis import recorder as R
    from kvmtrace.commands.record import stop_on_signals
    from tests.recfakes import synth

    snaps, evs = synth(6, 200, True)
    p = str(tmp_path / "r")
    sent = []

    class Writer(pq.ParquetWriter):
        def __init__(self, *a, **k):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, mid-compaction
            super().__init__(*a, **k)

    monkeypatch.setattr(pq, "ParquetWriter", Writer)
    flag = threading.Event()
    with pytest.raises(KeyboardInterrupt):  # delivered once the recording is safe
        with stop_on_signals(flag):
            flag.set()  # the first Ctrl-C
            with R.Recorder(p, events=True, fsync=False) as rec:
                prev = None
                for i, s in enumerate(snaps):
                    rec.write(s.delta(prev), evs[i])
                    prev = s
                rec.close(status="complete")
    monkeypatch.undo()
    assert sent
    r = read_recording(p)
    assert len(r["hva_events"]) == 1200 and int(r["hva"]["count"].sum()) == 1200
    assert len(r["vms"]) == 6 and r["intervals"]["interval"].tolist() == list(range(6))
    assert r.meta["status"] == "complete" and r.warnings == []
    left = sorted(os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs)
    assert [f for f in left if not f.endswith(".parquet") and f != META_FILE] == []  # no journal, tmp, reserve


def test_rotation_restart_continues_the_directory(tmp_path, capsys, fake):
    p = tmp_path / "rot"
    args = ["record", "-o", str(p), "--rotate", "1", "--keep", "3", "--interval", "0.05", "--duration", "1.5"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    first = fake.instances[0].truth_unmaps()
    code, out, err = run_cli(args, capsys)  # as a service restart does
    assert code == 0, err
    idx = json.loads((p / "kvmtrace-rotation.json").read_text())
    names = idx["deleted"] + idx["recordings"]
    assert [int(n.split("-")[0]) for n in names] == sorted(int(n.split("-")[0]) for n in names)
    assert len(set(names)) == len(names) >= 2 and len(idx["recordings"]) <= 3
    rep = read_rotated(str(p))
    kept = sum(int(read_recording(str(p / n))["hva"]["count"].sum()) for n in idx["recordings"])
    assert int(rep["hva"]["count"].sum()) == kept <= first + fake.instances[1].truth_unmaps()


def test_rotation_with_a_damaged_recording_reads_the_ones_before_it(tmp_path, capsys, fake):
    p = tmp_path / "rot"
    code, out, err = run_cli(["record", "-o", str(p), "--rotate", "1", "--interval", "0.05", "--duration", "3.5"],
                             capsys)
    assert code == 0, err
    idx = json.loads((p / "kvmtrace-rotation.json").read_text())
    os.unlink(p / idx["recordings"][1] / "hva" / "part-000000.parquet")
    rep = read_rotated(str(p))
    assert int(rep["hva"]["count"].sum()) == int(read_recording(str(p / idx["recordings"][0]))["hva"]["count"].sum())
    assert any("DAMAGED recording " + idx["recordings"][1] in w for w in rep.warnings)


DEFAULT_SIGTERM = """
import os, signal, sys
import pyarrow.parquet as pq
from kvmtrace.analysis.recorder import Recorder
from tests.recfakes import synth

class Writer(pq.ParquetWriter):
    def __init__(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # default action: terminate, once the recording is safe
        super().__init__(*a, **k)

pq.ParquetWriter = Writer
snaps, evs = synth(4, 100, True)
with Recorder(sys.argv[1], events=True, fsync=False) as rec:
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    rec.close()
print("survived")
"""


def test_sigterm_with_default_action_waits_for_the_close_then_terminates(tmp_path):
    p = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", DEFAULT_SIGTERM, str(p)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == -signal.SIGTERM and "survived" not in r.stdout, r.stderr
    rec = read_recording(str(p))
    assert rec.meta["status"] == "complete" and len(rec["hva_events"]) == 400 and rec.warnings == []


LATE_SIGINT = """
import os, signal, sys, time
import click
from kvmtrace.commands import run_click

@click.command()
def done():
    click.echo("work saved")

real_exit = sys.exit

def exiting(code=0):
    os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C arrives while the process exits
    time.sleep(0.2)
    print("exit", code, flush=True)
    real_exit(code)

sys.exit = exiting
run_click(done, None, "t")
"""


def test_a_late_sigint_after_the_command_does_not_kill_the_exit():
    """CI once saw `record` die by SIGINT (-2) after a complete recording: the second Ctrl-C came
    after the stop handler was put back. A program run ignores SIGINT once the command is over."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", LATE_SIGINT], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["work saved", "exit 0"], (r.returncode, r.stdout, r.stderr)
