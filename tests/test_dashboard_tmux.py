"""The live screen driven in a real terminal (tmux): keys, resize, quit, Ctrl-C, and that the
terminal is restored (normal screen, cursor visible, canonical mode and echo back on).

- synthetic session: needs only tmux (no root)
- real tracer + the built-in workload VM: needs root, bcc, tracefs and /dev/kvm (skipped
  through the tracer's own capability check otherwise)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One detached tmux session running ``cmd``; after the command ends the pane prints
    EXITED rc=N and the terminal modes (icanon/echo), then stays open for inspection."""

    def __init__(self, cmd: str, x: int = 120, y: int = 40):
        self.name = f"kvmtrace-test-{uuid.uuid4().hex[:8]}"
        after = "echo EXITED rc=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; sleep 600"
        script = f"cd {shlex.quote(REPO)} && {cmd}; {after}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(x), "-y", str(y), "bash", "-c", script],
            check=True,
            env={**os.environ, "TERM": "xterm-256color", "LANG": os.environ.get("LANG", "C.UTF-8")},
        )

    def capture(self) -> str:
        p = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return p.stdout

    def send(self, *keys: str):
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def display(self, fmt: str) -> str:
        return subprocess.run(
            ["tmux", "display-message", "-p", "-t", self.name, fmt], capture_output=True, text=True
        ).stdout.strip()

    def resize(self, x: int, y: int):
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(x), "-y", str(y)], check=True)

    def wait_for(self, pred, timeout: float = 20.0, what: str = "") -> str:
        end = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < end:
            screen = self.capture()
            if pred(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or pred}; screen:\n{screen}")

    def kill(self):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)

    def assert_restored(self, screen: str):
        """After exit: normal screen, cursor shown, canonical mode and echo back on."""
        assert self.display("#{alternate_on}") == "0"
        assert self.display("#{cursor_flag}") == "1"
        tail = screen.split("EXITED rc=", 1)[1].split()
        assert tail[0] == "0"
        assert "icanon" in tail and "echo" in tail
        assert "-icanon" not in tail and "-echo" not in tail


