"""CLI fuzz: hypothesis-generated options for every command. Whatever the input, the answer is
an exit status with one error line (``kvmtrace: ...`` or click's ``Error: ...``), never a
traceback, and nothing is traced, created or run: the first step that would act (start the
tracer, create a VM, gather kernel facts, run a bench) is replaced by a sentinel that ends the
example as "input accepted". Bounded: a fixed number of examples per command, no deadline."""

from __future__ import annotations

import io
import os
import sys

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmtrace.cli import COMMANDS, cli, main

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "recordings")


class Accepted(BaseException):
    """The command got past every check and was about to act."""


def _accept(*a, **kw):
    raise Accepted()


@pytest.fixture
def no_action(monkeypatch, tmp_path):
    import kvmtrace.commands.bench as bench_mod
    import kvmtrace.commands.doctor as doctor_mod
    import kvmtrace.tracer.session as session_mod
    import kvmtrace.workload.core as core_mod

    monkeypatch.setattr(session_mod, "TraceSession", _accept, raising=False)
    monkeypatch.setattr(core_mod.Workload, "setup", _accept)
    monkeypatch.setattr(doctor_mod, "collect", _accept)
    monkeypatch.setattr(bench_mod, "run_one", _accept)
    monkeypatch.setattr(bench_mod, "kernel_max_memslots", lambda: 509)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fresh_cwd():
    """Every example runs in a directory of its own holding exists.csv and dir/, so what one
    example wrote never changes the next (and hypothesis can replay a failure)."""
    import tempfile

    d = tempfile.mkdtemp(dir=os.getcwd())
    os.chdir(d)
    with open("exists.csv", "w") as f:
        f.write("a,b\n1,2\n")
    os.mkdir("dir")


VALUES = [
    "nan", "inf", "-inf", "-1", "0", "0.0", "1e-9", "1e300", "1", "2", "0.5", "3600", "99999999999999999999",
    "-0", "abc", "", " ", "1,2", "10,30,509", "unmap", "mixed", "bogus", "fentry,kprobe", "tracepoint", "x,",
    "ops", "latency", "4k", "3k", "2M", "1T", "lots", "=HYPERLINK(1)", "\udcff\udcfe", "caf\u00e9",
    "/nonexistent-kvmtrace/x", "exists.csv", "dir", "dir/new.csv", "new.csv", "no/such/dir/x.csv", "/proc/x",
    "/dev/null", "--", "-h",
]


def _params(name):
    cmd = cli.get_command(click.Context(cli), name)
    return [p for p in cmd.params if isinstance(p, click.Option) and "--help" not in p.opts and "-h" not in p.opts]


# values: the fixed pool above, any float or integer as text, and short arbitrary text (no NUL:
# a real argv cannot hold one)
ANY_VALUE = st.one_of(
    st.sampled_from(VALUES),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
)


def argv_for(name):
    opts = _params(name)
    one = st.tuples(st.sampled_from(opts), ANY_VALUE).map(
        lambda pv: [pv[0].opts[-1]] if pv[0].is_flag else [pv[0].opts[-1], pv[1]])
    args = st.lists(one, max_size=4).map(lambda xs: [a for x in xs for a in x])
    positional = st.lists(st.sampled_from([os.path.join(FIX, "basic"), os.path.join(FIX, "bench-before"),
                                           "/nonexistent-kvmtrace", "exists.csv", "dir", "\udcff"]), max_size=2)
    return st.tuples(args, positional).map(lambda ap: [name, *ap[0], *ap[1]])


class Streams:
    """stdout/stderr as a UTF-8 terminal has them (strict errors, like LANG=en_US.UTF-8)."""

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        self.out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
        self.err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
        sys.stdout, sys.stderr = self.out, self.err
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved
        return False

    @staticmethod
    def text(stream) -> str:
        stream.flush()
        return stream.buffer.getvalue().decode("utf-8", "replace")


def check(argv):
    home = os.getcwd()
    try:
        fresh_cwd()
        _check(argv)
    finally:
        os.chdir(home)


def _check(argv):
    code = 0
    with Streams() as s:
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
        except Accepted:
            return
    out, err = Streams.text(s.out), Streams.text(s.err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if code not in (0, None):
        assert code in (1, 2, 3, 4, 130), (argv, code, err)  # compare: 1, 3, 4 are verdicts (one line too)
        errors = [line for line in err.splitlines() if line.startswith(("kvmtrace: ", "Error: "))]
        assert len(errors) == 1, (argv, err)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_fuzz_one_line_no_traceback(name, no_action):
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv_for(name))
    def run(argv):
        check(argv)

    run()
