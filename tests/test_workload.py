"""The built-in workload: option and size parsing, error messages (no root), then real VMs whose
ground truth is checked against the kernel with an independent bcc counter (root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmtrace import consts
from kvmtrace.errors import CapabilityMissing, KvmtraceError, PermissionProblem, UsageError
from kvmtrace.workload import SCENARIOS, Workload, default_slot_size, format_size, parse_size
from kvmtrace.workload import core as C
from kvmtrace.workload import kvm as K

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def run_cli(*args, timeout=120, **kw):
    """`python -m kvmtrace.workload ARGS` (the spawn path other code uses)."""
    return subprocess.run([sys.executable, "-m", "kvmtrace.workload", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=str(REPO), **kw)


def assert_clean_error(p, *needles, rc=None):
    assert p.returncode != 0, p.stdout
    if rc is not None:
        assert p.returncode == rc, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------------
# no root needed


@pytest.mark.parametrize("text,want", [
    ("4096", 4096), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4kb", 4096), ("64k", 65536),
    ("2M", 2 << 20), ("2MiB", 2 << 20), ("1g", 1 << 30), (" 8 k ", 8192), (8192, 8192),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "4x", "-4k", "0", "1.5M", "k"])
def test_parse_size_rejects_with_remedy(text):
    with pytest.raises(UsageError) as e:
        parse_size(text, what="--slot-size")
    assert e.value.remedy and e.value.exit_code == 2


def test_format_size():
    assert format_size(4096) == "4 KiB"
    assert format_size(2 << 20) == "2 MiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(100) == "100 B"


def test_default_slot_size_shrinks_for_many_slots():
    assert default_slot_size(1) == 2 << 20
    assert default_slot_size(64) == 2 << 20
    assert default_slot_size(1000) == 128 << 10
    assert default_slot_size(32000) == 4096  # 32000 x 4 KiB = 125 MiB
    assert default_slot_size(32764) == 4096


def test_ground_truth_keys_are_the_tracers_labels():
    assert C.UNMAP == consts.Op.UNMAP.label == "unmap"
    wl = Workload(slots=4, scenario="churn")
    assert set(wl.updates) == {c.label for c in consts.Change}
    assert K.KVM_SET_USER_MEMORY_REGION == consts.KVM_SET_USER_MEMORY_REGION


@pytest.mark.parametrize("kw,needle", [
    (dict(slots=0), "--slots"),
    (dict(slot_size=3000), "page size"),
    (dict(iterations=2, duration=1.0), "exclusive"),
    (dict(iterations=0), "--iterations"),
    (dict(duration=-1.0), "--duration"),
    (dict(pages=0), "--pages"),
    (dict(scenario="bogus"), "unknown scenario"),
])
def test_bad_arguments_are_usage_errors(kw, needle):
    with pytest.raises(UsageError) as e:
        Workload(**kw)
    assert needle in e.value.message and e.value.remedy


def test_defaults():
    wl = Workload()
    assert (wl.nslots, wl.scenario, wl.iterations, wl.slot_size) == (64, "mixed", 3, 2 << 20)
    assert wl.pages == C.MIXED_PAGES
    assert Workload(scenario="unmap").pages == 64 * 512  # every page of slot memory
    assert Workload(duration=2.0).iterations is None


def test_range_accounting_outside_spanning_and_adjacent():
    """The slots-visited rule: slots whose [hva, hva+size) overlaps [start, end)."""
    wl = Workload(slots=4, slot_size=8192, scenario="unmap")
    base = 0x10000000
    wl._mem = base
    for i in range(4):
        wl.slot_table[i] = C.Slot(i, base + i * 8192, 8192, i * 8192)
    P = 4096
    plan = wl._account([
        (base, P),                    # first page of slot 0: 1
        (base + 8192 - P, 2 * P),     # last page of slot 0 + first of slot 1: 2
        (base + 4096, 3 * 8192),      # inside slot 0 .. inside slot 3: 4
        (base + 4 * 8192, P),         # just after the last slot: outside
        (base - P, P),                # just before the first slot: outside
        (base - P, 2 * P),            # touches slot 0: 1
    ])
    assert (plan.ops, plan.visited, plan.outside) == (6, 1 + 2 + 4 + 0 + 0 + 1, 2)


def test_pages_beyond_slot_memory_do_not_list_every_page():
    """issue 13 #7: --pages 10**12 built one list entry per page and ran the host out of memory.
    The plan now lists one pass over the slot memory and multiplies; the figures stay exact."""
    wl = Workload(slots=4, slot_size=8192, scenario="unmap", pages=10**9 + 3)
    wl._mem = base = 0x10000000
    for i in range(4):
        wl.slot_table[i] = C.Slot(i, base + i * 8192, 8192, i * 8192)
    wl._plan()
    plan = wl._plans["unmap"]
    assert len(plan.ranges) == 8  # one pass: 4 slots x 2 pages
    assert (plan.ops, plan.visited, plan.outside) == (10**9 + 3, 10**9 + 3, 0)
    assert (plan.repeat, plan.tail) == (125_000_000, 3)
    small = Workload(slots=4, slot_size=8192, scenario="unmap", pages=11)
    small._mem = base
    small.slot_table = dict(wl.slot_table)
    small._plan()
    seq = [r for ranges in small._plans["unmap"].passes() for r in ranges]
    assert seq == [(base + (i % 8) * 4096, 4096) for i in range(11)]  # the old per-page order
    with pytest.raises(UsageError, match="--pages"):
        Workload(pages=C.MAX_PAGES + 1)
    assert_clean_error(run_cli("--pages", "1000000000000"), "--pages", rc=2)


def test_non_finite_numbers_are_usage_errors():
    """issue 13 #6: --duration nan never returned (NaN passes every comparison)."""
    for v in ("nan", "inf", "-inf", "-1", "0"):
        assert_clean_error(run_cli("--duration", v), "--duration", rc=2)
    with pytest.raises(UsageError, match="--duration"):
        Workload(duration=float("nan"))


