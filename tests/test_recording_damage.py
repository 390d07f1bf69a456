"""Damaged files never crash the reader (issue 20, item 6), and a damaged middle part keeps the
intact prefix (docs/recording-guarantees.md).

- A part with random bytes appended made 3 of 30 `report --json` runs die with SIGABRT
  ("terminate called without an active exception") after the right one-line error: pyarrow read
  the part from a Python file object through a dataset scan, and a pool thread tearing the scan
  down released the last reference to a Python-owned buffer while the interpreter was exiting
  (integrity.py, module doc). Only a program shows it, at exit, so the test runs
  `report --json` as a program, many times.
- A bit flip in a middle part refused the whole recording (pyarrow failed on the part before
  the checksums were compared).
- Byte-level damage of every file of a small recording: exit status 0 with exactly the counts
  of the intervals read (the prefix before the damaged file, with a DAMAGED warning naming the
  loss), or one error line with its fix and exit status 2 (only when the damaged file begins at
  interval 0, or the metadata is unreadable); never a signal, never a traceback.

No root."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from kvmtrace.analysis.recording import META_FILE, read_recording
from kvmtrace.analysis.synth import record_synthetic
from tests.recfakes import synth

N, PER, EVERY = 6, 10, 2  # 6 intervals, 10 unmaps and 1 memslot create each, a part per 2 intervals
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    snaps, evs = synth(N, PER, True)
    return record_synthetic(str(tmp_path_factory.mktemp("orig") / "rec"), snaps, evs, compact_every=EVERY)


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A recording whose recorder stopped without closing: intervals 0..3 in parts, 4..5 in
    journals (read from memory, and scanned by DuckDB as registered Arrow tables)."""
    from kvmtrace.analysis.recorder import Recorder

    snaps, evs = synth(N, PER, True)
    p = str(tmp_path_factory.mktemp("open") / "rec")
    rec = Recorder(p, events=True, fsync=False, compact_every=4)
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    return p


def files_of(p):
    return sorted(os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs)


def copy(original, tmp_path, name="r"):
    p = str(tmp_path / name)
    shutil.copytree(original, p)
    return p


def report_json(p):
    """`kvmtrace report P --json` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from kvmtrace.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["report", p, "--json", "--accept-warnings"])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_report(p, timeout=120):
    """`python -m kvmtrace report P --json` as a program: (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONFAULTHANDLER="")
    r = subprocess.run([sys.executable, "-m", "kvmtrace", "report", p, "--json", "--accept-warnings"], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def one_error(err: str) -> None:
    """One line `kvmtrace: ...` and at most its fix line: nothing else on stderr."""
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith("kvmtrace: "), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  fix: ")), err


def first_interval(p, rel):
    """The first interval the manifest says ``rel`` holds (None: not a listed data file)."""
    with open(os.path.join(p, META_FILE)) as f:
        e = json.load(f)["files"].get(rel)
    return None if e is None else e["intervals"][0]


def check_outcome(code, out, err, lo=None) -> None:
    """The promise for any damage: exit 0 with exactly the counts of the intervals read, or one
    error line with exit status 2. ``lo``: a data file that changed holds intervals lo..: then
    the recording is read up to lo - 1 with a DAMAGED warning naming the loss (the prefix before
    the first interval the file covers), or refused when lo is 0; except that bytes appended to
    a journal of an unfinished recording were never committed and are dropped as a torn interval."""
    assert code in (0, 2), f"exit status {code}: {err[-2000:]}"
    assert "Traceback" not in err and "terminate called" not in err, err
    if code == 2:
        one_error(err)
        assert out == ""
        assert lo is None or lo == 0, f"refused, but intervals 0..{lo - 1} were intact: {err}"
        return
    rep = json.loads(out)
    (src,) = rep["sources"]
    n = src["intervals"]
    assert 1 <= n <= N
    assert sum(h["count"] for h in rep["hva_ops"]) == PER * n  # never more, never less than those intervals
    assert src["hva_events"] == PER * n and src["memslot_events"] == n
    if lo is not None and n == N and "torn last interval dropped" in "; ".join(src["warnings"]):
        assert src["status"] == "recording" and "DAMAGED" not in "; ".join(src["warnings"])
    elif lo is not None or n < N:
        assert lo is None or n == lo, f"read {n} intervals, the damaged file begins at interval {lo}"
        assert "DAMAGED recording" in "; ".join(src["warnings"]), "; ".join(src["warnings"])
        assert f"reading intervals 0..{n - 1} only" in "; ".join(src["warnings"])
        assert f"lost: intervals {n}..{N - 1} of {N}, {PER * (N - n)} of {PER * N} hva ops" in "; ".join(src["warnings"])


# ------------------------------------------------------------------------------ the SIGABRT

# On the old reader (ae09f02), on this 2-core machine shared with other work, this loop saw 3 and
# 4 aborts in two series of 40 runs (18 in 260 runs of all measurements, 7 %): 40 runs miss the
# abort with a probability of about 5 % (0.93 ** 40), in about 70 s. The abort is a race at
# interpreter exit: no number of runs makes it certain. The test fails on the old reader every
# time all the same: it refused the intact prefix when a middle part had bytes appended.
RUNS = int(os.environ.get("KVMTRACE_ABORT_RUNS", "40"))


def test_appended_bytes_never_abort_the_report(original, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(20)
    parts = [f for f in files_of(original) if f.endswith(".parquet")]
    jobs = []
    for i in range(RUNS):
        p = copy(original, tmp_path, f"r{i}")
        target = parts[i % len(parts)]
        with open(os.path.join(p, target), "ab") as f:
            f.write(rng.randbytes(rng.randint(1, 64)))
        jobs.append((p, target))
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda j: run_report(j[0]), jobs))
    seen = {}
    for (p, target), (code, out, err) in zip(jobs, results):
        assert code >= 0, f"killed by signal {-code} after appending to {target}: {err[-500:]}"
        check_outcome(code, out, err, first_interval(original, target))
        seen[code] = seen.get(code, 0) + 1
    print(f"{RUNS} runs of report --json in {time.monotonic() - t0:.0f} s: exit status {seen}, no signal")
    assert seen.get(0) and seen.get(2)  # parts of interval 0 refuse; later parts keep the prefix


