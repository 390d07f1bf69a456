"""Seeding the VMs that run at attach never overwrites what the kernel registered meanwhile
(issue 19: `_tp_seed` checked `vmm` for the process and wrote its list later, so a VM created
in between was lost). On fake maps, no bcc, no root: the fake "kernel" registers a VM of the
same process at the worst moment, while the seeding builds the process's list."""

from __future__ import annotations

import inspect
import types

from kvmtrace.tracer import records as R, session as S

PID = (1 << 22) + 5  # beyond any pid_max: kcmp finds no such process (every fd its own VM)


class Key:
    def __init__(self, value=None, **kw):
        self.value, self.tgid, self.fd = value, kw.get("tgid", 0), kw.get("fd", 0)

    def _t(self):
        return (self.value, self.tgid, self.fd)

    def __eq__(self, o):
        return self._t() == o._t()

    def __hash__(self):
        return hash(self._t())


class Table(dict):
    def __init__(self, leaf, size=0):
        super().__init__()
        self._leaf, self._size, self.on_get = leaf, size, None

    def Key(self, value=None):  # noqa: N802 (bcc's names)
        return Key(value)

    def Leaf(self, value=None):  # noqa: N802
        x = self._leaf()
        if value is not None:
            x.value = value
        return x

    def get(self, k, default=None):
        v = dict.get(self, k, default)
        if self.on_get is not None:
            hook, self.on_get = self.on_get, None
            hook()  # the kernel acts right after the read
        return v

    def __len__(self):
        return self._size or dict.__len__(self)

    def __getitem__(self, k):
        if k not in self and self._size:
            return self.Leaf(0)
        return dict.__getitem__(self, k)


def vmm_leaf():
    return types.SimpleNamespace(created=0, n=0, gen=[0] * R.VM_PER_PROC, tab=[0] * R.VM_PER_PROC,
                                 fd=[0] * R.VM_PER_PROC, agg=[0] * R.VM_PER_PROC)


def vm_leaf():
    return types.SimpleNamespace(tgid=0, fd=0, ordinal=0, flags=0, tab=0, n=0, nmax=0, agg=0, refs=0)


def fake_session(monkeypatch):
    maps = {"vmm": Table(vmm_leaf), "tp_vms": Table(vm_leaf), "tp_vmfd": Table(lambda: types.SimpleNamespace(value=0)),
            "tp_vmmore": Table(lambda: types.SimpleNamespace(gen=0, tab=0, fd=0, agg=0)),
            "vmm_mark": Table(lambda: types.SimpleNamespace(value=0), size=65536)}
    monkeypatch.setattr(S.host, "vm_fds", lambda: {PID: [3]})  # one VM running at attach
    monkeypatch.setattr(S, "_insert_new", lambda t, k, v: t.setdefault(k, v) is v, raising=False)
    s = S.TraceSession.__new__(S.TraceSession)
    s.pid, s.bpf = None, maps
    s._seeded = set()
    return s, maps


def seed(s, concurrent):
    """The session's seeding (the same call on the code before, which had no ``concurrent``)."""
    kw = {"concurrent": concurrent} if "concurrent" in inspect.signature(s._tp_seed).parameters else {}
    s._tp_seed(**kw)


def kernel_registers_a_vm(maps, gen=1, fd=9):
    """What vm_register does for KVM_CREATE_VM returning fd: the VM, its descriptor, the
    process's list, the mark bumped after the change."""
    v = vm_leaf()
    v.tgid, v.fd, v.ordinal, v.tab, v.refs, v.agg = PID, fd, 1, R.NO_TAB, 1, 0
    maps["tp_vms"][Key(gen)] = v
    maps["tp_vmfd"][Key(tgid=PID, fd=fd)] = types.SimpleNamespace(value=gen)
    p = maps["vmm"].get(Key(PID)) or vmm_leaf()
    p.gen[p.n], p.fd[p.n], p.tab[p.n] = gen, fd, R.NO_TAB
    p.n += 1
    p.created = 1
    maps["vmm"][Key(PID)] = p
    mk = Key(PID % 65536)
    maps["vmm_mark"][mk] = types.SimpleNamespace(value=maps["vmm_mark"][mk].value + 1)


def test_a_vm_the_kernel_registers_during_seeding_stays_in_the_list(monkeypatch):
    s, maps = fake_session(monkeypatch)
    maps["vmm"].on_get = lambda: kernel_registers_a_vm(maps)  # right after the seeding reads vmm
    seed(s, True)
    p = maps["vmm"][Key(PID)]
    listed = sorted(p.gen[:p.n])
    seeded = R.SEED_GEN_BASE | (PID << 24) | 3
    assert listed == [1, seeded]  # the kernel's VM and the one running at attach
    assert p.fd[:p.n] == [3, 9]  # predating VMs first (the notifier order: newest last)
    assert p.created == 1  # the next VM's ordinal is 2, not 1 again


def test_seeding_with_nothing_in_flight_lists_the_running_vms(monkeypatch):
    s, maps = fake_session(monkeypatch)
    seed(s, False)
    p = maps["vmm"][Key(PID)]
    assert p.n == 1 and p.fd[0] == 3
    v = maps["tp_vms"][Key(p.gen[0])]
    assert (v.flags & R.VMF_PARTIAL, v.refs) == (R.VMF_PARTIAL, 1)


def test_a_vm_seeded_before_the_attach_and_closed_unseen_leaves_the_list(monkeypatch):
    """Its descriptor closed between the first scan and the attach of the system-call programs
    (no close() seen): the second seeding ends it, so it cannot take a live VM's ops."""
    s, maps = fake_session(monkeypatch)
    seed(s, False)
    assert maps["vmm"][Key(PID)].n == 1
    monkeypatch.setattr(S.host, "vm_fds", lambda: {})
    seed(s, True)
    p = maps["vmm"][Key(PID)]
    assert p.n == 0
    (v,) = maps["tp_vms"].values()
    assert v.flags & R.VMF_DEAD and not maps["tp_vmfd"]
