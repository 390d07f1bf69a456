"""What kvmtrace itself costs, measured while it traces.

In the kernel: BPF run-time statistics, switched on with the ``BPF_ENABLE_STATS`` bpf()
command (Linux 5.8+; the kernel keeps them on while the returned fd is open and switches them
off when it closes, also on kill), then each of kvmtrace's own programs' ``run_time_ns`` /
``run_cnt`` read with ``BPF_OBJ_GET_INFO_BY_FD``. When the command is refused, statistics
already switched on by ``kernel.bpf_stats_enabled`` are used; otherwise the cost says
"unavailable: <why>" and its run figures stay 0.

The statistics are not free: the kernel reads a clock twice around every run of every BPF
program on the host while they are on (~80 ns per run measured on the CI host kind, more under
emulation). So by default (``mode="sampled"``) they are on for ``duty`` of every ``period``
(100 ms of every second): ns per run is measured over the runs inside those windows, and the
share of a CPU is run time over the time the statistics were on (``SelfCost.stats_s``), both
labelled sampled. ``mode="full"`` keeps them on the whole time (every run counted), ``"off"``
never switches them on. Another process may hold them on meanwhile (its own
BPF_ENABLE_STATS fd, which the sysctl does not show, or the sysctl): then kvmtrace's programs'
run counts move while its fd is closed. That is checked before each window opens; when they
moved, the whole gap counts as on (a bound: the share of a CPU of that one gap may be low), and
the meter keeps them on from then (full), saying so.

In user space: kvmtrace's process CPU time (user + system, every thread).

The bpf() layer is a small class (``BpfSys``) so tests replace it with a fake (no root).
"""

from __future__ import annotations

import ctypes as ct
import errno as errno_mod
import os
import resource
import threading
import time
from typing import Dict, Optional, Tuple

from ..snapshot import SelfCost

BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
# struct bpf_prog_info (uapi/linux/bpf.h): offsets stable since the fields were added (5.1)
PROG_INFO_SIZE = 232
OFF_NAME, OFF_RUN_TIME_NS, OFF_RUN_CNT = 64, 192, 200
SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351, "i686": 357}


class BpfSys:
    """The bpf(2) system call through libc's syscall(). ``call`` returns the result or raises
    OSError with the errno."""

    def __init__(self) -> None:
        self.nr = NR_BPF.get(os.uname().machine)
        self._libc = ct.CDLL(None, use_errno=True)

    def call(self, cmd: int, attr: ct.Array) -> int:
        if self.nr is None:
            raise OSError(errno_mod.ENOSYS, f"bpf() number unknown on {os.uname().machine}")
        r = self._libc.syscall(ct.c_long(self.nr), ct.c_int(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr)))
        if r < 0:
            e = ct.get_errno()
            raise OSError(e, os.strerror(e))
        return r

    def close(self, fd: int) -> None:
        os.close(fd)


def enable_stats(sys: BpfSys) -> int:
    """fd that keeps BPF run-time statistics on while open (raises OSError)."""
    attr = (ct.c_uint8 * 8)()
    ct.memmove(attr, (ct.c_uint32 * 1)(BPF_STATS_RUN_TIME), 4)  # attr.enable_stats.type
    return sys.call(BPF_ENABLE_STATS, attr)


