"""No write through a link, no write into someone else's directory (issue 20, item 2).

kvmtrace runs as root; anyone who can put a name where kvmtrace writes could make it overwrite
a file of root's (a symbolic link at the temporary or the final name, a fifo), or could swap
files under it (a directory another user owns or may write). Each test plants what an attacker
would and checks that the planted target is untouched and the output is a regular file of its
own: every output goes through kvmtrace/output.py (O_EXCL|O_NOFOLLOW files relative to a checked
directory descriptor, random temporary names, rename onto the name). The old temporary names
(``NAME.tmpPID``, ``kvmtrace-recording.json.tmp``, ``part-K.parquet.tmp``) are planted too: the
code before this change wrote through them. Tests that chown need root (they skip without)."""

from __future__ import annotations

import errno
import json
import os
import pwd
import stat

import pytest

from kvmtrace import output
from kvmtrace.analysis.recorder import Recorder
from kvmtrace.analysis.recording import META_FILE, read_recording
from kvmtrace.analysis.report import Report
from kvmtrace.analysis.rotation import ROTATION_FILE
from kvmtrace.dashboard.plain import CsvSink, csv_columns
from kvmtrace.errors import DataFileError, UsageError
from tests.recfakes import CountingSession, synth
from tests.test_analysis_commands import FakeSession, fake_session, run_cli  # noqa: F401 (fixture)

PRECIOUS = b"root's own file\n"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")


@pytest.fixture
def victim(tmp_path):
    """A file of root's elsewhere (stands for /etc/shadow): it must never change."""
    d = tmp_path / "etc"
    d.mkdir()
    files = []

    def make(name="shadow"):
        p = d / f"{name}{len(files)}"
        p.write_bytes(PRECIOUS)
        files.append(p)
        return p

    make.files = files
    return make


def untouched(victim):
    return [str(p) for p in victim.files if p.read_bytes() != PRECIOUS] == []


def plant(link, target):
    os.symlink(str(target), str(link))


def one_line_error(code, err, *parts):
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kvmtrace: ")]
    assert len(lines) == 1, err
    for p in parts:
        assert p in err, err


@pytest.fixture
def recording(tmp_path, capsys, fake_session):  # noqa: F811
    p = tmp_path / "rec"
    code, _, err = run_cli(["record", "-o", str(p)], capsys)
    assert code == 0, err
    return p


# ------------------------------------------------------------------ report, compare, workload, top


def test_report_csv_and_html_never_write_through_links(tmp_path, capsys, recording, victim):
    pid = os.getpid()
    html = tmp_path / "r.html"
    plant(html, victim())                            # the final name (replaced with --force)
    plant(f"{html}.tmp{pid}", victim())              # the temporary name of the code before
    out = tmp_path / "csv"
    out.mkdir(mode=0o700)
    for t in Report.TABLES:
        plant(out / f"{t}.csv", victim())
        plant(out / f"{t}.csv.part.tmp{pid}", victim())
    code, _, err = run_cli(["report", str(recording), "--csv", str(out), "--html", str(html), "--force"], capsys)
    assert code == 0, err
    assert untouched(victim)
    assert not html.is_symlink() and html.read_text().lstrip().lower().startswith("<!doctype html")
    for t in Report.TABLES:
        f = out / f"{t}.csv"
        assert not f.is_symlink() and f.stat().st_size > 0
    planted = {f"{t}.csv" for t in Report.TABLES} | {f"{t}.csv.part.tmp{pid}" for t in Report.TABLES}
    assert set(os.listdir(out)) == planted  # no temporary file left behind


def test_compare_never_writes_through_a_link_or_a_fifo(tmp_path, capsys, recording, victim):
    pid = os.getpid()
    csv_out, html = tmp_path / "cmp.csv", tmp_path / "cmp.html"
    plant(csv_out, victim())
    plant(html, victim())
    plant(f"{html}.tmp{pid}", victim())
    os.mkfifo(f"{csv_out}.tmp{pid}")  # someone reads it: a write into it would succeed
    reader = os.open(f"{csv_out}.tmp{pid}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        code, _, err = run_cli(["compare", str(recording), str(recording), "--csv", str(csv_out),
                                "--html", str(html), "--force"], capsys)
        assert code == 3, err  # one recording a side: inconclusive, but written
        try:
            leaked = os.read(reader, 1 << 16)
        except BlockingIOError:
            leaked = b""
    finally:
        os.close(reader)
    assert leaked == b"", leaked[:80]
    assert untouched(victim)
    assert stat.S_ISREG(os.lstat(csv_out).st_mode) and csv_out.stat().st_size > 0
    assert stat.S_ISREG(os.lstat(html).st_mode)


def test_workload_json_out_never_writes_through_links(tmp_path, victim):
    from kvmtrace.workload import Workload

    path = tmp_path / "truth.json"
    plant(path, victim())
    plant(f"{path}.tmp{os.getpid()}", victim())
    Workload(slots=8, scenario="unmap", iterations=1).write_ground_truth(str(path))
    assert untouched(victim)
    assert not path.is_symlink() and json.loads(path.read_text())["tool"]


