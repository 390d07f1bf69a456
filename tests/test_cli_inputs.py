"""Every input answered with one line, nothing overwritten, nothing created before the input is
checked (issue 13, items 5, 6, 8, 9, 10, 11). No root: the tracer is a fake that fails the test
if a command gets as far as creating it when the input should have been refused."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sys
import threading

import pytest

from kvmtrace.cli import main
from kvmtrace.dashboard.model import ViewOptions
from kvmtrace.dashboard.plain import CsvSink, csv_columns
from kvmtrace.snapshot import HvaStats, Log2Hist, Snapshot, VmInfo

from .test_analysis_commands import FAKE_WORKLOAD, FakeSession

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")
BASIC = os.path.join(FIX, "basic")


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line_error(code, err, *needles, rc=2):
    assert code == rc, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(line.startswith(("kvmtrace: ", "Error: ")) for line in lines), err
    for n in needles:
        assert n in err, (n, err)


class NoTracer:
    """Stands in for TraceSession where the input must be refused before tracing starts."""

    def __init__(self, *a, **kw):
        raise AssertionError("the tracer was started although the input is invalid")


@pytest.fixture
def no_tracer(monkeypatch):
    import kvmtrace.tracer.session as session_mod

    monkeypatch.setattr(session_mod, "TraceSession", NoTracer, raising=False)


# ---------------------------------------------------------------------------- 5: top --csv escaping


def test_top_csv_escapes_hostile_vm_names(tmp_path):
    """issue 13 #5: a VMM named `@SUM(1+1)*cmd` or `-name '=HYPERLINK(...)'` landed raw in top's CSV."""
    vms = (VmInfo("pid:10", 10, comm="qemu", name='=HYPERLINK("http://x","y")', memslots=1),
           VmInfo("pid:11", 11, comm="@SUM(1+1)*cmd", memslots=1),
           VmInfo("pid:12", 12, comm="-2+3", memslots=1))
    hva = tuple(HvaStats(v.vm_id, v.pid, "unmap", count=5, lat_hist=Log2Hist.from_values([1000] * 5), lat_count=5,
                         lat_provenance="syscall") for v in vms)
    prev = Snapshot(1, 1000.0, 1_000_000_000, 1.0, vms=vms)
    cur = Snapshot(2, 1001.0, 2_000_000_000, 2.0, vms=vms, hva=hva)
    path = tmp_path / "top.csv"
    with CsvSink(str(path)) as sink:
        assert sink.write(cur, cur.delta(prev), None, ViewOptions()) == 3
    rows = list(csv.reader(path.open(newline="")))
    assert rows[0] == csv_columns()
    names = sorted(dict(zip(rows[0], r))["name"] for r in rows[1:])
    assert names == ["'-2+3", "'=HYPERLINK(\"http://x\",\"y\")", "'@SUM(1+1)*cmd"]
    for r in rows[1:]:
        for v in r:
            assert not v or v[0] not in "=+@\t\r" and not (v[0] == "-" and not v[1:2].isdigit()), v


# ---------------------------------------------------------------------------- 6: numbers


