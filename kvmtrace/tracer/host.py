"""The host around the kernel: privileges, lockdown, /dev/kvm, bcc headers, and the VMs running
now (VMM processes found through their ``anon_inode:kvm-vm`` / ``anon_inode:kvm-vcpu:N`` file
descriptors). Pure /proc and /sys reading; no bcc."""

from __future__ import annotations

import os
import platform
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import kernel
from ..snapshot import VmInfo


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
        fddir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue
        n_vm = 0
        vcpus = set()
        for fd in fds:
            try:
                link = os.readlink(f"{fddir}/{fd}")
            except OSError:
                continue
            if link == "anon_inode:kvm-vm":
                n_vm += 1
            else:
                m = _VCPU.match(link)
                if m:
                    vcpus.add(int(m.group(1)))
        if n_vm == 0 and not vcpus:
            continue
        comm = (_read(f"{proc}/{pid}/comm") or "").strip()
        cmdline = [a for a in (_read(f"{proc}/{pid}/cmdline") or "").split("\0") if a]
        out.append(HostVm(pid=pid, comm=comm, name=guest_name(cmdline), vm_fds=n_vm, vcpus=len(vcpus)))
    return out, unreadable


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


@dataclass(frozen=True)
class Privileges:
    euid: int
    caps: Dict[str, bool]

    @property
    def root(self) -> bool:
        return self.euid == 0

    @property
    def enough(self) -> bool:
        return self.root or (self.caps.get("CAP_BPF") and self.caps.get("CAP_PERFMON")) or bool(
            self.caps.get("CAP_SYS_ADMIN"))


def privileges() -> Privileges:
    return Privileges(euid=os.geteuid(), caps=kernel.capabilities())