def test_top_csv_refuses_a_link(tmp_path):
    target = tmp_path / "etc-empty"  # an empty file of root's: the old check let it through
    target.write_bytes(b"")
    link = tmp_path / "top.csv"
    plant(link, target)
    with pytest.raises(DataFileError, match="symbolic link"):
        CsvSink(str(link))
    assert target.read_bytes() == b""


@needs_root
def test_top_csv_appends_only_to_its_own_file(tmp_path):
    path = tmp_path / "top.csv"
    CsvSink(str(path)).close()  # a top CSV file: header only
    before = path.read_bytes()
    os.chown(path, nobody(), -1)
    with pytest.raises(DataFileError, match="not yours alone"):
        CsvSink(str(path))
    os.chown(path, 0, -1)
    os.link(path, tmp_path / "elsewhere.csv")  # a hard link: the name may be someone's file
    with pytest.raises(DataFileError, match="2 links"):
        CsvSink(str(path))
    assert path.read_bytes() == before
    os.unlink(tmp_path / "elsewhere.csv")
    with CsvSink(str(path)):
        pass
    assert next(iter(path.read_text().splitlines())).split(",") == csv_columns()


def test_top_csv_refuses_a_swap_between_check_and_open(tmp_path, monkeypatch):
    """The file appended to is the file checked: the link planted after the check is not followed."""
    target = tmp_path / "etc-empty"
    target.write_bytes(b"")
    path = tmp_path / "top.csv"
    real_check = CsvSink.check

    def check_then_swap(p):
        n = real_check(p)
        plant(p, target)
        return n

    monkeypatch.setattr(CsvSink, "check", staticmethod(check_then_swap))
    with pytest.raises(DataFileError):
        CsvSink(str(path))
    assert target.read_bytes() == b""


# ------------------------------------------------------------------ record: links and directories


def test_recorder_never_writes_through_a_planted_temporary_name(tmp_path, victim):
    """A name planted in the recording directory while it records (the old fixed temporary
    names of the metadata and of a Parquet part) is never opened."""
    snaps, evs = synth(6, 10, True)
    p = tmp_path / "rec"
    rec = Recorder(str(p), events=True, fsync=False, compact_every=3)
    plant(p / "kvmtrace-recording.json.tmp", victim())
    plant(p / "hva" / "part-000000.parquet.tmp", victim())
    plant(p / "hva" / "part-000001.parquet.tmp", victim())
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    rec.close()
    assert untouched(victim)
    r = read_recording(str(p))
    assert r.meta["status"] == "complete" and int(r["hva"]["count"].sum()) == 60


@needs_root
def test_issue_reproduction_directory_of_another_user(tmp_path, victim):
    """The finding: an unprivileged user makes the directory, root records into it, the user
    plants kvmtrace-recording.json.tmp -> a root file, and root overwrites that file. Now the
    directory is refused before anything is written."""
    snaps, _ = synth(2, 10, False)
    d = tmp_path / "rec"
    d.mkdir(mode=0o755)
    os.chown(d, nobody(), nobody())
    target = victim()
    try:
        rec = Recorder(str(d), fsync=False)
    except UsageError as e:
        assert "owned by nobody" in e.message and "chown" in e.remedy
    else:  # the old code: the attacker plants the link once recording has started
        plant(d / "kvmtrace-recording.json.tmp", target)
        os.lchown(d / "kvmtrace-recording.json.tmp", nobody(), nobody())
        rec.write(snaps[0].delta(None))
        rec.close()
        pytest.fail(f"recorded into a directory of nobody's; {target} now holds {target.read_bytes()[:40]!r}")
    assert untouched(victim) and os.listdir(d) == []


@pytest.fixture
def fake(monkeypatch):
    import kvmtrace.tracer.session as session_mod

    CountingSession.instances = []
    CountingSession.max_snaps = 400
    monkeypatch.setattr(session_mod, "TraceSession", CountingSession, raising=False)
    return CountingSession


ROTATE = ["--rotate", "1m", "--duration", "0.05", "--interval", "0.01"]
ONCE = ["--duration", "0.05", "--interval", "0.01"]


@needs_root
@pytest.mark.parametrize("extra", [ONCE, ROTATE], ids=["record", "rotate"])
@pytest.mark.parametrize("how", ["nobody", "0777", "0770"])
def test_record_refuses_a_directory_others_control(tmp_path, capsys, fake, extra, how):
    d = tmp_path / "out"
    d.mkdir()
    if how == "nobody":
        os.chown(d, nobody(), -1)
        os.chmod(d, 0o700)
        want = "is owned by nobody"
    else:
        os.chmod(d, int(how, 8))
        want = f"is writable by {'group and others' if how == '0777' else 'group'} (mode {int(how, 8):04o})"
    code, _, err = run_cli(["record", "-o", str(d)] + extra, capsys)
    one_line_error(code, err, want, "fix: ")
    assert fake.instances == [] and os.listdir(d) == []