@pytest.mark.parametrize("args, needle", [
    (["top", "-i", "nan", "--once"], "--interval"),
    (["top", "-i", "inf", "--once"], "--interval"),
    (["top", "-i", "1e-9", "-d", "2"], "--interval"),
    (["top", "-d", "-1"], "--duration"),
    (["top", "-d", "nan"], "--duration"),
    (["top", "-p", "-5"], "--pid"),
    (["demo", "--duration", "nan"], "--duration"),
    (["demo", "--duration", "inf"], "--duration"),
    (["demo", "--interval", "nan"], "--interval"),
    (["workload", "--duration", "nan"], "--duration"),
    (["bench", "-o", "{tmp}/b", "--timeout", "0"], "--timeout"),
    (["bench", "-o", "{tmp}/b", "--timeout", "nan"], "--timeout"),
    (["bench", "-o", "{tmp}/b", "--interval", "0"], "--interval"),
    (["bench", "-o", "{tmp}/b", "--interval", "nan"], "--interval"),
    (["bench", "-o", "{tmp}/b", "--iterations", "0"], "--iterations"),
])
def test_numeric_options_are_finite_and_in_range(args, needle, tmp_path, capsys, no_tracer):
    """issue 13 #6: NaN/inf never returned, -d -1 printed nonsense, 1e-9 s intervals took 32 s,
    bench --interval 0 was refused only after creating the output directory."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_cli(args, capsys)
    one_line_error(code, err, needle)
    assert not os.path.exists(tmp_path / "b")  # nothing created


def test_bench_timeout_is_not_ok(tmp_path, capsys, monkeypatch):
    """issue 13 #6: `bench --timeout` stopping a run marked it ok with nothing traced."""
    import kvmtrace.commands.bench as b
    import kvmtrace.tracer.session as session_mod

    class Session(FakeSession):
        until_stop = True

    monkeypatch.setattr(session_mod, "TraceSession", Session, raising=False)
    script = tmp_path / "slow_workload.py"
    script.write_text("import time; time.sleep(30)\n" + FAKE_WORKLOAD)
    monkeypatch.setattr(b, "kernel_max_memslots", lambda: 509)
    monkeypatch.setattr(b, "workload_cmd", lambda slots, scen, it, out, size=None: [
        sys.executable, str(script), "--slots", str(slots), "--scenario", scen, "--json-out", out])
    d = tmp_path / "bench"
    code, out, err = run_cli(["bench", "--slots", "10", "--scenario", "unmap", "-o", str(d), "--timeout", "0.3",
                              "--runs", "1"], capsys)
    assert code == 1 and "Traceback" not in err
    idx = json.load(open(d / "kvmtrace-bench.json"))
    assert idx["runs"] == [] and [r["status"] for r in idx["failed_runs"]] == ["timeout"]
    assert "--timeout 0.3" in idx["failed_runs"][0]["error"]


def test_bench_output_parent_is_not_created(tmp_path, capsys, no_tracer, monkeypatch):
    import kvmtrace.commands.bench as b

    monkeypatch.setattr(b, "kernel_max_memslots", lambda: 509)
    code, out, err = run_cli(["bench", "-o", str(tmp_path / "no" / "b")], capsys)
    one_line_error(code, err, "no such directory")
    assert not os.path.exists(tmp_path / "no")


# ---------------------------------------------------------------------------- 8: demo


def test_demo_checks_csv_before_the_run(tmp_path, capsys, no_tracer):
    """issue 13 #8: `--csv /nonexistent/d.csv` failed after the whole run; an existing CSV was
    overwritten."""
    code, out, err = run_cli(["demo", "--csv", "/nonexistent-kvmtrace/d.csv"], capsys)
    one_line_error(code, err, "--csv", "no such directory")
    taken = tmp_path / "d.csv"
    taken.write_text("keep")
    code, out, err = run_cli(["demo", "--csv", str(taken)], capsys)
    one_line_error(code, err, "already exists", "--force")
    assert taken.read_text() == "keep"
    code, out, err = run_cli(["demo", "--csv", str(tmp_path)], capsys)
    one_line_error(code, err, "is a directory")


class DemoSession(FakeSession):
    until_stop = True

    def snapshot(self):
        return self._snaps[-1]


@pytest.fixture
def demo_env(tmp_path, monkeypatch):
    """A fake tracer, a fake workload executable, and a private temp directory to check for
    leftovers."""
    import tempfile

    import kvmtrace.tracer.session as session_mod

    DemoSession.instances = []
    monkeypatch.setattr(session_mod, "TraceSession", DemoSession, raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    if not os.path.exists("/dev/kvm"):
        real_exists = os.path.exists
        monkeypatch.setattr(os.path, "exists", lambda p: True if p == "/dev/kvm" else real_exists(p))

    def workload(body: str):
        exe = tmp_path / "fake-python"
        exe.write_text(f"#!{sys.executable}\n{body}\n")
        exe.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(exe))

    return tmp, workload


def test_demo_failure_leaves_no_temporary_files(tmp_path, capsys, demo_env):
    tmp, workload = demo_env
    workload("import sys; sys.stderr.write('boom\\n'); sys.exit(1)")
    code, out, err = run_cli(["demo", "--csv", str(tmp_path / "d.csv"), "--plain"], capsys)
    one_line_error(code, err, "the workload failed (exit 1): boom", rc=1)
    assert os.listdir(tmp) == []  # no kvmtrace-truth-*.json (or anything else) left behind


