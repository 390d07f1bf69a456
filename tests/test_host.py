"""tracer/host.py on a fake /proc tree (no root): VMM discovery, guest names, vCPU counts, the
privilege check."""

from __future__ import annotations

import os

from kvmtrace.tracer import host


def fake_proc(root, pid, comm, argv, links):
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for i, target in enumerate(links):
        os.symlink(target, d / "fd" / str(i))


def test_vms_names_and_vcpus(tmp_path):
    fake_proc(tmp_path, 100, "qemu-system-x86", ["qemu", "-name", "guest=web,,1,debug-threads=on"],
              ["anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0", "anon_inode:kvm-vcpu:1", "/dev/null"])
    fake_proc(tmp_path, 200, "firecracker", ["firecracker", "--id", "fc1"], ["anon_inode:kvm-vm", "anon_inode:kvm-vm"])
    fake_proc(tmp_path, 300, "bash", ["bash"], ["/dev/pts/0"])
    got, unreadable = host.vms(str(tmp_path))
    assert unreadable == 0
    assert [(v.pid, v.comm, v.name, v.vm_fds, v.vcpus) for v in got] == [
        (100, "qemu-system-x86", "web,1", 1, 2), (200, "firecracker", "fc1", 2, 0)]
    assert host.vmm_pids(str(tmp_path)) == {100: 1, 200: 2}
    assert host.owns_vm(100, str(tmp_path)) and not host.owns_vm(300, str(tmp_path))
    assert not host.owns_vm(999, str(tmp_path))
    info = host.proc_info(100, str(tmp_path))
    assert (info.comm, info.name, info.vcpus, info.alive) == ("qemu-system-x86", "web,1", 2, True)
    gone = host.proc_info(999, str(tmp_path))
    assert (gone.alive, gone.vcpus) == (False, None)


def test_guest_name_forms():
    assert host.guest_name(["qemu", "-name", "vm1"]) == "vm1"
    assert host.guest_name(["qemu", "-name=vm2,process=x"]) == "vm2"
    assert host.guest_name(["ch", "--name", "=HYPERLINK(1)"]) == "=HYPERLINK(1)"  # outputs escape it
    assert host.guest_name(["qemu"]) == ""


def test_one_privilege_check(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000000c000000000\n")  # CAP_PERFMON (38) + CAP_BPF (39)
    caps = host.capabilities(str(status))
    assert caps == {"CAP_SYS_ADMIN": False, "CAP_PERFMON": True, "CAP_BPF": True}
    assert host.Privileges(1000, caps).enough and host.Privileges(1000, caps).why_not == ""
    none = host.Privileges(1000, host.capabilities(str(tmp_path / "missing")))
    assert not none.enough and "CAP_BPF" in none.why_not
    assert host.Privileges(0, {}).enough
    assert host.can_trace()[0] == host.privileges().enough
