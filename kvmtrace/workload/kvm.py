"""Thin ctypes layer over /dev/kvm, mmap and madvise. No C compiler, no kernel headers.

Only uapi structures are declared here (stable ABI). ioctl numbers are derived with the
kernel's _IO/_IOR/_IOW rule from the struct sizes below; the two that the tracer also needs
come from ``kvmtrace.consts`` and are cross-checked at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap as _mmap
import os

from .. import consts

# --- libc ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memset.restype = ctypes.c_void_p

try:  # glibc only; used to keep malloc from returning memory (munmap/trim fire notifier events)
    _mallopt = _libc.mallopt
    _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _mallopt.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - non-glibc
    _mallopt = None

PAGE_SIZE = _mmap.PAGESIZE

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

MADV_DONTNEED = 4
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_NOHUGEPAGE = 15

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (include/uapi/linux/kvm.h)."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (x86)."""

    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (x86)."""

    _fields_ = [(n, KvmSegment) for n in "cs ds es fs gs ss tr ldt".split()] + [
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
    ] + [(n, ctypes.c_uint64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()] + [
        ("interrupt_bitmap", ctypes.c_uint64 * 4)
    ]


class KvmRunHead(ctypes.Structure):
    """The first fields of struct kvm_run and its io exit member."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        # union at offset 32; io: direction, size, port, count, data_offset
        ("io_direction", ctypes.c_uint8),
        ("io_size", ctypes.c_uint8),
        ("io_port", ctypes.c_uint16),
        ("io_count", ctypes.c_uint32),
        ("io_data_offset", ctypes.c_uint64),
    ]


assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSregs) == 312

KVM_GET_API_VERSION = consts.KVM_GET_API_VERSION
KVM_CREATE_VM = consts.KVM_CREATE_VM
KVM_CHECK_EXTENSION = consts.KVM_CHECK_EXTENSION
KVM_GET_VCPU_MMAP_SIZE = consts.KVM_GET_VCPU_MMAP_SIZE
KVM_CREATE_VCPU = consts.KVM_CREATE_VCPU
KVM_SET_USER_MEMORY_REGION = consts.KVM_SET_USER_MEMORY_REGION
KVM_RUN = consts.KVM_RUN
KVM_GET_REGS = consts.KVM_GET_REGS
KVM_SET_REGS = consts.KVM_SET_REGS
KVM_GET_SREGS = consts.KVM_GET_SREGS
KVM_SET_SREGS = consts.KVM_SET_SREGS
KVM_API_VERSION = consts.KVM_API_VERSION
KVM_CAP_NR_MEMSLOTS = consts.KVM_CAP_NR_MEMSLOTS
KVM_CAP_USER_MEMORY = consts.KVM_CAP_USER_MEMORY

for _req, _struct in ((KVM_SET_USER_MEMORY_REGION, KvmUserspaceMemoryRegion), (KVM_GET_REGS, KvmRegs),
                      (KVM_SET_REGS, KvmRegs), (KVM_GET_SREGS, KvmSregs), (KVM_SET_SREGS, KvmSregs)):
    assert consts.ioc_size(_req) == ctypes.sizeof(_struct), (hex(_req), _struct.__name__)

KVM_EXIT_NAMES = {
    0: "unknown",
    2: "io",
    5: "hlt",
    8: "shutdown",
    9: "fail_entry",
    17: "internal_error",
}
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5


def kernel_max_memslots(path: str = "/dev/kvm") -> int:
    """KVM_CAP_NR_MEMSLOTS of this kernel (memslots per address space); one clear error when
    /dev/kvm is missing or not accessible."""
    from ..errors import CapabilityMissing, PermissionProblem

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CapabilityMissing(f"no {path} on this host",
                                "load kvm (modprobe kvm_intel or kvm_amd) or run where KVM exists") from None
    except PermissionError:
        raise PermissionProblem(f"no permission to open {path}",
                                "run as root or add the user to the kvm group") from None
    except OSError as e:
        raise CapabilityMissing(f"cannot open {path}: {e.strerror}", "check that KVM works: ls -l /dev/kvm") from None
    try:
        return int(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS))
    except OSError as e:
        raise CapabilityMissing(f"{path}: KVM_CHECK_EXTENSION failed: {e.strerror}", "check /dev/kvm") from None
    finally:
        os.close(fd)


class OsCallError(OSError):
    """An OSError that names the call that failed."""

    def __init__(self, call: str, err: int):
        super().__init__(err, f"{call}: {os.strerror(err)}")
        self.call = call


def ioctl(fd: int, request: int, arg=0) -> int:
    """ioctl returning the result; raises OsCallError with the errno on -1."""
    if isinstance(arg, ctypes.Structure):
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    else:
        ptr = ctypes.c_void_p(arg)
    r = _libc.ioctl(fd, request, ptr)
    if r < 0:
        raise OsCallError(f"ioctl {request:#x}", ctypes.get_errno())
    return r


def ioctl_raw(fd: int, request: int, arg) -> int:
    """ioctl returning -errno instead of raising (hot paths and expected failures)."""
    r = _libc.ioctl(fd, request, arg)
    if r < 0:
        return -ctypes.get_errno()
    return r


def mmap_anon(size: int, noreserve: bool = False) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_NORESERVE if noreserve else 0)
    addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == MAP_FAILED:
        raise OsCallError("mmap", ctypes.get_errno())
    return addr


def mmap_fd(fd: int, size: int) -> int:
    MAP_SHARED = 0x01
    addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if addr is None or addr == MAP_FAILED:
        raise OsCallError("mmap", ctypes.get_errno())
    return addr


def munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) < 0:
        raise OsCallError("munmap", ctypes.get_errno())


def madvise(addr: int, size: int, advice: int) -> None:
    if _libc.madvise(addr, size, advice) < 0:
        raise OsCallError("madvise", ctypes.get_errno())


# The hot loops call this directly (no wrapper frame): returns 0 or -1.
madvise_raw = _libc.madvise


def memset(addr: int, value: int, size: int) -> None:
    _libc.memset(addr, value, size)


PR_SET_THP_DISABLE = 41


def quiet_process_memory() -> None:
    """Keep this process from adding notifier calls of its own once the VM exists: stop glibc
    malloc from handing memory back (trim, munmap of mmapped chunks), and disable THP for the
    whole process (a munmap inside a huge page splits it first: one more callback)."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, 32 << 20)
        _mallopt(M_TRIM_THRESHOLD, 0x7FFFFFFF)
    try:
        _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    except AttributeError:  # pragma: no cover
        pass