@needs_root
def test_rotate_refuses_to_continue_a_directory_of_another_user(tmp_path, capsys, fake):
    d = tmp_path / "rot"
    code, _, err = run_cli(["record", "-o", str(d)] + ROTATE, capsys)
    assert code == 0, err
    before = (d / ROTATION_FILE).read_bytes()
    os.chown(d, nobody(), -1)
    code, _, err = run_cli(["record", "-o", str(d)] + ROTATE, capsys)
    one_line_error(code, err, "is owned by nobody")
    assert len(fake.instances) == 1 and (d / ROTATION_FILE).read_bytes() == before


def test_rotate_refuses_a_symlinked_directory(tmp_path, capsys, fake):
    real = tmp_path / "real"
    code, _, err = run_cli(["record", "-o", str(real)] + ROTATE, capsys)
    assert code == 0, err
    link = tmp_path / "link"
    plant(link, real)
    n = len(os.listdir(real))
    code, _, err = run_cli(["record", "-o", str(link)] + ROTATE, capsys)
    one_line_error(code, err, "is a symbolic link", "readlink -f")
    assert len(os.listdir(real)) == n and len(fake.instances) == 1


# ------------------------------------------------------------------ report --csv directories


def test_report_csv_refuses_a_symlinked_directory(tmp_path, capsys, recording):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    plant(tmp_path / "link", real)
    code, _, err = run_cli(["report", str(recording), "--csv", str(tmp_path / "link")], capsys)
    one_line_error(code, err, "is a symbolic link")
    assert os.listdir(real) == []


@needs_root
def test_report_csv_refuses_a_directory_of_another_user(tmp_path, capsys, recording):
    d = tmp_path / "csv"
    d.mkdir(mode=0o755)
    os.chown(d, nobody(), -1)
    code, _, err = run_cli(["report", str(recording), "--csv", str(d)], capsys)
    one_line_error(code, err, "is owned by nobody")
    assert os.listdir(d) == []


def test_report_csv_creates_its_directory_0750(tmp_path, capsys, recording):
    old = os.umask(0o002)  # even a permissive umask: never group- or world-writable
    try:
        code, _, err = run_cli(["report", str(recording), "--csv", str(tmp_path / "csv")], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "csv").st_mode) == 0o750


# ------------------------------------------------------------------ the primitives


def test_a_planted_temporary_name_is_skipped(tmp_path, monkeypatch, victim):
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(output.secrets, "token_hex", lambda n: next(names))
    plant(tmp_path / "out.csv.aaaa.tmp", victim())
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, tmp = output.create_temp("out.csv", dfd)
        os.write(fd, b"x")
        os.close(fd)
    finally:
        os.close(dfd)
    assert tmp == "out.csv.bbbb.tmp" and untouched(victim)


def test_no_free_temporary_name_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(output.secrets, "token_hex", lambda n: "aaaa")
    os.mkfifo(tmp_path / "out.csv.aaaa.tmp")
    with pytest.raises(UsageError, match=r"cannot write --csv .*out.csv: .*no free temporary name") as e:
        output.write_text(str(tmp_path / "out.csv"), "x", "--csv")
    assert "\n" not in e.value.message
    assert not (tmp_path / "out.csv").exists()


def test_an_existing_name_is_never_opened(tmp_path, victim):
    plant(tmp_path / "x", victim())
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            output.create_file("x", dfd)
    finally:
        os.close(dfd)
    assert e.value.errno == errno.EEXIST and untouched(victim)


@pytest.mark.parametrize("what", ["html", "csv-dir"])
def test_a_name_that_appears_during_the_work_is_not_replaced_without_force(tmp_path, monkeypatch, victim, what):
    """`never replace without --force` holds even for a name planted after the check: the
    finished file is hard-linked onto its name (fails if the name exists), not renamed."""
    import pandas as pd

    from kvmtrace.analysis import export

    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    name = out / ("r.html" if what == "html" else "b.csv")
    real = output.create_temp

    def create_then_plant(n, dfd, mode=0o666):
        r = real(n, dfd, mode)
        if not os.path.lexists(name):
            plant(name, victim())
        return r

    monkeypatch.setattr(output, "create_temp", create_then_plant)
    with pytest.raises(UsageError, match="appeared while kvmtrace was working") as e:
        if what == "html":
            export.write_text(str(name), "<html></html>", "--html", force=False)
        else:
            export.write_csv_tables({"a": pd.DataFrame({"x": [1]}), "b": pd.DataFrame({"y": [2]})}, str(out))
    assert "--force" in e.value.remedy
    assert name.is_symlink() and untouched(victim)
    assert os.listdir(out) == [name.name]  # all or nothing: a.csv is not left either, no temporary file


@needs_root
def test_a_trailing_slash_does_not_follow_a_link(tmp_path):
    """`-o link/` resolves the link in a path lookup even with O_NOFOLLOW: it is stripped."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.chown(real, nobody(), -1)
    os.chmod(real, 0o700)  # nobody's, and kvmtrace (root) may still write it
    plant(tmp_path / "link", real)
    fd = None
    with pytest.raises(UsageError, match="is a symbolic link"):
        fd = output.open_dir(str(tmp_path / "link") + "/", "-o", create=True)
    assert fd is None and os.listdir(real) == []