def test_json_out_is_not_overwritten_without_force(tmp_path):
    """issue 13 #11: outputs never replace a file without --force (checked before any VM)."""
    taken = tmp_path / "truth.json"
    taken.write_text("keep")
    assert_clean_error(run_cli("--json-out", str(taken)), "already exists", "--force", rc=2)
    assert taken.read_text() == "keep"
    assert_clean_error(run_cli("--json-out", str(tmp_path / "no" / "truth.json")), "no such directory", rc=2)
    assert not (tmp_path / "no").exists()


def test_no_dev_kvm_is_capability_missing():
    wl = Workload(slots=1, kvm_path="/nonexistent/kvm", handle_signals=False)
    with pytest.raises(CapabilityMissing) as e:
        with wl:
            pass
    assert "does not exist" in e.value.message and "modprobe" in e.value.remedy


def test_eacces_is_permission_problem(monkeypatch):
    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(C.os, "open", deny)
    with pytest.raises(PermissionProblem) as e:
        Workload(slots=1, handle_signals=False).setup()
    assert "permission denied" in e.value.message and "kvm" in e.value.remedy


def test_mmap_failure_and_too_much_memory_have_remedies(monkeypatch):
    wl = Workload(slots=2, slot_size=1 << 40, handle_signals=False)  # 2 TiB
    with pytest.raises(KvmtraceError) as e:
        wl._map_memory()
    assert "memory" in e.value.message and "--slot-size" in e.value.remedy

    def enomem(size, noreserve=False):
        raise K.OsCallError("mmap", 12)

    monkeypatch.setattr(K, "mmap_anon", enomem)
    wl = Workload(slots=2, slot_size=4096, handle_signals=False)
    with pytest.raises(KvmtraceError) as e:
        wl._map_memory()
    assert "Cannot allocate memory" in e.value.message and e.value.remedy


def test_help_has_examples_and_scenarios():
    from kvmtrace.cli import cli

    r = CliRunner().invoke(cli, ["workload", "--help"])
    assert r.exit_code == 0, r.output
    for s in SCENARIOS:
        assert s in r.output
    for opt in ("--slots", "--scenario", "--iterations", "--duration", "--slot-size", "--json-out",
                "--quiet", "--wait-start", "Examples:", "READY"):
        assert opt in r.output


