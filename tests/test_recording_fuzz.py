"""Fuzz suite: hypothesis-generated damage to real recordings (truncated, corrupted, reordered,
duplicated files and rows, deleted files, wrong types in the metadata). Whatever the damage,
reading gives one DataFileError or a consistent prefix of the intervals with exactly the counts
those intervals held, and `report` never shows a traceback. Bounded: a fixed number of examples,
no deadline per example (the machine is shared)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvmtrace.analysis.recording import META_FILE, read_recording  # noqa: E402
from kvmtrace.analysis.synth import record_synthetic  # noqa: E402
from kvmtrace.errors import KvmtraceError  # noqa: E402
from tests.recfakes import synth  # noqa: E402

N, PER = 5, 10
# CI: a fixed, derandomized set (bounded time); KVMTRACE_FUZZ_EXAMPLES=N explores N random ones
EXAMPLES = int(os.environ.get("KVMTRACE_FUZZ_EXAMPLES", "0")) or 60
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="KVMTRACE_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    base = tmp_path_factory.mktemp("orig")
    snaps, evs = synth(N, PER, True)
    out = {}
    for fmt in ("parquet", "csv"):
        out[fmt] = record_synthetic(str(base / fmt), snaps, evs, fmt=fmt, compact_every=2)
    # an unfinished recording: journals still open
    from kvmtrace.analysis.recorder import Recorder

    p = str(base / "open")
    rec = Recorder(p, events=True, fsync=False, compact_every=3)
    prev = None
    for i, s in enumerate(snaps):
        rec.write(s.delta(prev), evs[i])
        prev = s
    out["open"] = p
    return out


def files_of(p):
    return sorted(os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs)


def consistent(p):
    try:
        r = read_recording(p)
    except KvmtraceError as e:
        assert str(e)
        return None
    iv = r["intervals"]["interval"].tolist()
    n = len(iv)
    assert n >= 1 and iv == list(range(n))
    assert int(r["hva"]["count"].sum()) == PER * n  # never more than the truth of those intervals
    assert int(r["memslot"]["count"].sum()) == n
    assert len(r["hva_events"]) == PER * n and len(r["memslot_events"]) == n
    assert r["hva"]["interval"].max() < n
    return n


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.floats(0, 1)),
    st.tuples(st.just("corrupt"), st.integers(0, 10**6), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero-tail"), st.integers(0, 10**6), st.floats(0, 1)),
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("duplicate-file"), st.integers(0, 10**6)),
    st.tuples(st.just("swap-files"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.integers(0, 10**6), st.binary(max_size=64)),
    st.tuples(st.just("lines"), st.integers(0, 10**6), st.lists(st.integers(0, 40), max_size=12)),
    st.tuples(st.just("meta"), st.sampled_from(["intervals", "totals", "status", "files", "tables", "storage", "label",
                                                "start", "lost_events", "format_version", "events"]),
              st.recursive(st.none() | st.booleans() | st.integers(-5, 10**7) | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)),
)


def apply(p, m):
    fs = [f for f in files_of(p)]
    data_fs = [f for f in fs if f != META_FILE] or fs
    kind = m[0]
    if kind in ("truncate", "corrupt", "zero-tail", "append", "lines"):
        f = os.path.join(p, fs[m[1] % len(fs)])
        with open(f, "rb") as fh:
            b = fh.read()
        if kind == "truncate":
            b = b[: int(len(b) * m[2])]
        elif kind == "corrupt":
            at = int(len(b) * m[2])
            b = b[:at] + m[3] + b[at + len(m[3]):]
        elif kind == "zero-tail":
            at = int(len(b) * m[2])
            b = b[:at] + b"\0" * (len(b) - at)
        elif kind == "append":
            b = b + m[2]
        else:  # reorder / duplicate / drop lines (CSV rows, JSON lines)
            lines = b.splitlines(True)
            if lines:
                b = b"".join(lines[i % len(lines)] for i in (m[2] or range(len(lines))))
        with open(f, "wb") as fh:
            fh.write(b)
    elif kind == "delete":
        os.unlink(os.path.join(p, data_fs[m[1] % len(data_fs)]))
    elif kind == "duplicate-file":
        src = data_fs[m[1] % len(data_fs)]
        d, base = os.path.split(src)
        if base.startswith(("part-", "journal-")):
            stem, ext = base.split(".", 1)
            dst = os.path.join(d, f"{stem.split('-')[0]}-{999:06d}.{ext}")
            if dst != src:
                shutil.copy(os.path.join(p, src), os.path.join(p, dst))
    elif kind == "swap-files":
        a, b = data_fs[m[1] % len(data_fs)], data_fs[m[2] % len(data_fs)]
        if a != b:
            pa_, pb_ = os.path.join(p, a), os.path.join(p, b)
            os.rename(pa_, pa_ + ".x")
            os.rename(pb_, pa_)
            os.rename(pa_ + ".x", pb_)
    elif kind == "meta":
        mp = os.path.join(p, META_FILE)
        try:
            with open(mp) as fh:
                meta = json.load(fh)
            meta[m[1]] = m[2]
        except (OSError, ValueError, TypeError):
            return  # an earlier mutation already damaged or removed the metadata
        with open(mp, "w") as fh:
            json.dump(meta, fh)


def damage(tmp_path_factory, originals, which, muts):
    p = str(tmp_path_factory.mktemp("fz") / "r")
    shutil.copytree(originals[which], p)
    for m in muts:
        apply(p, m)
    return p


@pytest.mark.parametrize("which", ["parquet", "csv", "open"])
@SETTINGS
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_recording_reads_a_consistent_prefix_or_refuses(tmp_path_factory, originals, which, muts):
    p = damage(tmp_path_factory, originals, which, muts)
    consistent(p)
    shutil.rmtree(os.path.dirname(p), ignore_errors=True)


@settings(max_examples=max(25, EXAMPLES // 3), deadline=None, derandomize="KVMTRACE_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.sampled_from(["parquet", "csv", "open"]), muts=st.lists(mutation, min_size=1, max_size=2))
def test_report_never_shows_a_traceback(tmp_path_factory, originals, capsys, which, muts):
    from kvmtrace.cli import main

    p = damage(tmp_path_factory, originals, which, muts)
    with pytest.raises(SystemExit) as e:
        main(["report", p, "--json"])
    out = capsys.readouterr()
    assert e.value.code in (0, 1, 2, 4), out.err  # 4: the report is printed, the input carries warnings
    assert "Traceback" not in out.err
    if e.value.code in (0, 4):
        rep = json.loads(out.out)
        assert sum(h["count"] for h in rep["hva_ops"]) <= N * PER
    else:
        assert out.err.startswith("kvmtrace: ")
    shutil.rmtree(os.path.dirname(p), ignore_errors=True)


def test_the_undamaged_originals_read_completely(originals):
    assert consistent(originals["parquet"]) == N and consistent(originals["csv"]) == N
    assert consistent(originals["open"]) == N


# ------------------------------------------------------------------------- CLI inputs of record

number_text = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "0", "-0", "1e-9", "1e308", "1e999", "-1", "", " ", "0x10",
                     "1_000", "\u0661", "5m", "1h", "2d", "-3s", "nanm", "infh"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**12, 10**12).map(str),
    st.text(max_size=6),
)


@settings(max_examples=max(40, EXAMPLES // 2), deadline=None, derandomize="KVMTRACE_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(opts=st.dictionaries(st.sampled_from(["--interval", "--duration", "--rotate", "--keep", "--pid"]), number_text,
                            max_size=4))
def test_record_options_never_traceback(tmp_path_factory, monkeypatch, capsys, opts):
    import kvmtrace.tracer.session as session_mod
    from kvmtrace.cli import main
    from tests.recfakes import CountingSession

    class Fast(CountingSession):
        max_snaps = 3

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.interval = 0.001  # bounded whatever --interval says

    Fast.instances = []
    monkeypatch.setattr(session_mod, "TraceSession", Fast, raising=False)
    p = tmp_path_factory.mktemp("cli") / "rec"
    args = ["record", "-o", str(p)]
    for k, v in opts.items():
        args += [k, v]
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    assert e.value.code in (0, 2), out.err
    assert "Traceback" not in out.err
    if e.value.code == 2:
        assert out.err.startswith("kvmtrace: ") or out.err.startswith("Usage:"), out.err
        assert not p.exists() and Fast.instances == []
