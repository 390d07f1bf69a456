"""What kvmtrace itself costs, measured while it traces.

In the kernel: BPF run-time statistics, switched on for the life of the session with the
``BPF_ENABLE_STATS`` bpf() command (Linux 5.8+; the kernel keeps them on while the returned fd
is open and switches them off when it closes, also on kill), then each of kvmtrace's own
programs' ``run_time_ns`` / ``run_cnt`` read with ``BPF_OBJ_GET_INFO_BY_FD``. When the command
is refused, statistics already switched on by ``kernel.bpf_stats_enabled`` are used; otherwise
the cost says "unavailable: <why>" and its run figures stay 0.

In user space: kvmtrace's process CPU time (user + system, every thread).

The bpf() layer is a small class (``BpfSys``) so tests replace it with a fake (no root).
"""

from __future__ import annotations

import ctypes as ct
import errno as errno_mod
import os
import resource
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


class CostMeter:
    """Measures kvmtrace's cost from ``start()`` to ``close()``; ``read()`` gives the
    cumulative SelfCost of the programs given to ``watch`` (name -> fd, bcc's ``BPF.funcs``).
    Start it before the programs are loaded: a program's run figures then count every run
    since it was attached."""

    def __init__(self, sys: Optional[BpfSys] = None, sysctl: str = SYSCTL, cpu=process_cpu_s) -> None:
        self.progs: Dict[str, int] = {}
        self.sys = sys
        self.sysctl = sysctl
        self.cpu = cpu
        self.fd: Optional[int] = None
        self.state = "unavailable: not started"
        self.cpu0 = 0.0

    def watch(self, progs: Dict[str, int]) -> None:
        """Measure these programs from now on; user CPU time counts from now too."""
        self.progs = dict(progs)
        self.cpu0 = self.cpu()

    def start(self) -> "CostMeter":
        self.cpu0 = self.cpu()
        try:
            if self.sys is None:
                self.sys = BpfSys()
            self.fd = enable_stats(self.sys)
            self.state = "enabled"
        except OSError as e:
            if self._sysctl_on():
                self.state = "enabled (kernel.bpf_stats_enabled)"
            else:
                self.state = "unavailable: " + _why(e)
        return self

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
        if not self.state.startswith("enabled"):
            return SelfCost(bpf_stats=self.state, user_cpu_s=cpu)
        per = []
        for name, fd in sorted(self.progs.items()):
            ns, cnt = self._stats(fd)
            per.append((name, ns, cnt))
        return SelfCost(bpf_stats=self.state, bpf_run_ns=sum(p[1] for p in per),
                        bpf_run_cnt=sum(p[2] for p in per), user_cpu_s=cpu, per_prog=tuple(per))

    def close(self) -> None:
        if self.fd is not None:
            try:
                self.sys.close(self.fd)
            except OSError:
                pass
            self.fd = None
