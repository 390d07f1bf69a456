"""The host around the kernel, the one place for /proc and privilege facts: privileges (the one
check: ``privileges().enough`` / ``can_trace()``), /dev/kvm, bcc headers, and the VMs running now
(VMM processes found through their ``anon_inode:kvm-vm`` / ``anon_inode:kvm-vcpu:N`` file
descriptors, guest names from their command lines). Used by doctor, the tracer session and top.
Pure /proc and /sys reading; no bcc.

API (stable; the session and doctor use only these):
    privileges() -> Privileges      euid, capabilities, .enough, .why_not
    can_trace() -> (bool, why)      enough privilege to load tracing programs
    vms(proc) -> ([HostVm], unreadable)   every VMM process now
    vmm_pids(proc) -> {pid: n VMs}  the same, as a mapping
    owns_vm(pid) -> bool            the process holds a KVM VM descriptor
    proc_info(pid) -> ProcInfo      comm, guest name, vCPU count, alive
    guest_name(argv) -> str         QEMU -name / --name / --id parsing
"""

from __future__ import annotations

import os
import platform
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..snapshot import VmInfo

# Linux capability numbers (include/uapi/linux/capability.h)
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass(frozen=True)
class HostVm:
    """One VMM process holding KVM VM file descriptors."""

    pid: int
    comm: str
    name: str  # guest name from the command line (QEMU -name), else ""
    vm_fds: int  # anon_inode:kvm-vm descriptors (VMs this process holds)
    vcpus: int  # anon_inode:kvm-vcpu:N descriptors

    def to_vminfo(self) -> VmInfo:
        return VmInfo(vm_id=f"pid:{self.pid}", pid=self.pid, comm=self.comm, name=self.name, vcpus=self.vcpus)


_VCPU = re.compile(r"anon_inode:kvm-vcpu:(\d+)$")


def guest_name(cmdline: List[str]) -> str:
    """QEMU ``-name NAME`` / ``-name guest=NAME,debug-threads=on`` (also ``--name``), and
    cloud-hypervisor/firecracker style ``--id NAME``; "" when absent."""
    for i, a in enumerate(cmdline):
        val = None
        if a in ("-name", "--name", "--id") and i + 1 < len(cmdline):
            val = cmdline[i + 1]
        elif a.startswith("-name=") or a.startswith("--name="):
            val = a.split("=", 1)[1]
        if val is None:
            continue
        if val.startswith("guest="):
            val = val[len("guest="):]
        # QEMU option syntax: commas separate properties, ",," escapes a comma
        parts = re.split(r"(?<!,),(?!,)", val)
        return parts[0].replace(",,", ",")
    return ""


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _fd_links(fddir: str) -> List[str]:
    """Targets of the descriptors in ``fddir`` (PermissionError and vanished processes raise
    OSError to the caller; single descriptors that vanish are skipped)."""
    out = []
    for fd in os.listdir(fddir):
        try:
            out.append(os.readlink(f"{fddir}/{fd}"))
        except OSError:
            continue
    return out


def _count_kvm_fds(links: List[str]) -> Tuple[int, int]:
    """(VM descriptors, distinct vCPU descriptors) among descriptor targets."""
    n_vm = 0
    vcpus = set()
    for link in links:
        if link == "anon_inode:kvm-vm":
            n_vm += 1
        else:
            m = _VCPU.match(link)
            if m:
                vcpus.add(int(m.group(1)))
    return n_vm, len(vcpus)