# ------------------------------------------------------------------------------ the prefix


def flip(path, where):
    with open(path, "rb") as f:
        b = bytearray(f.read())
    at = {"footer-magic": len(b) - 1, "footer-length": len(b) - 6, "middle": len(b) // 2, "header": 1}[where]
    b[at] ^= 0x10
    with open(path, "wb") as f:
        f.write(b)


@pytest.mark.parametrize("table", ["hva", "intervals", "vms", "hva_events", "memslot_events"])
@pytest.mark.parametrize("where", ["footer-magic", "footer-length", "middle", "header"])
def test_bit_flip_in_a_middle_part_keeps_the_prefix(original, tmp_path, table, where):
    p = copy(original, tmp_path)
    flip(os.path.join(p, table, "part-000001.parquet"), where)  # intervals 2..3
    code, out, err = report_json(p)
    assert code == 0, err
    (src,) = json.loads(out)["sources"]
    assert src["intervals"] == 2 and src["hva_events"] == 2 * PER
    assert sum(h["count"] for h in json.loads(out)["hva_ops"]) == 2 * PER
    assert "; ".join(src["warnings"]) == (
        f"{p}: DAMAGED recording, reading intervals 0..1 only ({table}/part-000001.parquet does not match its "
        f"checksum (changed after it was written)); lost: intervals 2..5 of 6, 40 of 60 hva ops, "
        f"4 of 6 memslot updates, 40 of 60 hva events, 4 of 6 memslot events")


@pytest.mark.parametrize("how", ["flip", "truncate", "append"])
def test_damaged_first_part_refuses_with_one_line(original, tmp_path, how):
    p = copy(original, tmp_path)
    part = os.path.join(p, "hva", "part-000000.parquet")
    if how == "flip":
        flip(part, "footer-magic")
    else:
        with open(part, "r+b" if how == "truncate" else "ab") as f:
            f.truncate(os.path.getsize(part) // 2) if how == "truncate" else f.write(b"\x01" * 9)
    code, out, err = report_json(p)
    assert code == 2
    one_error(err)
    assert "damaged recording: hva/part-000000.parquet" in err and "no interval before the damage" in err


def test_truncated_and_appended_middle_parts_keep_the_prefix(original, tmp_path):
    for how, why in (("truncate", "is shorter than written"), ("append", "is longer than written")):
        p = copy(original, tmp_path, how)
        part = os.path.join(p, "memslot", "part-000002.parquet")  # intervals 4..5
        with open(part, "r+b" if how == "truncate" else "ab") as f:
            f.truncate(os.path.getsize(part) - 3) if how == "truncate" else f.write(b"PAR1")
        r = read_recording(p)
        assert r["intervals"]["interval"].tolist() == [0, 1, 2, 3]
        (w,) = [w for w in r.warnings if "DAMAGED" in w]
        assert f"memslot/part-000002.parquet {why}" in w and "lost: intervals 4..5 of 6, 20 of 60 hva ops" in w


def test_a_damaged_part_is_never_opened(original, tmp_path, monkeypatch):
    """The damaged part and every part after it are left out before pyarrow or DuckDB sees them."""
    from kvmtrace.analysis import integrity

    p = copy(original, tmp_path)
    flip(os.path.join(p, "hva_events", "part-000001.parquet"), "middle")
    opened = []
    real = integrity.open_part
    monkeypatch.setattr(integrity, "open_part", lambda f: opened.append(os.path.relpath(f, p)) or real(f))
    r = read_recording(p)
    assert r.events["hva_events"].parquet == [os.path.join(p, "hva_events", "part-000000.parquet")]
    assert not [f for f in opened if not f.endswith("part-000000.parquet")], opened


# ------------------------------------------------------------------------------ byte-level fuzz

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("KVMTRACE_FUZZ_EXAMPLES", "0")) or 40
DERANDOMIZE = "KVMTRACE_FUZZ_EXAMPLES" not in os.environ
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]  # no shrinking: a failure is reported as found