def test_cli_usage_errors_have_no_traceback():
    assert_clean_error(run_cli("--slot-size", "3k"), "kvmtrace:", "page size", "fix:", rc=2)
    assert_clean_error(run_cli("--slot-size", "lots"), "--slot-size", rc=2)
    assert_clean_error(run_cli("--iterations", "2", "--duration", "1"), "exclusive", rc=2)
    assert_clean_error(run_cli("--scenario", "bogus"), "bogus", rc=2)
    assert_clean_error(run_cli("--duration", "0"), "--duration", rc=2)
    # checked before any VM exists
    assert_clean_error(run_cli("--json-out", "/nonexistent-dir/truth.json"), "--json-out", "fix:", rc=2)


# ------------------------------------------------------------------------------------------------
# real VMs (root, /dev/kvm; the kernel checks also need bcc and the kvm tracepoints)


def _kvm_why_not() -> str:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    return ""


KVM_WHY = _kvm_why_not()
needs_kvm = pytest.mark.skipif(bool(KVM_WHY), reason=f"needs root and /dev/kvm: {KVM_WHY}")

COUNTER_C = r"""
struct key_t { u32 tgid; u32 what; };
struct ev_t { u32 tgid; u32 pad; u64 start; u64 end; };
BPF_HASH(counts, struct key_t, u64, 4096);
BPF_PERF_OUTPUT(unmaps);
static inline void bump(u32 what) {
    struct key_t k = {};
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    k.what = what;
    counts.increment(k);
}
TRACEPOINT_PROBE(kvm, kvm_unmap_hva_range) {
    struct ev_t e = {};
    bump(0);
    e.tgid = bpf_get_current_pid_tgid() >> 32;
    e.start = args->start;
    e.end = args->end;
    unmaps.perf_submit(args, &e, sizeof(e));
    return 0;
}
TRACEPOINT_PROBE(kvm, kvm_age_hva) { bump(1); return 0; }
TRACEPOINT_PROBE(kvm, kvm_test_age_hva) { bump(2); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl) {
    if (args->cmd == SET_REGION) bump(3);
    return 0;
}
"""
WHAT = ("unmap", "age", "test_age", "set_region")


class Counter:
    """An independent kernel-side count, per process, of KVM's hva tracepoints and of
    KVM_SET_USER_MEMORY_REGION ioctls; raw unmap ranges go through a perf buffer."""

    def __init__(self):
        from bcc import BPF

        self.bpf = BPF(text=COUNTER_C, cflags=[f"-DSET_REGION={consts.KVM_SET_USER_MEMORY_REGION}"])
        self.ranges = []
        self.lost = 0

        def on_event(cpu, data, size):
            e = self.bpf["unmaps"].event(data)
            self.ranges.append((e.tgid, e.start, e.end))

        def on_lost(n):
            self.lost += n

        self.bpf["unmaps"].open_perf_buffer(on_event, page_cnt=4096, lost_cb=on_lost)

    def poll(self):
        self.bpf.perf_buffer_poll(timeout=10)

    def counts(self, pid) -> dict:
        self.poll()
        out = {w: 0 for w in WHAT}
        for k, v in self.bpf["counts"].items():
            if k.tgid == pid:
                out[WHAT[k.what]] = v.value
        return out

    def unmap_ranges(self, pid):
        for _ in range(20):
            self.poll()
        return [(s, e) for t, s, e in self.ranges if t == pid]


@pytest.fixture(scope="module")
def counter():
    if KVM_WHY:
        pytest.skip(f"needs root and /dev/kvm: {KVM_WHY}")
    if not os.path.isdir("/sys/kernel/tracing/events/kvm") and not os.path.isdir("/sys/kernel/debug/tracing/events/kvm"):
        pytest.skip("kvm tracepoints not visible (is tracefs mounted? mount -t tracefs tracefs /sys/kernel/tracing)")
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        pytest.skip(f"bcc not importable: {e}")
    try:
        c = Counter()
    except Exception as e:  # compile or load failure: BPF unavailable here
        pytest.skip(f"cannot load the BPF counter: {e}")
    return c


def drive(counter, tmp_path, *args, name="truth.json"):
    """Spawn the workload with the start handshake, let it run, return (truth, counts, stdout).
    Checks on the way that no memslot existed yet when READY was printed."""
    out = tmp_path / name
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.workload", "--wait-start", "--json-out", str(out), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=str(REPO))
    line = p.stdout.readline().split()
    assert line and line[0] == "READY" and int(line[1]) == p.pid, (line, p.stderr.read() if p.poll() is not None else "")
    assert counter.counts(p.pid)["set_region"] == 0  # READY comes before any memslot
    p.stdin.write("go\n")
    p.stdin.flush()
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert stdout.rstrip().splitlines()[-1] == "DONE"
    truth = json.loads(out.read_text())
    assert truth["pid"] == p.pid and truth["tids"] == [p.pid]
    time.sleep(0.1)
    return truth, counter.counts(p.pid), stdout