def vms(proc: str = "/proc") -> Tuple[List[HostVm], int]:
    """VMM processes with KVM VM descriptors, and the number of processes whose descriptors
    could not be read (needs root to see other users' processes)."""
    out: List[HostVm] = []
    unreadable = 0
    try:
        pids = [int(d) for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return out, 0
    for pid in sorted(pids):
        try:
            links = _fd_links(f"{proc}/{pid}/fd")
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue
        n_vm, n_vcpu = _count_kvm_fds(links)
        if n_vm == 0 and not n_vcpu:
            continue
        info = proc_info(pid, proc, links)
        out.append(HostVm(pid=pid, comm=info.comm, name=info.name, vm_fds=n_vm, vcpus=n_vcpu))
    return out, unreadable


def vmm_pids(proc: str = "/proc") -> Dict[int, int]:
    """VMM processes running now: pid -> number of VMs (anon_inode:kvm-vm descriptors)."""
    return {v.pid: v.vm_fds for v in vms(proc)[0] if v.vm_fds}


def vm_fds(proc: str = "/proc") -> Dict[int, List[int]]:
    """KVM VM descriptors (anon_inode:kvm-vm) of every readable process now: pid -> fd numbers
    (the tracer seeds the VMs that predate a trace from them)."""
    out: Dict[int, List[int]] = {}
    try:
        pids = [d for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return out
    for d in pids:
        fddir = f"{proc}/{d}/fd"
        try:
            names = os.listdir(fddir)
        except OSError:
            continue
        for fd in names:
            try:
                if os.readlink(f"{fddir}/{fd}") == "anon_inode:kvm-vm":
                    out.setdefault(int(d), []).append(int(fd))
            except (OSError, ValueError):
                continue
    return out


def owns_vm(pid: int, proc: str = "/proc") -> bool:
    """Whether process ``pid`` holds a KVM VM descriptor now."""
    try:
        return "anon_inode:kvm-vm" in _fd_links(f"{proc}/{pid}/fd")
    except OSError:
        return False


class ProcInfo(NamedTuple):  # a tuple too: ``comm, name, vcpus, alive = proc_info(pid)``
    comm: str
    name: str  # guest name (guest_name), "" when the command line has none
    vcpus: Optional[int]  # vCPU descriptors; None when the descriptors are not readable
    alive: bool


def proc_info(pid: int, proc: str = "/proc", links: Optional[List[str]] = None) -> ProcInfo:
    """What /proc says about process ``pid`` now (alive False when it is gone)."""
    comm = _read(f"{proc}/{pid}/comm")
    if comm is None:
        return ProcInfo("", "", None, False)
    cmdline = [a for a in (_read(f"{proc}/{pid}/cmdline") or "").split("\0") if a]
    if links is None:
        try:
            links = _fd_links(f"{proc}/{pid}/fd")
        except OSError:
            links = None
    vcpus = None if links is None else _count_kvm_fds(links)[1]
    return ProcInfo(comm.strip(), guest_name(cmdline), vcpus, True)


@dataclass(frozen=True)
class DevKvm:
    present: bool
    accessible: bool  # open for read/write by this process
    detail: str


def dev_kvm(path: str = "/dev/kvm") -> DevKvm:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return DevKvm(False, False, f"{path} missing")
    except OSError as e:
        return DevKvm(False, False, f"{path}: {e.strerror}")
    if not stat.S_ISCHR(st.st_mode):
        return DevKvm(False, False, f"{path} is not a character device")
    ok = os.access(path, os.R_OK | os.W_OK)
    return DevKvm(True, ok, "read/write" if ok else "present but not accessible to this user")


@dataclass(frozen=True)
class Headers:
    kind: str  # "exact" | "kheaders" | "compat" | "none"
    path: str
    detail: str


def headers(release: Optional[str] = None) -> Headers:
    """Where bcc gets kernel headers from: /lib/modules/$(uname -r)/build from the exact
    linux-headers package, /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS), a link to another
    version's headers (the set-up's "compat" headers), or none."""
    release = release or platform.release()
    build = f"/lib/modules/{release}/build"
    if os.path.exists(build):
        real = os.path.realpath(build)
        rel_file = (_read(os.path.join(real, "include/config/kernel.release")) or "").strip()
        if release in real or rel_file == release:
            return Headers("exact", real, f"{build} -> {real}")
        return Headers("compat", real, f"{build} -> {real} (headers of another kernel version; "
                                       "kvmtrace takes every struct offset from BTF)")
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return Headers("kheaders", "/sys/kernel/kheaders.tar.xz", "in-kernel headers (CONFIG_IKHEADERS)")
    return Headers("none", "", f"{build} missing and no /sys/kernel/kheaders.tar.xz")


def capabilities(status_path: str = "/proc/self/status") -> Dict[str, bool]:
    """The effective capabilities kvmtrace cares about, from /proc/self/status."""
    text = _read(status_path) or ""
    eff = 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            try:
                eff = int(line.split()[1], 16)
            except (IndexError, ValueError):
                eff = 0
    return {
        "CAP_SYS_ADMIN": bool(eff >> CAP_SYS_ADMIN & 1),
        "CAP_PERFMON": bool(eff >> CAP_PERFMON & 1),
        "CAP_BPF": bool(eff >> CAP_BPF & 1),
    }


@dataclass(frozen=True)
class Privileges:
    euid: int
    caps: Dict[str, bool]

    @property
    def root(self) -> bool:
        return self.euid == 0

    @property
    def enough(self) -> bool:
        """Root, or CAP_BPF + CAP_PERFMON (tracing programs), or CAP_SYS_ADMIN."""
        return bool(self.root or (self.caps.get("CAP_BPF") and self.caps.get("CAP_PERFMON"))
                    or self.caps.get("CAP_SYS_ADMIN"))

    @property
    def why_not(self) -> str:
        return "" if self.enough else "tracing needs root, or CAP_BPF and CAP_PERFMON"


def privileges() -> Privileges:
    return Privileges(euid=os.geteuid(), caps=capabilities())


def can_trace() -> Tuple[bool, str]:
    """(ok, why not): the one privilege check of kvmtrace (doctor, the tracer, the tests)."""
    p = privileges()
    return p.enough, p.why_not