def prog_run_stats(sys: BpfSys, prog_fd: int) -> Tuple[int, int]:
    """(run_time_ns, run_cnt) of one loaded program (raises OSError)."""
    info = (ct.c_uint8 * PROG_INFO_SIZE)()
    attr = (ct.c_uint8 * 16)()
    ct.memmove(attr, (ct.c_uint32 * 2)(prog_fd, PROG_INFO_SIZE), 8)  # info.bpf_fd, info.info_len
    ct.memmove(ct.addressof(attr) + 8, (ct.c_uint64 * 1)(ct.addressof(info)), 8)  # info.info
    sys.call(BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = bytes(info)
    return (int.from_bytes(raw[OFF_RUN_TIME_NS:OFF_RUN_TIME_NS + 8], "little"),
            int.from_bytes(raw[OFF_RUN_CNT:OFF_RUN_CNT + 8], "little"))


def _why(e: OSError) -> str:
    if e.errno == errno_mod.EINVAL:
        return "the kernel has no BPF_ENABLE_STATS (Linux 5.8+)"
    if e.errno in (errno_mod.EPERM, errno_mod.EACCES):
        return "BPF_ENABLE_STATS needs CAP_SYS_ADMIN"
    if e.errno == errno_mod.ENOSYS:
        return str(e.strerror or "no bpf() system call")
    return f"BPF_ENABLE_STATS failed: {e.strerror or e}"


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


MODES = ("sampled", "full", "off")


class CostMeter:
    """Measures kvmtrace's cost from ``start()`` to ``close()``; ``read()`` gives the
    cumulative SelfCost of the programs given to ``watch`` (name -> fd, bcc's ``BPF.funcs``).
    Start it before the programs are loaded: a program's run figures then count every run
    since it was attached (in sampled mode: every run inside the sampling windows).

    Sampled mode toggles the statistics from a daemon thread (``toggle`` is the step it runs,
    callable directly by tests with a fake clock)."""

    def __init__(self, sys: Optional[BpfSys] = None, sysctl: str = SYSCTL, cpu=process_cpu_s,
                 mode: str = "sampled", period: float = 1.0, duty: float = 0.1,
                 clock=time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"self-cost mode {mode!r}: one of {', '.join(MODES)}")
        self.progs: Dict[str, int] = {}
        self.sys = sys
        self.sysctl = sysctl
        self.cpu = cpu
        self.mode = mode
        self.period = float(period)
        self.duty = float(duty)
        self.clock = clock
        self.fd: Optional[int] = None
        self.state = "unavailable: not started"
        self.cpu0 = 0.0
        self.on_s = 0.0  # seconds the statistics were on, closed windows
        self.on_since: Optional[float] = None  # start of the open window
        self.off_since: Optional[float] = None  # kvmtrace's fd closed at (sampled mode)
        self.off_runs = 0  # the programs' run count then
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, progs: Dict[str, int]) -> None:
        """Measure these programs from now on; user CPU time counts from now too."""
        with self._lock:
            self.progs = dict(progs)
            self.cpu0 = self.cpu()
            if self.fd is None and self.off_since is not None:
                self.off_runs = self._runs()  # the baseline of the gap under way

    def start(self) -> "CostMeter":
        self.cpu0 = self.cpu()
        if self.mode == "off":
            self.state = "off (--self-cost off)"
            return self
        try:
            if self.sys is None:
                self.sys = BpfSys()
            self.fd = enable_stats(self.sys)
            self.on_since = self.clock()
            if self.mode == "sampled":
                self.state = self._sampled_state()
                self._thread = threading.Thread(target=self._run, name="kvmtrace-selfcost", daemon=True)
                self._thread.start()
            else:
                self.state = "enabled"
        except OSError as e:
            if self._sysctl_on():
                self.state = "enabled (kernel.bpf_stats_enabled)"
                self.on_since = self.clock()
            else:
                self.state = "unavailable: " + _why(e)
        return self

    def _sampled_state(self) -> str:
        return (f"sampled: on {self.duty * self.period * 1000:.0f} ms of every "
                f"{self.period:g} s ({self.duty:.0%} of the time)")

    def _run(self) -> None:
        while True:
            on = self.fd is not None
            if self._stop.wait(self.period * (self.duty if on else 1 - self.duty)) or not self.toggle():
                return

    def _runs(self) -> int:
        return sum(self._stats(fd)[1] for fd in self.progs.values())

    def toggle(self) -> bool:
        """Close the open window or open the next one; False when sampling stopped (closed,
        or the statistics turned out to be held on by another process: full from then)."""
        with self._lock:
            if self._stop.is_set() or self.sys is None:
                return False
            now = self.clock()
            if self.fd is not None:
                self._switch_off(now)
                self.off_since, self.off_runs = now, self._runs()
                return True
            # Were they off? kvmtrace's programs' run counts must not have moved (but for runs
            # in flight at the close, one per CPU), and the sysctl must read 0.
            moved = self._runs() - self.off_runs > (os.cpu_count() or 1)
            if moved or self._sysctl_on():
                # another process held them on: its time counts as on (from the close: a bound)
                self.on_since = self.off_since if self.off_since is not None else now
                self.state = "enabled (held on by another process too; sampling stopped)"
                try:
                    self.fd = enable_stats(self.sys)  # hold them on: it may let go at any time
                except OSError:
                    pass
                return False
            try:
                self.fd = enable_stats(self.sys)
                self.on_since = now
            except OSError as e:
                self.state = "unavailable: " + _why(e)
                return False
            return True

    def _switch_off(self, now: float) -> None:
        """Close kvmtrace's statistics fd (if open) and close the open window at ``now``."""
        if self.fd is not None:
            try:
                self.sys.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.on_since is not None:
            self.on_s += now - self.on_since
            self.on_since = None

    def _sysctl_on(self) -> bool:
        try:
            with open(self.sysctl) as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    def _stats(self, fd: int) -> Tuple[int, int]:
        try:
            return prog_run_stats(self.sys, fd)
        except OSError:
            return (0, 0)

    def read(self) -> SelfCost:
        cpu = self.cpu() - self.cpu0
        with self._lock:
            state = self.state
            stats_s = self.on_s + (self.clock() - self.on_since if self.on_since is not None else 0.0)
            if not (state.startswith("enabled") or state.startswith("sampled")):
                return SelfCost(bpf_stats=state, user_cpu_s=cpu)
            per = []
            for name, fd in sorted(self.progs.items()):
                ns, cnt = self._stats(fd)
                per.append((name, ns, cnt))
        return SelfCost(bpf_stats=state, bpf_run_ns=sum(p[1] for p in per),
                        bpf_run_cnt=sum(p[2] for p in per), user_cpu_s=cpu, per_prog=tuple(per),
                        stats_s=stats_s)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._switch_off(self.clock())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
            self._thread = None