byte_damage = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("zero"), st.floats(0, 1, exclude_max=True), st.integers(1, 4096)),
)


def damage_bytes(path, d) -> bool:
    """Apply one byte-level damage; True if the file's bytes changed."""
    with open(path, "rb") as f:
        b = f.read()
    at = int(len(b) * d[1]) if d[0] != "append" else len(b)
    if d[0] == "flip":
        n = bytearray(b)
        n[at] ^= 1 << d[2]
        n = bytes(n)
    elif d[0] == "truncate":
        n = b[:at]
    elif d[0] == "append":
        n = b + d[1]
    elif d[0] == "overwrite":
        n = b[:at] + d[2] + b[at + len(d[2]):]
    else:
        n = b[:at] + b"\0" * min(d[2], len(b) - at) + b[at + d[2]:]
    with open(path, "wb") as f:
        f.write(n)
    return n != b


@pytest.mark.parametrize("kind", ["flip", "truncate", "append"])
def test_every_file_damaged_gives_a_prefix_or_one_error(original, tmp_path, kind):
    """A deterministic sweep: each file of the recording, damaged once (in this process)."""
    for i, rel in enumerate(files_of(original)):
        p = copy(original, tmp_path, f"s{i}")
        d = {"flip": ("flip", 0.5, 3), "truncate": ("truncate", 0.5), "append": ("append", b"\x00garbage\n")}[kind]
        changed = damage_bytes(os.path.join(p, rel), d)
        code, out, err = report_json(p)
        check_outcome(code, out, err, first_interval(original, rel) if changed else None)
        shutil.rmtree(p)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, phases=PHASES,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rec=st.sampled_from(["complete", "unfinished"]), which=st.integers(0, 10**6),
       damage=st.lists(byte_damage, min_size=1, max_size=2))
def test_byte_damage_gives_a_prefix_or_one_error(original, unfinished, tmp_path_factory, rec, which, damage):
    src = original if rec == "complete" else unfinished
    p = copy(src, tmp_path_factory.mktemp("fz"))
    fs = files_of(p)
    rel = fs[which % len(fs)]
    with open(os.path.join(p, rel), "rb") as f:
        before = f.read()
    for d in damage:
        damage_bytes(os.path.join(p, rel), d)
    with open(os.path.join(p, rel), "rb") as f:
        changed = f.read() != before  # two flips of one bit undo each other
    code, out, err = report_json(p)
    check_outcome(code, out, err, first_interval(src, rel) if changed else None)
    shutil.rmtree(os.path.dirname(p), ignore_errors=True)


@settings(max_examples=max(6, EXAMPLES // 5), deadline=None, derandomize=DERANDOMIZE, phases=PHASES,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rec=st.sampled_from(["complete", "unfinished"]), which=st.integers(0, 10**6), damage=byte_damage)
def test_byte_damage_never_kills_the_program(original, unfinished, tmp_path_factory, rec, which, damage):
    """The same as a program: exit status 0 or 2, never a signal (an abort shows only at exit)."""
    src = original if rec == "complete" else unfinished
    p = copy(src, tmp_path_factory.mktemp("fzp"))
    fs = files_of(p)
    rel = fs[which % len(fs)]
    changed = damage_bytes(os.path.join(p, rel), damage)
    code, out, err = run_report(p)
    assert code >= 0, f"killed by signal {-code} after {damage[0]} of {rel}: {err[-500:]}"
    check_outcome(code, out, err, first_interval(src, rel) if changed else None)
    shutil.rmtree(os.path.dirname(p), ignore_errors=True)