@pytest.fixture
def tmux_factory():
    made = []

    def make(cmd, **kw):
        t = Tmux(cmd, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.kill()


PY = shlex.quote(sys.executable)


def test_synthetic_keys_resize_quit(tmux_factory):
    t = tmux_factory(f"{PY} -m tests.synthetic_top --interval 0.3")
    s = t.wait_for(lambda s: "4343 python3" in s, what="the second VM to appear")
    assert t.display("#{alternate_on}") == "1"  # full-screen view on the alternate screen
    assert "4242 guest-a" in s and "sort ops" in s and "keys: s sort" in s
    assert "\x1b" not in s

    t.send("s")
    t.wait_for(lambda s: "sort latency" in s, what="sort to cycle to latency")
    # latency sort: 4343 (3 µs) before guest-a (1 µs)
    s = t.wait_for(lambda s: re.search(r"4343 python3.*\n.*4242 guest-a", s), what="latency order")

    t.send("p")
    s1 = t.wait_for(lambda s: "PAUSED" in s, what="PAUSED")
    up1 = re.search(r"up (\S+)", s1).group(1)
    time.sleep(1.0)
    assert re.search(r"up (\S+)", t.capture()).group(1) == up1  # frozen while paused
    t.send("p")
    t.wait_for(lambda s: "PAUSED" not in s, what="unpause")

    t.send("v")
    t.wait_for(lambda s: "VM 4242 guest-a · since start" in s or "VM 4343" in s, what="panel VM")

    t.resize(70, 30)
    s = t.wait_for(lambda s: "4242" in s and max(len(x) for x in s.splitlines()) <= 70, what="re-layout at 70")

    # the second VM exits after the 5th interval
    t.wait_for(lambda s: "4343" not in s and "VMs 1 running" in s, what="the second VM to go away")

    t.send("q")
    s = t.wait_for(lambda s: "EXITED rc=" in s, timeout=10, what="exit after q")
    assert "kvmtrace top summary" in s
    assert re.search(r"4343 python3", s)  # the summary keeps the exited VM
    t.assert_restored(s)


def test_synthetic_ctrl_c_restores_terminal(tmux_factory):
    t = tmux_factory(f"{PY} -m tests.synthetic_top --interval 0.3")
    t.wait_for(lambda s: "4242 guest-a" in s, what="first interval")
    t.send("C-c")
    s = t.wait_for(lambda s: "EXITED rc=" in s, timeout=10, what="exit after Ctrl-C")
    assert "kvmtrace top summary" in s
    t.assert_restored(s)


def _child_pid(t) -> int:
    """The pid of the command running in the pane (the pane's shell forks it)."""
    shell = int(t.display("#{pane_pid}"))
    with open(f"/proc/{shell}/task/{shell}/children") as f:
        return int(f.read().split()[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_synthetic_sigterm_sighup_restore_terminal_and_print_summary(tmux_factory, sig):
    """issue 13 #9: SIGTERM/SIGHUP left no echo, the alternate screen and a hidden cursor, and no
    summary."""
    t = tmux_factory(f"{PY} -m tests.synthetic_top --interval 0.3")
    t.wait_for(lambda s: "4242 guest-a" in s, what="first interval")
    os.kill(_child_pid(t), sig)
    s = t.wait_for(lambda s: "EXITED rc=" in s, timeout=10, what=f"exit after {sig.name}")
    assert "kvmtrace top summary" in s
    t.assert_restored(s)


def test_background_top_stops_on_sigint_from_a_script(tmp_path):
    """issue 13 #9: a shell script starts background jobs with SIGINT ignored; `kill -INT` must
    still stop the view (with its summary)."""
    script = (f"cd {shlex.quote(REPO)} && {{ {PY} -m tests.synthetic_top --interval 0.2 --log & }}; "
              "pid=$!; sleep 1.5; kill -INT $pid; wait $pid; echo rc=$?")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    lines = p.stdout.splitlines()
    assert lines[-1] == "rc=0", p.stdout + p.stderr
    assert lines[-2].split()[0] == "total"


def test_not_a_tty_stdout_has_no_escape_codes(tmux_factory, tmp_path):
    out = tmp_path / "out.txt"
    t = tmux_factory(f"{PY} -m tests.synthetic_top --interval 0.1 --duration 0.35 > {out}")
    s = t.wait_for(lambda s: "EXITED rc=" in s, timeout=10, what="batch run to end")
    t.assert_restored(s)
    text = out.read_text()
    assert "\x1b" not in text and text.count("# kvmtrace top interval:") == 4  # 0.1 s intervals until 0.35 s: 4


# ---------------------------------------------------------------------------- the real thing


def _why_not_real() -> str:
    try:
        from kvmtrace.tracer import session as S
    except ImportError as e:
        return f"kvmtrace.tracer.session not importable: {e}"
    return S.tracing_unavailable()


def _ops_rate(screen: str, pid: int) -> float:
    """The unmap ops/s cell of ``pid``'s row, located under the 'unmap' header."""
    lines = screen.splitlines()
    head = next(x for x in lines if re.search(r"\bPID\b", x) and "unmap" in x)
    end = head.index("unmap") + len("unmap")
    row = next(x for x in lines if re.match(rf"\s*{pid}\s", x))
    cell = row[:end].split()[-1]
    m = re.fullmatch(r"([\d.]+)([kMG]?)", cell)
    assert m, f"not a rate: {cell!r} in {row!r}"
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


@pytest.mark.root
def test_real_top_shows_workload_vm(tmux_factory):
    why = _why_not_real()
    if why:
        pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {why}")
    # a tall pane: on a busy host the summary lists every VM seen (other users' short-lived VMMs
    # too), and its header must still be on screen
    t = tmux_factory(f"{PY} -m kvmtrace.cli top --interval 1", y=200)
    t.wait_for(lambda s: "kvmtrace top · host" in s, timeout=60, what="the tracer to attach")
    wl = subprocess.Popen(
        [sys.executable, "-m", "kvmtrace.workload", "--slots", "64", "--scenario", "mixed", "--duration", "20", "-q"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = wl.stdout.readline().split()
        assert ready[:1] == ["READY"], wl.stderr.read()
        pid = int(ready[1])

        def shows_activity(s):
            return re.search(rf"^\s*{pid}\s", s, re.M) is not None and _ops_rate(s, pid) > 0

        s = t.wait_for(shows_activity, timeout=20, what=f"workload VM {pid} with non-zero ops/s")
        assert "attach: " in s and "tracepoint" in s or "kprobe" in s or "fentry" in s
        t.send("s")
        t.wait_for(lambda s: "sort latency" in s, what="sort key")
        t.send("q")
        s = t.wait_for(lambda s: "EXITED rc=" in s, timeout=15, what="exit after q")
        assert "kvmtrace top summary" in s and re.search(rf"^\s*{pid}\s", s, re.M)
        t.assert_restored(s)
    finally:
        wl.terminate()
        try:
            wl.wait(timeout=20)
        except subprocess.TimeoutExpired:
            wl.kill()