def test_demo_interrupted_writes_summary_and_csv(tmp_path, capsys, demo_env):
    """issue 13 #8: Ctrl-C printed "the workload failed (exit 130)", exited 1, wrote no summary."""
    tmp, workload = demo_env
    workload("import time; time.sleep(60)")
    t = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    try:
        code, out, err = run_cli(["demo", "--csv", str(tmp_path / "d.csv"), "--plain", "--duration", "30"], capsys)
    finally:
        t.cancel()
    assert code == 0, err
    assert "workload VM (pid" in out and "no ground truth" in out and "failed" not in err
    assert (tmp_path / "d.csv").read_text().startswith("table,")
    assert os.listdir(tmp) == []


# ---------------------------------------------------------------------------- 10, 11: outputs


def test_report_outputs_are_checked_first_and_never_overwritten(tmp_path, capsys):
    """issue 13 #11: report --csv/--html replaced existing files and created missing parents."""
    out_dir = tmp_path / "csv"
    out_dir.mkdir()
    (out_dir / "hva_ops.csv").write_text("keep")
    code, out, err = run_cli(["report", BASIC, "--csv", str(out_dir)], capsys)
    one_line_error(code, err, "hva_ops.csv", "--force")
    assert (out_dir / "hva_ops.csv").read_text() == "keep"
    code, out, err = run_cli(["report", BASIC, "--csv", str(out_dir), "--force"], capsys)
    assert code == 0, err
    assert (out_dir / "hva_ops.csv").read_text().startswith("source,") or "count" in (out_dir / "hva_ops.csv").read_text()
    html = tmp_path / "r.html"
    html.write_text("keep")
    code, out, err = run_cli(["report", BASIC, "--html", str(html)], capsys)
    one_line_error(code, err, "already exists")
    assert html.read_text() == "keep"
    code, out, err = run_cli(["report", BASIC, "--csv", str(tmp_path / "a" / "b")], capsys)
    one_line_error(code, err, "no such directory")
    assert not (tmp_path / "a").exists()
    code, out, err = run_cli(["report", BASIC, "--html", str(tmp_path / "a" / "r.html")], capsys)
    one_line_error(code, err, "no such directory")
    assert not (tmp_path / "a").exists()


