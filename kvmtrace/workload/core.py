"""The built-in real-VM workload: one KVM VM with N memslots over anonymous memory, driven by
scenarios modelled on the kernel's tools/testing/selftests/kvm/memslot_perf_test.c, and the
exact ground truth of what it did (for checking a tracer's counts).

Notifier events per system call, measured on this project's CI host (6.18, interval-tree
memslots) with an independent bcc counter on ``kvm:kvm_unmap_hva_range`` / ``kvm_age_hva`` /
``kvm_test_age_hva`` filtered by the workload's pid (tests/test_workload.py re-checks them):

* ``madvise(MADV_DONTNEED)`` of one range inside one VMA: exactly **one** unmap hva operation,
  whatever the length (4 KiB or 64 MiB), whether the pages are populated or not, and whether
  the range overlaps a memslot or not (the callback fires for every range of the mm; KVM
  finds no slot). A range crossing k VMAs would give k; the workload keeps all its memory in
  one VMA (one mmap, MADV_NOHUGEPAGE applied to the whole mapping at once, so no split and no
  THP split adding callbacks).
* Slots visited by one unmap = memslots whose hva range overlaps ``[start, end)``
  (the kernel's interval-tree walk); computed here from the workload's own slot table.
* ``madvise(MADV_COLD)``: no notifier call (young bits are cleared without one).
  ``madvise(MADV_PAGEOUT)`` on anonymous memory with no swap: none either; with swap the
  kernel may unmap pages (one unmap callback per reclaimed page). Neither makes KVM's
  age/test_age run in the workload's context on this host: aging is decided by reclaim,
  DAMON (kdamond) or khugepaged, in their own tasks. So the ``age`` op count in the ground
  truth is ``null`` (not exact), and ``hva_ops_exact`` says which counts are exact.
* Page faults (first touch), mmap, KVM_CREATE_VM, memslot create, dirty-log on/off:
  no notifier call. Memslot move and delete: none (they zap KVM's own page tables,
  ``kvmmmu:kvm_mmu_zap_all_fast``, not the notifier).
* Once the VM exists, every munmap or brk shrink of the process is a notifier call, Python's
  and malloc's included: freeing a 1 MiB pymalloc arena gave one unmap callback, two when
  the arena sat in a transparent huge page (split first). The workload therefore stops glibc
  from returning memory (mallopt), disables THP for the process (PR_SET_THP_DISABLE),
  disables the cyclic GC while it runs, builds its address lists and slot index once before
  the timed loops and keeps them, and closes the VM before munmapping its memory. The one
  munmap it cannot avoid, the vCPU's kvm_run area, is counted (part ``vcpu-teardown``: one
  unmap outside every slot). With that, the pid-filtered count of unmap events equals
  ``hva_ops["unmap"]`` exactly (checked at 16, 48, 64 and 32764 slots, every scenario).
* The vCPU test program (``out 0x10, 0x42; hlt`` in real mode) did run on this host
  (exit io, then hlt); elsewhere ``vcpu`` in the ground truth says why it could not.
"""

from __future__ import annotations

import bisect
import gc
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..consts import KVM_MEM_LOG_DIRTY_PAGES, SCENARIOS, Change, Op
from ..errors import CapabilityMissing, KvmtraceError, PermissionProblem, UsageError
from . import kvm as K
from .sizes import format_size

DEFAULT_SCENARIO = "mixed"
DEFAULT_SLOTS = 64
DEFAULT_ITERATIONS = 3
CHUNK = 2 << 20  # unmap-chunked granularity (the selftest's 2 MiB)
DEFAULT_TOTAL = 128 << 20  # default slot memory, split over the slots
MAX_DEFAULT_SLOT = 2 << 20
GAP = 64 * 4096  # memory after the slots that no memslot covers
MIXED_PAGES = 2048  # page-by-page unmaps per mixed iteration (default)
MIXED_MAP_PAGES = 512
# --pages bound: page-by-page unmaps per iteration (~2**32 madvise calls already take hours);
# memory stays bounded by one pass over the slot memory whatever the count (RangePlan.passes)
MAX_PAGES = 1 << 32
SPAN_OPS = 8  # mixed: ranges spanning three adjacent slots
OUTSIDE_OPS = 16  # mixed: single-page ranges overlapping no memslot (+1 over the whole gap)
VCPU_CODE_GPA = 0x1000
VCPU_CODE = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt

