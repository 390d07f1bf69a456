"""Scenario ``multi-vm``: several VMs in one VMM process, as KVM's own selftests and some VMMs
create them, with exact ground truth *per VM*.

1. Three VMs one after another (each closed before the next is created, so the kernel usually
   hands out the same descriptor number and may reuse the ``struct kvm`` address): VM i has
   ``slots + i - 1`` memslots, goes through one churn cycle on a spare slot (create, dirty
   logging on and off = 2 flags_only, move there and back = 2 move, delete) and unmaps
   ``pages * i`` pages one by one inside its slots.
2. Two VMs alive at once: KVM registers one MMU notifier per VM on the process's mm, so every
   madvise fires the hva tracepoints once *per VM* with the same range. Each VM has memslots
   over memory of its own and one memslot over a region both map (aliased memory); pages are
   unmapped one by one in D's memory, E's memory and the shared region. Then E is closed and
   more pages of D are unmapped (only D's notifier is left).

Ground truth (``vms`` in the JSON, in creation order): per VM its ordinal in this process,
descriptor, memslot updates by change type, unmap operations (every madvise while it is alive)
and slots visited (the pages inside its own slots), memslots at the end and at most. Host-side
memory only (no vCPU): no notifier call comes from anything but the counted madvise calls
(process memory is quieted as in the other scenarios, the cyclic GC is off, and memory is
unmapped only after every VM is closed).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import List, Optional

from ..consts import KVM_MEM_LOG_DIRTY_PAGES, Change
from ..errors import KvmtraceError
from . import kvm as K
from .core import Workload

SEQUENTIAL = 3
DEFAULT_PAGES = 50
DEFAULT_SLOT_SIZE = 16 * K.PAGE_SIZE  # five VMs' memory is populated: keep it small
UNMAP = "unmap"


class _Vm:
    def __init__(self, ordinal: int, fd: int, concurrent: bool) -> None:
        self.ordinal = ordinal
        self.fd = fd
        self.concurrent = concurrent
        self.updates = {c.label: 0 for c in Change}
        self.ops = 0
        self.visited = 0
        self.slots = 0
        self.slots_max = 0
        self.alive = True

    def as_dict(self) -> dict:
        return {"ordinal": self.ordinal, "fd": self.fd, "concurrent": self.concurrent,
                "memslot_updates": dict(self.updates), "hva_ops": {UNMAP: self.ops},
                "hva_slots_visited": {UNMAP: self.visited}, "memslots_final": self.slots,
                "memslots_max": self.slots_max}


class MultiVmWorkload(Workload):
    """``Workload(scenario="multi-vm")`` for several VMs in this process (see the module doc).
    ``slots`` is the first VM's memslot count, ``pages`` the first VM's unmapped pages."""

    def __init__(self, slots: int = 4, pages: Optional[int] = None, slot_size: Optional[int] = None,
                 **kw) -> None:
        for k in ("scenario", "iterations", "duration", "vcpu"):  # one run, host side only
            kw.pop(k, None)
        super().__init__(slots=slots, scenario="multi-vm", pages=pages or DEFAULT_PAGES,
                         slot_size=slot_size or DEFAULT_SLOT_SIZE, iterations=1, vcpu=False, **kw)
        self.vms: List[_Vm] = []
        self._maps: List[tuple] = []  # (addr, size), unmapped at close after every VM is gone

    # ---------------------------------------------------------------- lifecycle
    def setup(self) -> None:
        if self.handle_signals:
            self._install_signals()
        self.tids = [threading.get_native_id()]
        self._open_kvm()
        K.quiet_process_memory()
        if self.on_ready is not None:
            self.on_ready(self.pid)
        self.vcpu_status = "not tried (multi-vm: host side only)"

    def close(self) -> None:
        """Every VM first (unregisters its MMU notifier), then the memory, then what the
        single-VM workload releases (its VM fd is already closed here)."""
        for vm in self.vms:
            if vm.alive:
                self._close_vm(vm)
        self._vm_fd = -1
        for addr, size in self._maps:
            try:
                K.munmap(addr, size)
            except OSError:
                pass
        self._maps = []
        super().close()

    # ---------------------------------------------------------------- pieces
    def _new_vm(self, concurrent: bool) -> _Vm:
        self._vm_fd = -1
        self._create_vm()
        vm = _Vm(len(self.vms) + 1, self._vm_fd, concurrent)
        self.vms.append(vm)
        return vm

    def _close_vm(self, vm: _Vm) -> None:
        try:
            os.close(vm.fd)
        except OSError:
            pass
        vm.alive = False

    def _map(self, size: int) -> int:
        addr = K.mmap_anon(size)
        self._maps.append((addr, size))
        K.memset(addr, 1, size)  # populated: every madvise below zaps present pages
        return addr

    def _region(self, vm: _Vm, slot: int, flags: int, gpa: int, size: int, hva: int, change: Change) -> None:
        self._vm_fd = vm.fd
        self._set_region(slot, flags, gpa, size, hva)
        vm.updates[change.label] += 1
        if change == Change.CREATE:
            vm.slots += 1
        elif change == Change.DELETE:
            vm.slots -= 1
        vm.slots_max = max(vm.slots_max, vm.slots)

    def _unmap_pages(self, addr: int, npages: int, owners: List[_Vm]) -> None:
        """madvise page by page; every live VM's notifier fires once per call; the pages lie in
        a slot of each VM in ``owners``."""
        madv, adv, page = K.madvise_raw, K.MADV_DONTNEED, K.PAGE_SIZE
        for i in range(npages):
            if madv(addr + i * page, page, adv):
                err = K.ctypes.get_errno()
                raise KvmtraceError(f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}", "report this as a bug")
        for vm in self.vms:
            if vm.alive:
                vm.ops += npages
        for vm in owners:
            vm.visited += npages

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        ss = self.slot_size
        page = K.PAGE_SIZE
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        t0 = time.perf_counter()
        try:
            for i in range(1, SEQUENTIAL + 1):
                n = self.nslots + i - 1
                vm = self._new_vm(concurrent=False)
                mem = self._map((n + 1) * ss)
                for s in range(n):
                    self._region(vm, s, 0, s * ss, ss, mem + s * ss, Change.CREATE)
                spare, hva = n, mem + n * ss
                gpa, gpa2 = n * ss, (n + 8) * ss
                self._region(vm, spare, 0, gpa, ss, hva, Change.CREATE)
                self._region(vm, spare, KVM_MEM_LOG_DIRTY_PAGES, gpa, ss, hva, Change.FLAGS_ONLY)
                self._region(vm, spare, 0, gpa, ss, hva, Change.FLAGS_ONLY)
                self._region(vm, spare, 0, gpa2, ss, hva, Change.MOVE)
                self._region(vm, spare, 0, gpa, ss, hva, Change.MOVE)
                self._region(vm, spare, 0, gpa, 0, hva, Change.DELETE)
                self._unmap_pages(mem, min(self.pages * i, n * ss // page), [vm])
                self._close_vm(vm)
            d = self._new_vm(concurrent=True)
            e = self._new_vm(concurrent=True)
            nd, ne = max(self.nslots - 1, 1), max(self.nslots - 2, 1)
            mem_d, mem_e, shared = self._map(nd * ss), self._map(ne * ss), self._map(ss)
            for s in range(nd):
                self._region(d, s, 0, s * ss, ss, mem_d + s * ss, Change.CREATE)
            for s in range(ne):
                self._region(e, s, 0, s * ss, ss, mem_e + s * ss, Change.CREATE)
            self._region(d, nd, 0, nd * ss, ss, shared, Change.CREATE)  # both VMs map it
            self._region(e, ne, 0, ne * ss, ss, shared, Change.CREATE)
            q = max(1, self.pages)
            self._unmap_pages(mem_d, min(2 * q, nd * ss // page), [d])
            self._unmap_pages(mem_e, min(3 * q, ne * ss // page), [e])
            self._unmap_pages(shared, min(q, ss // page), [d, e])
            self._close_vm(e)
            self._unmap_pages(mem_d, min(q, nd * ss // page), [d])  # E gone: D's notifier only
            self._close_vm(d)
        finally:
            self.run_s = time.perf_counter() - t0
            self.iter_times = [self.run_s]
            if self._gc_was_enabled:
                gc.enable()
                self._gc_was_enabled = False
        self.completed = True
        for vm in self.vms:
            for k, v in vm.updates.items():
                self.updates[k] += v
            self.hva_ops[UNMAP] += vm.ops
            self.hva_visited[UNMAP] += vm.visited

    def ground_truth(self) -> dict:
        gt = super().ground_truth()
        gt["vms"] = [vm.as_dict() for vm in self.vms]
        gt["notes"] = gt["notes"] + [
            f"{len(self.vms)} VMs: {SEQUENTIAL} one after another, then 2 alive at once; "
            "hva_ops sums every VM's notifier calls (one per live VM per madvise)"]
        return gt