def overlaps(slots, a, b):
    return sum(1 for s in slots if s["hva"] < b and a < s["hva"] + s["size"])


@needs_kvm
def test_unmap_64_slots_5000_pages_exact(counter, tmp_path):
    truth, got, stdout = drive(counter, tmp_path, "--slots", "64", "--scenario", "unmap", "--pages", "5000",
                               "--iterations", "1")
    extra = truth["hva_ops_by_part"].get("vcpu-teardown", 0)  # munmap of the vCPU's kvm_run area
    assert truth["hva_ops"]["unmap"] == 5000 + extra
    assert got["unmap"] == truth["hva_ops"]["unmap"]
    assert got["age"] == got["test_age"] == 0
    assert truth["hva_slots_visited"]["unmap"] == 5000
    assert truth["hva_ops_outside_slots"]["unmap"] == extra
    assert truth["memslot_updates"] == {"create": 64, "delete": 0, "move": 0, "flags_only": 0}
    assert got["set_region"] == 64
    assert len(truth["slot_ranges"]) == 64 and truth["slots"] == 64
    assert truth["slot_setup_s"] > 0 and truth["iter_best_s"] <= truth["iter_avg_s"]
    assert truth["vcpu"]  # "ran" or the reason it could not
    assert "Memslot setup took" in stdout and f"unmap {5000 + extra} " in stdout


@needs_kvm
def test_pages_wrapping_the_slot_memory_exact(counter, tmp_path):
    """--pages above the slot memory's page count wraps around it; every unmap still counted."""
    truth, got, _ = drive(counter, tmp_path, "--slots", "4", "--slot-size", "4k", "--scenario", "unmap",
                          "--pages", "10", "--iterations", "1", "--no-vcpu")
    extra = truth["hva_ops_by_part"].get("vcpu-teardown", 0)
    assert truth["hva_ops"]["unmap"] == 10 + extra == got["unmap"]
    assert truth["hva_slots_visited"]["unmap"] == 10


@needs_kvm
def test_mixed_counts_slots_visited_and_outside_ranges_exact(counter, tmp_path):
    truth, got, _ = drive(counter, tmp_path, "--slots", "48", "--scenario", "mixed", "--iterations", "2")
    assert got["unmap"] == truth["hva_ops"]["unmap"] > 0
    # recompute slots visited and outside ops from the kernel's own ranges
    ranges = counter.unmap_ranges(truth["pid"])
    assert counter.lost == 0 and len(ranges) == got["unmap"]
    slots = truth["slot_ranges"]
    visited = [overlaps(slots, a, b) for a, b in ranges]
    assert sum(visited) == truth["hva_slots_visited"]["unmap"]
    assert visited.count(0) == truth["hva_ops_outside_slots"]["unmap"] > 2
    assert max(visited) == 3  # ranges spanning three adjacent slots
    u = truth["memslot_updates"]
    assert got["set_region"] == sum(u.values())
    assert u["create"] == 48 + 2 and u["delete"] == 2 and u["flags_only"] == 4 and u["move"] == 2 * 2 + 2 * 2
    assert truth["hva_ops"]["age"] is None and truth["hva_ops_exact"] == {"unmap": True, "age": False, "test_age": False}


@needs_kvm
@pytest.mark.parametrize("scenario", ["unmap-chunked", "map", "move-active", "move-inactive", "churn"])
def test_other_scenarios_exact(counter, tmp_path, scenario):
    truth, got, _ = drive(counter, tmp_path, "--slots", "16", "--scenario", scenario, "--iterations", "2")
    assert got["unmap"] == truth["hva_ops"]["unmap"]
    assert got["set_region"] == sum(truth["memslot_updates"].values())
    ranges = counter.unmap_ranges(truth["pid"])
    assert sum(overlaps(truth["slot_ranges"], a, b) for a, b in ranges) == truth["hva_slots_visited"]["unmap"]


