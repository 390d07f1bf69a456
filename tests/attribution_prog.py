"""A VMM shaped to test tracepoint mode's attribution (tests/test_attribution_e2e.py): real VMs
on /dev/kvm in one process, each with a one-page memslot over the same page, then N
madvise(MADV_DONTNEED) of that page, each of which fires every live VM's MMU notifier once.
It prints its own truth as one JSON line: its pid and, per VM in creation order, the unmaps its
notifier received (every VM alive through the loop: N each) and the memslot creations it made.

    python tests/attribution_prog.py SCENARIO N [--wait]

With --wait it prints "waiting" once set up and creates its VMs the moment a line arrives on
stdin (bench/attach_race: a VM created right after `record` prints its attached line).

Scenarios:
  one       one VM
  dup       two VMs; d = dup(vm1); close(vm1); a second slot of VM 1 created through d
  many      ten VMs in one process
  gaps      twelve VMs, VMs 3 and 10 closed (one of the first eight places, one beyond)
  over      VM_LIST_MAX + 2 VMs: the two newest are beyond the list the kernel keeps (their
            ops are ambiguous, the truth still gives each its N)
  vcpu      one VM with a vCPU; the VM's fd closed (the vCPU fd keeps the VM alive)
  dup2      two VMs; dup2(/dev/null, vm2) closes VM 2's only descriptor (no close() call): VM 2
            is gone, VM 1 gets every unmap (truth: VM 2 none)
  passed    one VM whose fd is passed to another process (SCM_RIGHTS), which keeps it, and closed
            here: no descriptor of this process holds the VM, whose notifier stays on this
            process's mm (tracepoint mode cannot tell its VM: its ops are ambiguous)
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

from kvmtrace.tracer.records import VM_LIST_MAX
from kvmtrace.workload import kvm as K


def main(scenario: str, n: int, wait: bool = False) -> None:
    K.quiet_process_memory()
    child = None
    if scenario == "passed":  # the other process, forked before any VM exists
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child = os.fork()
        if child == 0:  # holds the VM's descriptor until told to go
            mine.close()
            _msg, fds, _flags, _addr = socket.recv_fds(theirs, 1, 1)
            assert len(fds) == 1
            theirs.sendall(b"k")
            theirs.recv(1)
            os._exit(0)
        theirs.close()
    kvm = os.open("/dev/kvm", os.O_RDWR)
    page = K.PAGE_SIZE
    mem = K.mmap_anon(2 * page)
    K.memset(mem, 1, 2 * page)

    def new_vm() -> int:
        vm = K.ioctl(kvm, K.KVM_CREATE_VM, 0)
        r = K.KvmUserspaceMemoryRegion(0, 0, 0, page, mem)
        assert K.ioctl_raw(vm, K.KVM_SET_USER_MEMORY_REGION, ctypes.byref(r)) == 0
        return vm

    if wait:
        sys.stdout.write("waiting\n")
        sys.stdout.flush()
        sys.stdin.readline()
    count = {"one": 1, "dup": 2, "dup2": 2, "many": 10, "gaps": 12, "over": VM_LIST_MAX + 2, "vcpu": 1, "passed": 1}[scenario]
    vms = [new_vm() for _ in range(count)]
    creates = [1] * count
    keep = []  # descriptors to close at the end
    if scenario == "dup":
        d = os.dup(vms[0])
        os.close(vms[0])
        r = K.KvmUserspaceMemoryRegion(1, 0, 1 << 30, page, mem + page)  # through the dup
        assert K.ioctl_raw(d, K.KVM_SET_USER_MEMORY_REGION, ctypes.byref(r)) == 0
        creates[0] += 1
        keep = [d, vms[1]]
    elif scenario == "gaps":
        os.close(vms[2])
        os.close(vms[9])
        keep = [fd for i, fd in enumerate(vms) if i not in (2, 9)]
    elif scenario == "dup2":
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, vms[1])  # VM 2's descriptor now is /dev/null: VM 2 is destroyed
        keep = [vms[0], vms[1], null]
    elif scenario == "vcpu":
        vcpu = K.ioctl(vms[0], K.KVM_CREATE_VCPU, 0)
        os.close(vms[0])
        keep = [vcpu]
    elif scenario == "passed":
        socket.send_fds(mine, [b"v"], [vms[0]])
        assert mine.recv(1) == b"k"  # the other process holds it now
        os.close(vms[0])
        sys.stdout.write("closed\n")  # the test reads the figures now, then says go on
        sys.stdout.flush()
        sys.stdin.readline()
    else:
        keep = list(vms)
    for _ in range(n):
        assert K.madvise_raw(mem, page, K.MADV_DONTNEED) == 0
    for fd in keep:  # before the interpreter's own teardown unmaps anything
        os.close(fd)
    if child is not None:
        mine.sendall(b"q")
        os.waitpid(child, 0)
    unmaps = [n] * count
    if scenario == "dup2":
        unmaps[1] = 0
    if scenario == "gaps":
        unmaps[2] = unmaps[9] = 0
    out = {"pid": os.getpid(),
           "vms": [{"ordinal": i + 1, "unmap": u, "creates": c} for i, (u, c) in enumerate(zip(unmaps, creates))]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--wait" in sys.argv[3:])