UNMAP = Op.UNMAP.label
AGE = Op.AGE.label
TEST_AGE = Op.TEST_AGE.label


class WorkloadInterrupted(KvmtraceError):
    """A signal stopped the workload; the VM and memory were released on the way out."""


def default_slot_size(slots: int) -> int:
    """128 MiB of slot memory split over the slots, as a power of two between one page and
    2 MiB (so 64 slots get 2 MiB each and 32000 slots one 4 KiB page each)."""
    per = DEFAULT_TOTAL // max(1, slots)
    size = K.PAGE_SIZE
    while size * 2 <= min(per, MAX_DEFAULT_SLOT):
        size *= 2
    return size


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class Slot:
    id: int
    hva: int
    size: int
    gpa: int
    flags: int = 0

    def as_dict(self) -> dict:
        return {"id": self.id, "hva": self.hva, "size": self.size, "gpa": self.gpa}


@dataclass
class RangePlan:
    """A precomputed list of madvise ranges and the ground truth they produce. The list is
    applied ``repeat`` times, then its first ``tail`` ranges (page-by-page plans longer than the
    slot memory wrap around it: the list holds one pass, never one entry per requested page)."""

    ranges: List[Tuple[int, int]]
    ops: int = 0
    outside: int = 0
    visited: int = 0
    repeat: int = 1
    tail: int = 0

    def passes(self):
        for _ in range(self.repeat):
            yield self.ranges
        if self.tail:
            yield self.ranges[: self.tail]


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _swap_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Workload:
    """One VM with ``slots`` memslots of ``slot_size`` bytes, driven by ``scenario``.

    >>> with Workload(slots=64, scenario="unmap", iterations=1) as wl:   # setup() on enter
    ...     wl.run()
    >>> wl.ground_truth()["hva_ops"]["unmap"]

    ``on_ready(pid)`` is called after the VM exists and before any memslot is created (the
    tracer handshake). ``handle_signals`` turns SIGTERM/SIGINT/SIGHUP into WorkloadInterrupted
    (main thread only) so the VM and memory are always released in ``close()``.
    """

    def __init__(
        self,
        slots: int = DEFAULT_SLOTS,
        slot_size: Optional[int] = None,
        scenario: str = DEFAULT_SCENARIO,
        iterations: Optional[int] = None,
        duration: Optional[float] = None,
        pages: Optional[int] = None,
        vcpu: bool = True,
        on_ready: Optional[Callable[[int], None]] = None,
        log: Optional[Callable[[str], None]] = None,
        handle_signals: bool = True,
        kvm_path: str = "/dev/kvm",
    ):
        if scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario {scenario!r}", "choose one of: " + ", ".join(SCENARIOS))
        if scenario == "multi-vm" and type(self) is Workload:
            raise UsageError("scenario multi-vm drives several VMs", "use kvmtrace.workload.multivm.MultiVmWorkload")
        if slots < 1:
            raise UsageError(f"--slots must be at least 1, got {slots}", "use e.g. --slots 64")
        if iterations is not None and duration is not None:
            raise UsageError("--iterations and --duration are exclusive", "give one of them")
        if iterations is not None and iterations < 1:
            raise UsageError(f"--iterations must be at least 1, got {iterations}", "use e.g. --iterations 3")
        if duration is not None and not (math.isfinite(duration) and duration > 0):
            raise UsageError(f"--duration must be positive, got {duration}", "use e.g. --duration 5")
        if slot_size is None:
            slot_size = default_slot_size(slots)
        if slot_size <= 0 or slot_size % K.PAGE_SIZE:
            raise UsageError(
                f"--slot-size {slot_size} is not a multiple of the page size ({K.PAGE_SIZE})",
                "use a multiple of 4k, e.g. 4k, 64k, 2M",
            )
        if pages is not None and not 1 <= pages <= MAX_PAGES:
            raise UsageError(f"--pages must be between 1 and {MAX_PAGES}, got {pages}", "use e.g. --pages 5000")
        self.nslots = slots
        self.slot_size = slot_size
        self.scenario = scenario
        self.iterations = iterations if (iterations is not None or duration is not None) else DEFAULT_ITERATIONS
        self.duration = duration
        self.slot_pages = slots * slot_size // K.PAGE_SIZE
        if pages is None:
            pages = min(self.slot_pages, MIXED_PAGES) if scenario == "mixed" else self.slot_pages
        self.pages = pages
        self.want_vcpu = vcpu
        self.on_ready = on_ready
        self.log = log or (lambda s: None)
        self.handle_signals = handle_signals
        self.kvm_path = kvm_path

        self.pid = os.getpid()
        self.tids: List[int] = []
        self.cap: Optional[int] = None
        self.vcpu_status = "not tried"
        self.vcpus = 0  # vCPUs the VM has (created; KVM keeps them until the VM ends)
        self.vcpu_detail = ""
        self.notes: List[str] = []
        self.slot_table: Dict[int, Slot] = {}
        self.initial_slots: List[dict] = []
        self.slot_setup_s: Optional[float] = None
        self.iter_times: List[float] = []
        self.run_s: Optional[float] = None
        self.hva_ops: Dict[str, Optional[int]] = {UNMAP: 0}
        self.hva_exact: Dict[str, bool] = {UNMAP: True}
        self.hva_outside: Dict[str, int] = {UNMAP: 0}
        self.hva_visited: Dict[str, int] = {UNMAP: 0}
        self.by_part: Dict[str, int] = {}
        self.age_requests = {"madv_cold_pages": 0, "madv_pageout_pages": 0}
        self.updates = {c.label: 0 for c in Change}
        self.completed = False

        self._kvm_fd = -1
        self._vm_fd = -1
        self._vcpu_fd = -1
        self._run_map = None
        self._mem = 0
        self._mem_size = 0
        self.mem_base = 0
        self._old_handlers: dict = {}
        self._closing = False
        self._plans: Dict[str, RangePlan] = {}
        self._index: Optional[Tuple[List[int], List[int]]] = None
        self._gc_was_enabled = False

    # ---------------------------------------------------------------- layout

    @property
    def slot_bytes(self) -> int:
        return self.nslots * self.slot_size

    @property
    def gap_hva(self) -> int:
        return self._mem + self.slot_bytes

    @property
    def spare_hva(self) -> int:
        return self._mem + self.slot_bytes + GAP

    @property
    def spare_id(self) -> int:
        return self.nslots  # churn slot id (needs nslots < cap)

    def _gpa_layout(self) -> Tuple[int, int, int]:
        """(move destination, churn slot gpa, churn move destination)."""
        a = max(self.slot_size, CHUNK)
        top = _align_up(self.slot_bytes, a)
        move_dest = top + a
        churn = move_dest + _align_up(self.slot_size, a)
        churn_dest = churn + _align_up(self.slot_size, a)
        return move_dest, churn, churn_dest

    def _has_spare(self) -> bool:
        return self.cap is None or self.nslots < self.cap

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Workload":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def setup(self) -> None:
        if self.handle_signals:
            self._install_signals()
        self.tids = [threading.get_native_id()]
        self._open_kvm()
        self._check_slots()
        self._map_memory()
        self._create_vm()
        if self.on_ready is not None:
            self.on_ready(self.pid)
        self._create_slots()
        if self.want_vcpu:
            self._try_vcpu()
        else:
            self.vcpu_status = "not tried (--no-vcpu)"
        self._plan()

    def close(self) -> None:
        """Release everything: vCPU, VM (unregisters the MMU notifier), then the memory."""
        self._closing = True
        if self._gc_was_enabled:
            gc.enable()
            self._gc_was_enabled = False
        self._release_vcpu()
        for name in ("_vm_fd",):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        if self._mem:
            try:
                K.munmap(self._mem, self._mem_size)
            except OSError:
                pass
            self._mem = 0
        if self._kvm_fd >= 0:
            try:
                os.close(self._kvm_fd)
            except OSError:
                pass
            self._kvm_fd = -1
        self._restore_signals()

    # ---------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._closing:
                return
            name = signal.Signals(signum).name
            raise WorkloadInterrupted(
                f"workload stopped by {name}; the VM and its memory were released",
                exit_code=128 + signum,
            )

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    # ---------------------------------------------------------------- setup steps

    def _open_kvm(self) -> None:
        try:
            self._kvm_fd = os.open(self.kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CapabilityMissing(
                f"{self.kvm_path} does not exist: KVM is not available on this host",
                "load KVM (modprobe kvm_intel or kvm_amd), enable virtualization in the "
                "firmware, or run in a VM with nested virtualization",
            ) from None
        except PermissionError:
            raise PermissionProblem(
                f"cannot open {self.kvm_path}: permission denied",
                "run as root, or add your user to the group owning /dev/kvm (usually 'kvm')",
            ) from None
        except OSError as e:
            raise CapabilityMissing(f"cannot open {self.kvm_path}: {e.strerror}", "check that KVM works: ls -l /dev/kvm; dmesg | grep -i kvm") from None
        try:
            api = K.ioctl(self._kvm_fd, K.KVM_GET_API_VERSION, 0)
        except OSError as e:
            raise CapabilityMissing(f"{self.kvm_path} is not a KVM device: {e.strerror}", "check /dev/kvm") from None
        if api != K.KVM_API_VERSION:
            raise CapabilityMissing(f"KVM API version {api}, expected {K.KVM_API_VERSION}", "use a kernel with the stable KVM API")
        try:
            cap = K.ioctl(self._kvm_fd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_NR_MEMSLOTS)
        except OSError:
            cap = 0
        self.cap = cap if cap > 0 else None

    def _check_slots(self) -> None:
        if self.cap is not None and self.nslots > self.cap:
            raise UsageError(
                f"--slots {self.nslots} is above this kernel's memslot limit "
                f"(KVM_CAP_NR_MEMSLOTS = {self.cap})",
                f"use --slots {self.cap} or fewer",
            )
        if self.scenario == "churn" and not self._has_spare():
            raise UsageError(
                f"scenario churn needs one free memslot id, but --slots {self.nslots} uses all "
                f"{self.cap}",
                f"use --slots {self.cap - 1} or fewer",
            )
        if self.scenario == "mixed" and not self._has_spare():
            self.notes.append("churn part skipped: every memslot id is in use")

    def _map_memory(self) -> None:
        K.quiet_process_memory()
        size = self.memory_bytes
        avail = _mem_available()
        if avail is not None and size > avail * 0.8:
            raise KvmtraceError(
                f"the workload needs {format_size(size)} of memory but only "
                f"{format_size(avail)} is available",
                "use fewer --slots or a smaller --slot-size (e.g. --slot-size 4k)",
            )
        try:
            self._mem = K.mmap_anon(size)
        except OSError as e:
            raise KvmtraceError(
                f"cannot map {format_size(size)} of workload memory: {os.strerror(e.errno)}",
                "use fewer --slots or a smaller --slot-size (e.g. --slot-size 4k)",
            ) from None
        self._mem_size = size
        try:
            # one call over the whole mapping: the flag change does not split the VMA
            K.madvise(self._mem, size, K.MADV_NOHUGEPAGE)
        except OSError as e:
            self.notes.append(f"MADV_NOHUGEPAGE failed ({os.strerror(e.errno)}): THP splits may add unmap callbacks")
            self.hva_exact[UNMAP] = False
        self.mem_base = self._mem
        # fault everything in (before the VM exists: no notifier yet), except the spare slot's
        # memory and, for move-inactive, the memory of the slot that moves
        if self.scenario == "move-inactive":
            K.memset(self._mem, 0, self.slot_bytes - self.slot_size)
            K.memset(self.gap_hva, 0, GAP)
        else:
            K.memset(self._mem, 0, self.slot_bytes + GAP)

    def _create_vm(self) -> None:
        try:
            self._vm_fd = K.ioctl(self._kvm_fd, K.KVM_CREATE_VM, 0)
        except OSError as e:
            if e.errno in (1, 13):
                raise PermissionProblem(f"KVM_CREATE_VM: {os.strerror(e.errno)}", "run as root or check /dev/kvm permissions") from None
            raise CapabilityMissing(
                f"KVM_CREATE_VM failed: {os.strerror(e.errno)}",
                "check that KVM works on this host (dmesg | grep -i kvm); free memory or file descriptors",
            ) from None

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        r = K.KvmUserspaceMemoryRegion(slot, flags, gpa, size, hva)
        rc = K.ioctl_raw(self._vm_fd, K.KVM_SET_USER_MEMORY_REGION, K.ctypes.byref(r))
        if rc < 0:
            err = -rc
            what = "delete" if size == 0 else "set"
            remedy = "use fewer --slots or a smaller --slot-size"
            if err == 12:
                remedy = "free memory, or use fewer --slots / a smaller --slot-size"
            raise KvmtraceError(
                f"KVM_SET_USER_MEMORY_REGION ({what} slot {slot}, gpa {gpa:#x}, "
                f"{format_size(size)}) failed: {os.strerror(err)}",
                remedy,
            )

    def _create_slots(self) -> None:
        t0 = time.perf_counter()
        ss = self.slot_size
        base = self._mem
        setr = self._set_region
        for i in range(self.nslots):
            setr(i, 0, i * ss, ss, base + i * ss)
            self.updates[Change.CREATE.label] += 1
        self.slot_setup_s = time.perf_counter() - t0
        for i in range(self.nslots):
            self.slot_table[i] = Slot(i, base + i * ss, ss, i * ss)
        self.initial_slots = [s.as_dict() for s in self.slot_table.values()]

    def _try_vcpu(self) -> None:
        """One vCPU running a 5-byte real-mode program (as kvmtest.c does): out 0x42 to port
        0x10, then hlt. Host-side scenarios continue whatever happens. Its kvm_run area is
        unmapped right away: that munmap is itself one unmap callback (outside every slot),
        counted in the ground truth as part ``vcpu-teardown``. Its descriptor stays open until
        ``close()``, as a VMM keeps its vCPU descriptors: KVM keeps a vCPU until the VM ends
        anyway, and tools (``kvmtrace top``, ``doctor``) count a VM's vCPUs by its
        ``anon_inode:kvm-vcpu:N`` descriptors."""
        if platform.machine() not in ("x86_64", "i686", "i386"):
            self.vcpu_status = f"not tried: the test program is x86 code, host is {platform.machine()}"
            return
        if threading.current_thread() is not threading.main_thread():
            self.vcpu_status = "not tried: needs the main thread (KVM_RUN timeout uses SIGALRM)"
            return
        if self.slot_bytes < VCPU_CODE_GPA + K.PAGE_SIZE:
            self.vcpu_status = "not tried: slot memory does not cover gpa 0x1000"
            return
        try:
            self._vcpu_fd = K.ioctl(self._vm_fd, K.KVM_CREATE_VCPU, 0)
        except OSError as e:
            self.vcpu_status = f"could not create: KVM_CREATE_VCPU: {os.strerror(e.errno)}"
            return
        self.vcpus = 1
        try:
            try:
                msz = K.ioctl(self._kvm_fd, K.KVM_GET_VCPU_MMAP_SIZE, 0)
                self._run_map = (K.mmap_fd(self._vcpu_fd, msz), msz)
                K.ctypes.memmove(self._mem + VCPU_CODE_GPA, VCPU_CODE, len(VCPU_CODE))
                sregs = K.KvmSregs()
                K.ioctl(self._vcpu_fd, K.KVM_GET_SREGS, sregs)
                sregs.cs.base = 0
                sregs.cs.selector = 0
                K.ioctl(self._vcpu_fd, K.KVM_SET_SREGS, sregs)
                regs = K.KvmRegs()
                regs.rip = VCPU_CODE_GPA
                regs.rflags = 0x2
                K.ioctl(self._vcpu_fd, K.KVM_SET_REGS, regs)
            except OSError as e:
                self.vcpu_status = f"could not set up: {e}"
                return
            self._run_vcpu()
        finally:
            self._unmap_run()

    def _run_vcpu(self) -> None:
        addr = self._run_map[0]
        head = K.KvmRunHead.from_address(addr)
        seen = []
        old = signal.signal(signal.SIGALRM, lambda *a: None)
        try:
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            for _ in range(4):
                rc = K.ioctl_raw(self._vcpu_fd, K.KVM_RUN, None)
                if rc < 0:
                    why = "timed out after 1 s" if rc == -4 else os.strerror(-rc)
                    self.vcpu_status = f"could not run: KVM_RUN: {why}"
                    break
                reason = head.exit_reason
                name = K.KVM_EXIT_NAMES.get(reason, str(reason))
                if reason == K.KVM_EXIT_IO:
                    val = K.ctypes.c_uint8.from_address(addr + head.io_data_offset).value
                    seen.append(f"io port {head.io_port:#x} value {val:#x}")
                    continue
                seen.append(name)
                if reason == K.KVM_EXIT_HLT and seen[0] == "io port 0x10 value 0x42":
                    self.vcpu_status = "ran"
                else:
                    self.vcpu_status = f"could not run ordinary guest code: KVM_RUN exit {name}"
                break
            else:
                self.vcpu_status = "could not run: no hlt after 4 KVM_RUN calls"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        self.vcpu_detail = ", then ".join(seen)

    def _release_vcpu(self) -> None:
        self._unmap_run()
        if self._vcpu_fd >= 0:
            try:
                os.close(self._vcpu_fd)
            except OSError:
                pass
            self._vcpu_fd = -1

    def _unmap_run(self) -> None:
        if self._run_map is not None:
            addr, size = self._run_map
            self._run_map = None
            try:
                K.munmap(addr, size)
            except OSError:
                pass
            else:
                if self._vm_fd >= 0:  # the VM's notifier sees this munmap
                    plan = self._account([(addr, size)])
                    self._add_unmap("vcpu-teardown", plan)

    # ---------------------------------------------------------------- plans

    def _account(self, ranges: List[Tuple[int, int]]) -> RangePlan:
        """Ground truth of a list of DONTNEED ranges against the base slot table (the churn
        slot never exists while ranges are unmapped). The index is built once and kept:
        freeing tens of thousands of Python ints would return pymalloc arenas with munmap,
        and every munmap of this process is a notifier call once the VM exists."""
        if self._index is None:
            slots = sorted(self.slot_table.values(), key=lambda s: s.hva)
            self._index = ([s.hva for s in slots], [s.hva + s.size for s in slots])
        starts, ends = self._index
        plan = RangePlan(ranges)
        for a, n in ranges:
            b = a + n
            hit = bisect.bisect_left(starts, b) - bisect.bisect_right(ends, a)
            hit = max(0, hit)
            plan.ops += 1
            plan.visited += hit
            if hit == 0:
                plan.outside += 1
        return plan

    def _page_plan(self, npages: int, first: int = 0) -> RangePlan:
        """``npages`` single-page unmaps from page ``first`` of the slot memory on, wrapping
        around it; one pass is listed and accounted, repeats are multiplied."""
        P = K.PAGE_SIZE
        total = self.slot_pages
        cycle = [(self._mem + ((first + i) % total) * P, P) for i in range(min(npages, total))]
        full, tail = divmod(npages, len(cycle))
        one = self._account(cycle)
        rest = self._account(cycle[:tail])
        return RangePlan(cycle, ops=full * one.ops + rest.ops, outside=full * one.outside + rest.outside,
                         visited=full * one.visited + rest.visited, repeat=full, tail=tail)

    def _chunk_ranges(self, start: int, length: int) -> List[Tuple[int, int]]:
        return [(a, min(CHUNK, start + length - a)) for a in range(start, start + length, CHUNK)]

    def _plan(self) -> None:
        P = K.PAGE_SIZE
        sc = self.scenario
        if sc in ("unmap", "mixed"):
            self._plans["unmap"] = self._page_plan(self.pages)
        if sc in ("unmap-chunked", "mixed"):
            self._plans["unmap-chunked"] = self._account(self._chunk_ranges(self._mem, self.slot_bytes))
        if sc in ("map", "mixed"):
            n = self.pages if sc == "map" else min(self.slot_pages, MIXED_MAP_PAGES)
            half = max(1, n // 2)
            self._plans["map-a"] = self._page_plan(n - half, half)  # phase A: fault half A, unmap half B
            self._plans["map-b"] = self._page_plan(half, 0)
        if sc == "mixed":
            out = [(self.gap_hva + i * P, P) for i in range(min(OUTSIDE_OPS, GAP // P))]
            out.append((self.gap_hva, GAP))
            self._plans["outside"] = self._account(out)
            span = []
            ss = self.slot_size
            width = min(3, self.nslots)
            lo = (ss // 2) // P * P
            hi = _align_up(ss // 2, P) if ss > P else ss
            for j in range(SPAN_OPS):
                i = (j * 7) % max(1, self.nslots - width + 1)
                a = self._mem + i * ss + (lo if width > 1 else 0)
                b = self._mem + (i + width - 1) * ss + (hi if width > 1 else ss)
                span.append((a, b - a))
            # one range from the middle of the last slot into the gap: inside, 1 slot visited
            span.append((self._mem + self.slot_bytes - ss + lo, ss - lo + GAP // 2))
            self._plans["span"] = self._account(span)
        if sc in ("age", "mixed"):
            self._plans["age"] = RangePlan(self._chunk_ranges(self._mem, self.slot_bytes))
            self.hva_ops[AGE] = None
            self.hva_ops[TEST_AGE] = None
            self.hva_exact[AGE] = False
            self.hva_exact[TEST_AGE] = False
            if sc == "age" and _swap_total() > 0:
                self.hva_exact[UNMAP] = False
                self.notes.append("swap is on: MADV_PAGEOUT may unmap pages (unmap count not exact)")

    # ---------------------------------------------------------------- run

    def run(self) -> None:
        """Run the scenario for the requested iterations or duration."""
        if self._vm_fd < 0:
            raise RuntimeError("Workload.run() before setup()")
        body = getattr(self, "_body_" + self.scenario.replace("-", "_"))
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        t_start = time.perf_counter()
        try:
            k = 0
            while True:
                self._prepare()
                t0 = time.perf_counter()
                body()
                self.iter_times.append(time.perf_counter() - t0)
                k += 1
                if self.duration is None:
                    if k >= self.iterations:
                        break
                elif time.perf_counter() - t_start >= self.duration:
                    break
            self.completed = True
        finally:
            self.run_s = time.perf_counter() - t_start
            if self._gc_was_enabled:
                gc.enable()
                self._gc_was_enabled = False

    def _prepare(self) -> None:
        """Untimed, between iterations: fault the slot memory back in (page faults fire no
        notifier). The inactive slot of move-inactive stays untouched."""
        if self.scenario in ("move-inactive", "churn"):
            return
        K.memset(self._mem, 1, self.slot_bytes + (GAP if self.scenario == "mixed" else 0))

    def _dontneed(self, part: str) -> None:
        plan = self._plans[part]
        madv = K.madvise_raw
        adv = K.MADV_DONTNEED
        for ranges in plan.passes():
            for a, n in ranges:
                if madv(a, n, adv):
                    err = K.ctypes.get_errno()
                    raise KvmtraceError(f"madvise(MADV_DONTNEED, {a:#x}, {n}) failed: {os.strerror(err)}",
                                        "report this as a bug")
        self._add_unmap(part, plan)

    def _add_unmap(self, part: str, plan: RangePlan) -> None:
        self.hva_ops[UNMAP] += plan.ops
        self.hva_outside[UNMAP] += plan.outside
        self.hva_visited[UNMAP] += plan.visited
        self.by_part[part] = self.by_part.get(part, 0) + plan.ops

    def _advise_age(self, pageout: bool) -> None:
        plan = self._plans["age"]
        madv = K.madvise_raw
        for adv, key in ((K.MADV_COLD, "madv_cold_pages"), (K.MADV_PAGEOUT, "madv_pageout_pages")):
            if adv == K.MADV_PAGEOUT and not pageout:
                continue
            for a, n in plan.ranges:
                if madv(a, n, adv):
                    err = K.ctypes.get_errno()
                    if err == 22:  # EINVAL: advice unknown to this kernel (MADV_COLD/PAGEOUT are 5.4+)
                        self.notes.append(f"{key.split('_')[1].upper()} not supported by this kernel")
                        break
                    raise KvmtraceError(f"madvise({key}) failed: {os.strerror(err)}", "report this as a bug")
                self.age_requests[key] += n // K.PAGE_SIZE

    def _move_round_trip(self) -> None:
        s = self.slot_table[self.nslots - 1]
        dest, _, _ = self._gpa_layout()
        self._set_region(s.id, s.flags, dest, s.size, s.hva)
        self.updates[Change.MOVE.label] += 1
        self._set_region(s.id, s.flags, s.gpa, s.size, s.hva)
        self.updates[Change.MOVE.label] += 1
        self.by_part["move"] = self.by_part.get("move", 0) + 2

    def _churn_cycle(self) -> None:
        _, gpa, dest = self._gpa_layout()
        sid, hva, ss = self.spare_id, self.spare_hva, self.slot_size
        ch = self.updates
        self._set_region(sid, 0, gpa, ss, hva)
        ch[Change.CREATE.label] += 1
        self.slot_table[sid] = Slot(sid, hva, ss, gpa)
        try:
            self._set_region(sid, KVM_MEM_LOG_DIRTY_PAGES, gpa, ss, hva)
            ch[Change.FLAGS_ONLY.label] += 1
            self._set_region(sid, 0, gpa, ss, hva)
            ch[Change.FLAGS_ONLY.label] += 1
            self._set_region(sid, 0, dest, ss, hva)
            ch[Change.MOVE.label] += 1
            self._set_region(sid, 0, gpa, ss, hva)
            ch[Change.MOVE.label] += 1
        finally:
            self._set_region(sid, 0, gpa, 0, hva)
            ch[Change.DELETE.label] += 1
            del self.slot_table[sid]
        self.by_part["churn"] = self.by_part.get("churn", 0) + 6

    # scenario bodies (one timed iteration each)

    def _body_unmap(self) -> None:
        self._dontneed("unmap")

    def _body_unmap_chunked(self) -> None:
        self._dontneed("unmap-chunked")

    def _body_map(self) -> None:
        n = self.pages
        half = max(1, n // 2)
        # phase A: fault in half A while unmapping half B, then the other way round
        self._fault(0, half)
        self._dontneed("map-a")
        self._fault(half, n - half)
        self._dontneed("map-b")

    def _fault(self, first: int, npages: int) -> None:
        P = K.PAGE_SIZE
        total = self.slot_pages
        if first + npages <= total:
            K.memset(self._mem + first * P, 2, npages * P)
        else:
            for i in range(min(npages, total)):  # a second touch of a page faults nothing
                K.memset(self._mem + ((first + i) % total) * P, 2, 1)

    def _body_move_active(self) -> None:
        s = self.slot_table[self.nslots - 1]
        K.memset(s.hva, 3, s.size)  # the moved area is in use
        self._move_round_trip()

    def _body_move_inactive(self) -> None:
        self._move_round_trip()

    def _body_age(self) -> None:
        self._advise_age(pageout=True)

    def _body_churn(self) -> None:
        self._churn_cycle()

    def _body_mixed(self) -> None:
        self._dontneed("unmap")
        self._dontneed("unmap-chunked")
        self._dontneed("outside")
        self._dontneed("span")
        n = min(self.slot_pages, MIXED_MAP_PAGES)
        half = max(1, n // 2)
        self._fault(0, half)
        self._dontneed("map-a")
        self._fault(half, n - half)
        self._dontneed("map-b")
        self._body_move_active()
        self._advise_age(pageout=False)  # MADV_COLD only: it never unmaps, so unmap stays exact
        if self._has_spare():
            self._churn_cycle()

    # ---------------------------------------------------------------- results

    def ground_truth(self) -> dict:
        times = self.iter_times
        return {
            "schema": 1,
            "tool": "kvmtrace workload",
            "pid": self.pid,
            "tids": list(self.tids),
            "kernel": os.uname().release,
            "scenario": self.scenario,
            "iterations": len(times),
            "duration_s": self.duration,
            "completed": self.completed,
            "slots": self.nslots,
            "slot_size": self.slot_size,
            "pages": self.pages,
            "nr_memslots_cap": self.cap,
            "memory": {"hva": self.mem_base, "size": self.memory_bytes},
            "outside_range": {"hva": self.mem_base + self.slot_bytes if self.mem_base else 0, "size": GAP},
            "vcpu": self.vcpu_status,
            "vcpu_detail": self.vcpu_detail,
            "vcpus": self.vcpus,
            "hva_ops": dict(self.hva_ops),
            "hva_ops_exact": dict(self.hva_exact),
            "hva_ops_outside_slots": dict(self.hva_outside),
            "hva_slots_visited": dict(self.hva_visited),
            "hva_ops_by_part": dict(self.by_part),
            "age_requests": dict(self.age_requests),
            "memslot_updates": dict(self.updates),
            "slot_ranges": list(self.initial_slots),
            "slot_setup_s": self.slot_setup_s,
            "iter_avg_s": (sum(times) / len(times)) if times else None,
            "iter_best_s": min(times) if times else None,
            "iter_times_s": list(times),
            "run_s": self.run_s,
            "notes": list(self.notes),
        }

    @property
    def memory_bytes(self) -> int:
        """Size of the workload's one mapping: slots, the gap no slot covers, the spare slot."""
        return self.slot_bytes + GAP + self.slot_size

    def write_ground_truth(self, path: str) -> None:
        from ..output import write_text  # O_EXCL|O_NOFOLLOW temporary file, renamed onto path

        write_text(path, json.dumps(self.ground_truth(), indent=1) + "\n", "--json-out")