@needs_kvm
def test_age_is_reported_honestly(counter, tmp_path, record_property):
    truth, got, _ = drive(counter, tmp_path, "--slots", "16", "--scenario", "age", "--iterations", "2")
    # what the kernel did for MADV_COLD + MADV_PAGEOUT in the workload's own context
    record_property("age_events", got["age"])
    record_property("test_age_events", got["test_age"])
    print(f"age scenario: kernel fired age={got['age']} test_age={got['test_age']} unmap={got['unmap']} "
          f"for {truth['age_requests']}")
    assert truth["hva_ops"]["age"] is None and truth["hva_ops_exact"]["age"] is False
    assert truth["age_requests"]["madv_cold_pages"] == 2 * 16 * 512
    if truth["hva_ops_exact"]["unmap"]:
        assert got["unmap"] == truth["hva_ops"]["unmap"]


@needs_kvm
def test_slots_above_cap_fail_cleanly():
    p = run_cli("--slots", "40000", "--scenario", "unmap", "--iterations", "1")
    assert_clean_error(p, "kvmtrace:", "KVM_CAP_NR_MEMSLOTS", "fix:", rc=2)
    assert "DONE" not in p.stdout


@needs_kvm
def test_churn_needs_a_free_slot_id():
    cap = Workload(slots=1)
    with cap:  # learn the limit from the kernel
        limit = cap.cap
    if limit is None:
        pytest.skip("kernel does not report KVM_CAP_NR_MEMSLOTS")
    p = run_cli("--slots", str(limit), "--scenario", "churn", "--slot-size", "4k", "--iterations", "1")
    assert_clean_error(p, "free memslot", f"--slots {limit - 1}", rc=2)


@needs_kvm
def test_non_root_gets_permission_problem():
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    try:
        p = run_cli("--slots", "1", "--iterations", "1", user=65534, group=65534)
    except PermissionError as e:  # the interpreter itself is out of nobody's reach
        pytest.skip(f"user nobody cannot execute {sys.executable} (a parent directory is not "
                    f"world-searchable): {e}")
    if "Permission denied" in p.stderr and "kvmtrace:" not in p.stderr:
        pytest.skip(f"nobody cannot run python from this tree: {p.stderr[-200:]}")
    assert_clean_error(p, "permission denied", "fix:", rc=2)


def _vm_fds(pid):
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("anon_inode:kvm-vm") or link == "/dev/kvm":
                out.append(link)
    except FileNotFoundError:
        pass
    return out


@needs_kvm
@pytest.mark.parametrize("sig,rc,word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_mid_run_releases_the_vm(sig, rc, word):
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.workload", "--wait-start", "-q", "--slots", "64",
                          "--scenario", "unmap", "--duration", "60"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=str(REPO))
    try:
        assert p.stdout.readline().startswith("READY")
        assert any("kvm-vm" in f for f in _vm_fds(p.pid))
        p.stdin.write("\n")
        p.stdin.flush()
        time.sleep(0.5)
        assert p.poll() is None, "workload ended before the signal"
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == rc, stderr
    assert word in stderr and "Traceback" not in stderr
    assert "DONE" not in stdout
    assert not os.path.exists(f"/proc/{p.pid}")


@needs_kvm
def test_in_process_failure_after_vm_creation_releases_everything():
    def boom(pid):
        raise RuntimeError("tracer failed to attach")

    before = signal.getsignal(signal.SIGTERM)
    wl = Workload(slots=8, scenario="unmap", iterations=1, on_ready=boom)
    with pytest.raises(RuntimeError):
        with wl:
            pass
    assert (wl._vm_fd, wl._kvm_fd, wl._vcpu_fd, wl._mem) == (-1, -1, -1, 0)
    assert _vm_fds(os.getpid()) == []
    assert signal.getsignal(signal.SIGTERM) is before


@needs_kvm
def test_in_process_api(tmp_path):
    with Workload(slots=8, slot_size=64 << 10, scenario="unmap", iterations=2, vcpu=False) as wl:
        wl.run()
    gt = wl.ground_truth()
    assert gt["hva_ops"]["unmap"] == 2 * 8 * 16 and gt["vcpu"].startswith("not tried")
    assert gt["iterations"] == 2 and gt["completed"] is True
    wl.write_ground_truth(str(tmp_path / "gt.json"))
    assert json.loads((tmp_path / "gt.json").read_text())["slots"] == 8
