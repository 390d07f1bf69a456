"""Host end-to-end tests of the tracer in the mode this host supports (tracepoint mode here):
real VMs from the built-in workload, counts checked against its ground truth exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmtrace.tracer import records as R, session as S

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent


WHY = S.tracing_unavailable()
if WHY:
    pytest.skip(f"needs root, bcc, tracefs and /dev/kvm: {WHY}", allow_module_level=True)


@pytest.fixture(scope="module")
def session():
    with S.TraceSession(interval=0.5, events=True) as s:
        yield s


def run_workload(tmp_path, *args, name="truth.json"):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text())


def settle(session, pid):
    """Let the event consumer catch up, then snapshot."""
    time.sleep(0.3)
    return session.snapshot()


def vm_of(snap, pid):
    """The one VM of a single-VM workload process."""
    (v,) = [v for v in snap.vms if v.pid == pid]
    return v


def hva(snap, pid, op="unmap"):
    rows = [h for h in snap.hva if h.pid == pid and h.op == op]
    assert len(rows) <= 1
    return rows[0] if rows else None


def memslots(snap, pid):
    return {m.change: m.count for m in snap.memslot if m.pid == pid}


def test_unmap_count_and_derived_slots_equal_ground_truth(session, tmp_path):
    truth = run_workload(tmp_path, "--slots", "64", "--scenario", "unmap", "--pages", "5000", "--iterations", "1")
    snap = settle(session, truth["pid"])
    h = hva(snap, truth["pid"])
    assert h is not None, "no unmap operations traced for the workload VM"
    assert h.count == truth["hva_ops"]["unmap"] >= 5000
    assert h.slots_provenance == "derived" and h.lat_provenance == "syscall"
    # every page-sized unmap inside slot memory overlaps exactly one slot
    assert h.slots_count == h.count and h.underived == 0
    assert h.slots_sum == truth["hva_slots_visited"]["unmap"]
    assert h.lat_count > 0 and h.lat_hist.total == h.lat_count
    vm = vm_of(snap, truth["pid"])
    assert vm.partial is False and vm.ordinal == 1 and vm.memslots == vm.memslots_max == 64
    # its aggregates were an array slot (no hash lookup per event)
    assert [v.agg > 0 for v in session.read_maps().tp.vms.values() if v.tgid == truth["pid"]] == [True]
    # aggregated in the kernel by the VM's memslot count at each op: all at 64 (bucket 7)
    (b,) = [b for b in snap.by_memslots if b.vm_id == vm.vm_id and b.op == "unmap"]
    assert (b.bucket, b.count, b.memslots_max, b.slots_sum) == (7, h.count, 64, h.slots_sum)


def test_mixed_spans_outside_ranges_and_memslot_changes(session, tmp_path):
    truth = run_workload(tmp_path, "--slots", "48", "--scenario", "mixed", "--iterations", "2")
    pid = truth["pid"]
    snap = settle(session, pid)
    h = hva(snap, pid)
    assert h.count == truth["hva_ops"]["unmap"]
    assert h.slots_sum == truth["hva_slots_visited"]["unmap"]
    assert h.slots_max == 3  # the scenario's ranges spanning three adjacent slots
    assert h.slots_hist.counts[0] >= truth["hva_ops_outside_slots"]["unmap"]
    got = memslots(snap, pid)
    want = {k: v for k, v in truth["memslot_updates"].items() if v}
    assert got == want


def test_churn_memslot_updates_by_change_type(session, tmp_path):
    truth = run_workload(tmp_path, "--slots", "16", "--scenario", "churn", "--iterations", "5")
    snap = settle(session, truth["pid"])
    assert memslots(snap, truth["pid"]) == {k: v for k, v in truth["memslot_updates"].items() if v}
    for m in snap.memslot:
        if m.pid == truth["pid"]:
            assert m.lat_provenance == "syscall" and m.change_provenance == "derived"
            assert m.lat_hist.total == m.count and m.lat_sum_ns > 0


def test_two_vms_are_kept_apart(session, tmp_path):
    cmds = []
    for i, pages in enumerate((300, 700)):
        out = tmp_path / f"t{i}.json"
        cmds.append((out, subprocess.Popen(
            [sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(out), "--slots", "8",
             "--scenario", "unmap", "--pages", str(pages), "--iterations", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    truths = []
    for out, p in cmds:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        truths.append(json.loads(out.read_text()))
    snap = settle(session, truths[0]["pid"])
    for t in truths:
        assert hva(snap, t["pid"]).count == t["hva_ops"]["unmap"]
    assert truths[0]["hva_ops"]["unmap"] != truths[1]["hva_ops"]["unmap"]


def test_raw_events_carry_ranges_latency_and_slots(session, tmp_path):
    session.take_events()
    truth = run_workload(tmp_path, "--slots", "4", "--scenario", "unmap", "--pages", "50", "--iterations", "1")
    time.sleep(0.3)
    session.snapshot()
    evs = [e for e in session.take_events() if getattr(e, "op", None) == "unmap" and e.pid == truth["pid"]]
    assert len(evs) == truth["hva_ops"]["unmap"]
    assert all(e.end > e.start for e in evs)
    with_lat = [e for e in evs if e.latency_ns > 0]
    assert with_lat and all(e.lat_provenance == "syscall" for e in with_lat)
    assert sum(e.slots for e in evs) == truth["hva_slots_visited"]["unmap"]


def test_pid_filter_sees_only_that_process(tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.workload", "--wait-start", "--quiet", "--json-out", str(out),
                          "--slots", "8", "--scenario", "unmap", "--pages", "200", "--iterations", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line[0] == "READY"
    pid = int(line[1])
    other = subprocess.Popen([sys.executable, "-m", "kvmtrace.workload", "--quiet", "--slots", "4",
                              "--scenario", "unmap", "--pages", "100", "--iterations", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with S.TraceSession(pid=pid, interval=0.5) as s:
        p.stdin.write("\n")
        p.stdin.flush()
        p.communicate(timeout=120)
        other.wait(timeout=120)
        snap = settle(s, pid)
    truth = json.loads(out.read_text())
    assert {h.pid for h in snap.hva} == {pid}
    h = hva(snap, pid)
    assert h.count == truth["hva_ops"]["unmap"]
    assert h.lat_count == h.count and h.lat_hist.total == h.count
    # the VM was created before the tracer attached: no derived slot figure rather than a wrong one
    vm = vm_of(snap, pid)
    assert vm.partial and vm.ordinal == 0 and h.slots_count == 0 and h.slots_provenance == "none"
    assert h.underived == h.count
    # its slots might predate the trace: every update is counted, none given a guessed type
    assert memslots(snap, pid) == {"unknown": sum(truth["memslot_updates"].values())}


# ------------------------------------------------------------------ VM identity, in the kernel
def test_multi_vm_process_every_vm_its_own_exact_figures(session, tmp_path):
    """3 VMs one after another (same fd number) and 2 at once in one process: per-VM counts,
    slots visited and change types equal the workload's per-VM ground truth. For the two live
    VMs every madvise fires both notifiers; the truth of which VM's slots each page lies in is
    the workload's own bookkeeping, not kvmtrace's."""
    truth = run_workload(tmp_path, "--scenario", "multi-vm", "--slots", "4")
    pid = truth["pid"]
    snap = settle(session, pid)
    vms = sorted((v for v in snap.vms if v.pid == pid), key=lambda v: v.ordinal)
    assert [v.ordinal for v in vms] == [t["ordinal"] for t in truth["vms"]] == [1, 2, 3, 4, 5]
    assert len({v.label for v in vms}) == 5 and len({v.vm_id for v in vms}) == 5
    for v, t in zip(vms, truth["vms"]):
        h = [x for x in snap.hva if x.vm_id == v.vm_id and x.op == "unmap"]
        assert len(h) == 1, v
        h = h[0]
        assert (h.count, h.slots_sum, h.underived) == (t["hva_ops"]["unmap"], t["hva_slots_visited"]["unmap"], 0), v
        assert h.lat_count == h.count
        got = {m.change: m.count for m in snap.memslot if m.vm_id == v.vm_id}
        assert got == {k: n for k, n in t["memslot_updates"].items() if n}, v
        assert (v.memslots, v.memslots_max) == (t["memslots_final"], t["memslots_max"]), v
        buckets = [b for b in snap.by_memslots if b.vm_id == v.vm_id and b.op == "unmap"]
        assert sum(b.count for b in buckets) == h.count
        assert {b.memslots_max for b in buckets} == {t["memslots_final"]}
    assert snap.map_full == 0


def _as_nobody():
    os.setgid(65534)
    os.setuid(65534)


# Run as nobody by the base interpreter from / with nothing of this checkout: the checkout (and
# its venv) may sit in a directory only root can enter (e.g. under mktemp -d).
SPOOF = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
cmd, r = int(sys.argv[3]), ctypes.create_string_buffer(bytes.fromhex(sys.argv[4]))
fd = os.open("/dev/null", os.O_RDWR)
n, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
i = 0
while i < n or time.monotonic() < end:
    libc.ioctl(fd, ctypes.c_ulong(cmd), r)
    i += 1
print(os.getpid(), i)
"""