def test_compare_outputs_one_line_errors(tmp_path, capsys):
    """issue 13 #10: `compare --csv DIR` or an unwritable path gave a traceback."""
    before, after = os.path.join(FIX, "bench-before"), os.path.join(FIX, "bench-after")
    code, out, err = run_cli(["compare", before, after, "--csv", str(tmp_path)], capsys)
    one_line_error(code, err, "is a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(str(ro), os.W_OK):  # root: a read-only mount stands in via /proc
            target = "/proc/kvmtrace-cmp.csv"
        else:
            target = str(ro / "c.csv")
        code, out, err = run_cli(["compare", before, after, "--csv", target], capsys)
        one_line_error(code, err, "--csv")
    finally:
        ro.chmod(0o700)
    taken = tmp_path / "c.csv"
    taken.write_text("keep")
    code, out, err = run_cli(["compare", before, after, "--csv", str(taken)], capsys)
    one_line_error(code, err, "already exists")
    assert taken.read_text() == "keep"
    code, out, err = run_cli(["compare", before, after, "--csv", str(taken), "--force"], capsys)
    assert code == 3, err  # written; one run per configuration: inconclusive
    assert taken.read_text().splitlines()[0].count(",") > 3


def test_top_csv_checked_before_tracing(tmp_path, capsys, no_tracer):
    code, out, err = run_cli(["top", "--once", "--csv", str(tmp_path / "no" / "t.csv")], capsys)
    one_line_error(code, err, "no such directory")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    code, out, err = run_cli(["top", "--once", "--csv", str(tmp_path / "bin.csv")], capsys)
    one_line_error(code, err, "not a kvmtrace top CSV")


@pytest.mark.parametrize("damage", ["binary", "types"])
def test_damaged_metadata_is_one_message(tmp_path, capsys, damage):
    """issue 13 #10: binary bytes or wrong types in the metadata file gave a traceback."""
    rec = tmp_path / "rec"
    shutil.copytree(BASIC, rec)
    meta = rec / "kvmtrace-recording.json"
    if damage == "binary":
        meta.write_bytes(b"\xff\xfe\x00\x01" + meta.read_bytes())
    else:
        m = json.loads(meta.read_text())
        m["tables"] = 5
        meta.write_text(json.dumps(m))
    code, out, err = run_cli(["report", str(rec)], capsys)
    one_line_error(code, err, "damaged")


def test_python_m_kvmtrace_and_workload_entry_points():
    """issue 10: `python -m kvmtrace` works; the workload child does not import the CLI."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "kvmtrace", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and "Commands:" in p.stdout
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('kvmtrace.workload', run_name='__main__')\n"
            "except SystemExit as e:\n    print('rc', e.code, 'kvmtrace.cli' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.strip().splitlines()[-1] == "rc 0 False", p.stdout + p.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root only): writes beyond it fail with ENOSPC."""
    import subprocess

    d = tmp_path / "full"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield d
    finally:
        r = subprocess.run(["umount", str(d)], capture_output=True, text=True)
        assert r.returncode == 0, f"umount {d}: {r.stderr} (a file left open on it?)"


def test_full_disk_is_one_line_and_leaves_nothing(full_disk, capsys):
    """issue 13 #10: a full disk while writing an output is one line; no half-written file."""
    (full_disk / "filler").write_bytes(b"\0" * 60 * 1024)
    code, out, err = run_cli(["report", BASIC, "--html", str(full_disk / "r.html")], capsys)
    one_line_error(code, err, "--html", "No space left")
    assert sorted(os.listdir(full_disk)) == ["filler"]
    code, out, err = run_cli(["report", BASIC, "--csv", str(full_disk / "csv")], capsys)
    one_line_error(code, err, "--csv", "No space left")
    assert sorted(os.listdir(full_disk)) == ["filler"]  # all tables or none; the new directory removed
    vms = (VmInfo("pid:10", 10, comm="qemu", memslots=1),)
    prev = Snapshot(1, 1000.0, 1_000_000_000, 1.0, vms=vms)
    cur = Snapshot(2, 1001.0, 2_000_000_000, 2.0, vms=vms)
    from kvmtrace.errors import DataFileError

    (full_disk / "filler").unlink()
    (full_disk / "filler").write_bytes(b"\0" * 56 * 1024)
    with pytest.raises(DataFileError, match="No space left"):
        with CsvSink(str(full_disk / "top.csv")) as sink:
            for _ in range(10_000):
                sink.write(cur, cur.delta(prev), None, ViewOptions())


def test_demo_summary_rows_against_truth():
    from kvmtrace.snapshot import MemslotStats
    from kvmtrace.workload.verify import hva_rows, memslot_rows, summary_lines

    snap = Snapshot(2, 1001.0, 2_000_000_000, 2.0, hva=(
        HvaStats("pid:5", 5, "unmap", count=7, lat_count=7, lat_sum_ns=7000, lat_provenance="syscall",
                 slots_count=7, slots_sum=7, slots_max=1, slots_provenance="derived"),
        HvaStats("pid:6", 6, "unmap", count=99)),
        memslot=(MemslotStats("pid:5", 5, "create", count=3, lat_sum_ns=3000, lat_provenance="syscall"),))
    truth = {"hva_ops": {"unmap": 8, "age": None}, "memslot_updates": {"create": 3, "delete": 0}}
    rows = {r.what: r for r in hva_rows(snap, 5, truth)}
    assert (rows["unmap"].traced, rows["unmap"].truth, rows["unmap"].match) == (7, 8, "-1")
    assert rows["unmap"].latency == "1.0 us (syscall)" and rows["unmap"].slots == "1.00/1 (derived)"
    assert (rows["age"].traced, rows["age"].match) == (0, "")
    ms = {r.what: r for r in memslot_rows(snap, 5, truth)}
    assert (ms["create"].match, ms["delete"].match) == ("equal", "equal")
    text = "\n".join(summary_lines(snap, 5, None, "interrupted"))
    assert "n/a" in text and "interrupted" in text and " 99 " not in text