def spoof_cmd(calls: int, seconds: float):
    """KVM_SET_USER_MEMORY_REGION on /dev/null, ``calls`` times and for ``seconds``."""
    from kvmtrace.workload import kvm as K

    region = bytes(K.KvmUserspaceMemoryRegion(0, 0, 0, 1 << 20, 0x10000000)).hex()
    python = getattr(sys, "_base_executable", None) or sys.executable
    return [python, "-c", SPOOF, str(calls), str(seconds), str(K.KVM_SET_USER_MEMORY_REGION), region]


def test_ioctls_on_other_descriptors_never_become_vms(session, tmp_path):
    before = session.snapshot()
    p = subprocess.run(spoof_cmd(50, 0), preexec_fn=_as_nobody, capture_output=True, text=True, timeout=60,
                       cwd="/")
    assert p.returncode == 0, p.stderr
    pid, n = map(int, p.stdout.split())
    snap = settle(session, 0)
    assert n == 50 and pid not in {v.pid for v in snap.vms}
    assert pid not in {m.pid for m in snap.memslot} and pid not in {h.pid for h in snap.hva}
    assert snap.delta(before).ignored_ioctls >= 50


def test_a_flood_of_spoofed_ioctls_costs_a_real_vm_nothing(session, tmp_path):
    before = session.snapshot()
    flood = subprocess.Popen(spoof_cmd(0, 4), preexec_fn=_as_nobody, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        truth = run_workload(tmp_path, "--slots", "16", "--scenario", "churn", "--duration", "3")
    finally:
        out, err = flood.communicate(timeout=60)
    assert flood.returncode == 0, err
    snap = settle(session, truth["pid"])
    assert memslots(snap, truth["pid"]) == {k: v for k, v in truth["memslot_updates"].items() if v}
    assert snap.delta(before).ignored_ioctls >= int(out.split()[1]) > 1000
    assert snap.delta(before).lost_events == 0


def test_short_intervals_never_show_phantom_updates(tmp_path):
    """Cumulative snapshots every 0.2 s around the churn scenario: the final figures equal the
    truth, and no interval shows an update of unknown type (an ioctl in flight at a read)."""
    out = tmp_path / "t.json"
    snaps = []
    with S.TraceSession(interval=0.2) as s:
        p = subprocess.Popen([sys.executable, "-m", "kvmtrace.workload", "--quiet", "--json-out", str(out),
                              "--slots", "16", "--scenario", "churn", "--duration", "3"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for snap in s.snapshots(duration=30, stop=lambda: p.poll() is not None):
            snaps.append(snap)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        snaps.append(settle(s, p.pid))
    truth = json.loads(out.read_text())
    pid = truth["pid"]
    assert len(snaps) >= 10
    prev = None
    for snap in snaps:
        d = snap.delta(prev)
        assert all(m.count >= 0 for m in d.memslot if m.pid == pid)
        assert not [m for m in snap.memslot if m.pid == pid and m.change == "unknown"]
        prev = snap
    # the VM ended: its final figures are in the last snapshot that holds it (the tracer
    # forgets a VM once they are read)
    final = [snap for snap in snaps if any(v.pid == pid for v in snap.vms)][-1]
    assert memslots(final, pid) == {k: v for k, v in truth["memslot_updates"].items() if v}


FORK_VMS = r"""
import os, sys
from kvmtrace.workload import kvm as K
n = int(sys.argv[1])
kvm = os.open("/dev/kvm", os.O_RDWR)
for i in range(n):
    pid = os.fork()
    if pid == 0:
        K.ioctl(kvm, K.KVM_CREATE_VM, 0)
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    assert st == 0
print(n)
"""


def test_tables_stay_bounded_after_many_short_lived_vmms(session, tmp_path):
    """1,030 processes each creating a VM and exiting (more than the kernel's table of VMM
    processes holds): the next VM still gets its latency and slot figures, nothing fills."""
    p = subprocess.run([sys.executable, "-c", FORK_VMS, "1030"], capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    session.snapshot()
    session.snapshot()  # dead VMs are retired at their second reading
    truth = run_workload(tmp_path, "--slots", "8", "--scenario", "unmap", "--pages", "100", "--iterations", "1")
    snap = settle(session, truth["pid"])
    h = hva(snap, truth["pid"])
    assert h.count == truth["hva_ops"]["unmap"] and h.lat_count == h.count and h.lat_provenance == "syscall"
    assert h.slots_sum == truth["hva_slots_visited"]["unmap"] and h.underived == 0
    assert snap.map_full == 0
    session.snapshot()
    session.snapshot()
    assert len(session.bpf["tp_vms"]) < 64  # the 1,030 dead VMs left the kernel's table
    assert len(session.bpf["vmm"]) < 64
    # and their aggregate slots are free again (the first entry of a slot holds its owner)
    t = session.bpf["tp_avals"]
    owned = [i for i in range(0, len(t), R.NR_OPS) if int(t[t.Key(i)].owner)]
    assert len(owned) < 64


SHUFFLED = r"""
import ctypes, json, os, random, sys
from kvmtrace.workload import kvm as K
n, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
K.quiet_process_memory()
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = K.ioctl(kvm, K.KVM_CREATE_VM, 0)
page = K.PAGE_SIZE
mem = K.mmap_anon(n * page)
K.memset(mem, 1, n * page)
def region(i, size):
    r = K.KvmUserspaceMemoryRegion(i, 0, i * page, size, mem + i * page)
    assert K.ioctl_raw(vm, K.KVM_SET_USER_MEMORY_REGION, ctypes.byref(r)) == 0
order = list(range(n))
rng.shuffle(order)
for i in order:  # inserts land all over the sorted arrays
    region(i, page)
gone = set(rng.sample(range(n), n // 3))
for i in sorted(gone, key=lambda _: rng.random()):
    region(i, 0)
for i in range(n):  # one page each: inside a live slot or not
    assert K.madvise_raw(mem + i * page, page, K.MADV_DONTNEED) == 0
print(json.dumps({"pid": os.getpid(), "ops": n, "visited": n - len(gone), "created": n,
                  "deleted": len(gone)}))
"""


def test_slot_tables_stay_sorted_through_inserts_and_removes_anywhere(session):
    """3,000 one-page slots created in random order, a third deleted in random order (shifts
    across many 1,024-entry chunks of the kernel's sorted arrays), then every page unmapped:
    slots visited equal the driver's own count of pages inside a live slot."""
    p = subprocess.run([sys.executable, "-c", SHUFFLED, "3000", "7"], capture_output=True, text=True,
                       timeout=300, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    t = json.loads(p.stdout)
    snap = settle(session, t["pid"])
    h = hva(snap, t["pid"])
    # the interpreter may unmap a few pages of its own (outside every slot) besides the driver's
    assert t["ops"] <= h.count <= t["ops"] + 20
    assert (h.slots_sum, h.slots_max, h.underived, h.slots_hist.counts[1]) == (t["visited"], 1, 0, t["visited"])
    assert memslots(snap, t["pid"]) == {"create": t["created"], "delete": t["deleted"]}
    vm = vm_of(snap, t["pid"])
    assert (vm.memslots, vm.memslots_max) == (t["created"] - t["deleted"], t["created"])
    assert snap.map_full == 0


def test_without_task_storage_the_lru_thread_state_gives_the_same_figures(tmp_path, monkeypatch):
    """Kernels without BTF keep per-thread syscall state in an LRU hash: same per-VM figures."""
    from kvmtrace.tracer import decode_tp

    monkeypatch.setattr(decode_tp, "tp_cflags", lambda plan: [])
    with S.TraceSession(interval=0.5) as s:
        assert "-DTP_TASK_STORAGE" not in s.cflags
        truth = run_workload(tmp_path, "--scenario", "multi-vm", "--slots", "4")
        snap = settle(s, truth["pid"])
    got = sorted((v.ordinal, h.count, h.slots_sum, h.lat_count) for v in snap.vms if v.pid == truth["pid"]
                 for h in snap.hva if h.vm_id == v.vm_id and h.op == "unmap")
    want = [(t["ordinal"], t["hva_ops"]["unmap"], t["hva_slots_visited"]["unmap"], t["hva_ops"]["unmap"])
            for t in truth["vms"]]
    assert got == want


MANY_VMS = r"""
import ctypes, json, os, sys
from kvmtrace.workload import kvm as K
K.quiet_process_memory()
kvm = os.open("/dev/kvm", os.O_RDWR)
page = K.PAGE_SIZE
mem = K.mmap_anon(page)
K.memset(mem, 1, page)
vms = []
for i in range(6):  # six VMs alive at once, each with the same one-page slot
    vm = K.ioctl(kvm, K.KVM_CREATE_VM, 0)
    r = K.KvmUserspaceMemoryRegion(0, 0, 0, page, mem)
    assert K.ioctl_raw(vm, K.KVM_SET_USER_MEMORY_REGION, ctypes.byref(r)) == 0
    vms.append(vm)
assert K.madvise_raw(mem, page, K.MADV_DONTNEED) == 0
for vm in vms:  # before the interpreter's own teardown unmaps anything
    os.close(vm)
sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
sys.stdout.flush()
os._exit(0)
"""


def test_a_vm_whose_aggregate_slot_is_taken_gets_the_same_figures_from_the_hash(session, tmp_path):
    """Every VM created while traced has its aggregates in an array slot (no hash lookup per
    event); when its slot is taken (here: all of them, by fake owners) they go to the hash,
    with the same exact figures."""
    t = session.bpf["tp_avals"]
    fake = 1 << 61
    taken = []
    try:
        for i in range(0, len(t), R.NR_OPS):
            if not int(t[t.Key(i)].owner):
                v = t.Leaf()
                v.owner = fake + i
                t[t.Key(i)] = v
                taken.append(i)
        truth = run_workload(tmp_path, "--slots", "8", "--scenario", "unmap", "--pages", "300", "--iterations", "1")
        snap = settle(session, truth["pid"])
        maps = session.read_maps()
    finally:
        for i in taken:
            t[t.Key(i)] = t.Leaf()
    (gen,) = [g for g, v in maps.tp.vms.items() if v.tgid == truth["pid"]]
    assert maps.tp.vms[gen].agg == 0  # no slot: its rows are the hash's
    h = hva(snap, truth["pid"])
    assert (h.count, h.lat_count, h.slots_sum, h.underived) == (
        truth["hva_ops"]["unmap"], truth["hva_ops"]["unmap"], truth["hva_slots_visited"]["unmap"], 0)
    (b,) = [b for b in snap.by_memslots if b.pid == truth["pid"] and b.op == "unmap"]
    assert (b.bucket, b.count, b.lat_count) == (4, h.count, h.count)


def test_one_process_cannot_take_every_slot_table(session):
    """Six live VMs in one process: the first four get slot tables (slots derived), the other
    two are counted underived and in map_full; every VM still gets its exact count."""
    before = session.snapshot()
    p = subprocess.run([sys.executable, "-c", MANY_VMS], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    pid = json.loads(p.stdout)["pid"]
    snap = settle(session, pid)
    rows = sorted(((v.ordinal, h) for v in snap.vms if v.pid == pid
                   for h in snap.hva if h.vm_id == v.vm_id and h.op == "unmap"), key=lambda x: x[0])
    assert [o for o, _ in rows] == [1, 2, 3, 4, 5, 6]
    # the one madvise fired each VM's notifier once; it lies in every VM's slot
    assert [h.count for _, h in rows] == [1] * 6
    assert [(h.slots_sum, h.underived) for _, h in rows] == [(1, 0)] * 4 + [(0, 1)] * 2
    assert snap.delta(before).map_full >= 2  # (other processes on the host may add theirs)
