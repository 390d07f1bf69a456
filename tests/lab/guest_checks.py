#!/usr/bin/env python3
"""Lab checks, run INSIDE a kernel-lab guest as root (lab/run.sh SUITE -- python3 tests/lab/guest_checks.py).

Each check is one function that returns (status, reason, details) with status "pass", "fail" or
"skip"; a check that raises is reported as "fail" with the exception, so a half-built feature shows
up as its own failing check instead of crashing the tier. Every result is printed as one line

    KVMTRACE-LAB-CHECK {"check": NAME, "status": ..., "reason": ..., "details": {...}, "seconds": ...}

and appended to $KVMTRACE_LAB_RESULTS/checks.jsonl. tests/lab/test_lab.py (on the host) turns each
line into its own pytest assertion. Python 3.9 compatible (Debian 11), no third-party imports at
module level (the host imports CHECKS from here).

Expectations come from the project's issues (kernel lab, tracer, workload, report):
  - doctor --json: plan attach = fentry on 6.12, kprobe on 5.10 and 6.1, for hva ops and memslot
    updates, with latency and slots provenance "exact"; kprobe on 6.12 when fentry is switched off;
  - unmap count per VM (record + report --json) = the workload's ground truth, in every mode;
  - slots visited per page-sized unmap = 1 (the overlap count); slots scanned = memslot count on
    5.10 (linear scan), not growing with the memslot count on 6.1 / 6.12;
  - memslot updates by change type = ground truth, with latency;
  - no kprobe events or BPF programs left after kvmtrace exits, also after SIGKILL.

Options (environment): KVMTRACE_LAB_ONLY=name,name (run only these), KVMTRACE_LAB_WRONG=1 (enable
the deliberately wrong check `harness_wrong_expectation`, to prove the harness can fail).
"""

import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

MARK = "KVMTRACE-LAB-CHECK "
KVMTRACE = [sys.executable, "-m", "kvmtrace.cli"]
TRACEFS = "/sys/kernel/tracing"
RESULTS = os.environ.get("KVMTRACE_LAB_RESULTS") or ""  # set in main()
MODES = ("fentry", "kprobe", "tracepoint")
SLOTS_SMALL, SLOTS_LARGE = 8, 64

# The host-side test parametrises over this list (kept static so pytest can collect it).
CHECKS = [
    "env_kvm",
    "baseline_kprobe_counts",
    "baseline_fentry_counts",
    "doctor_json",
    "doctor_plan_default",
    "doctor_plan_without_fentry",
    "doctor_explains_fallback",
    "workload_ground_truth",
] + [
    "%s_%s" % (what, mode)
    for mode in MODES
    for what in ("record_unmap_count", "record_slots_visited", "record_slots_scanned",
                 "record_memslot_updates", "cleanup_after_exit")
] + [
    "cleanup_after_sigkill",
    "exact_vm_lifetimes",
    "exact_memslot_buckets",
    "exact_multi_vm",
    "exact_report_by_memslots",
    "exact_self_cost",
    "exact_top_self_cost",
    "harness_wrong_expectation",
]


class Skip(Exception):
    pass


class Fail(Exception):
    def __init__(self, message, details=None):
        Exception.__init__(self, message)
        self.details = details or {}


# --------------------------------------------------------------------------------------------
# helpers


def kernel_version():
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2)))


KVER = kernel_version()
LINEAR_SCAN = KVER < (5, 17)
EXPECTED_DEFAULT_MODE = "fentry" if KVER >= (6, 12) else "kprobe"


def run(cmd, timeout=600, check=False, **kw):
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=timeout, **kw)
    p.seconds = round(time.time() - t, 1)
    if check and p.returncode != 0:
        raise Fail("%s exited %d: %s" % (" ".join(cmd), p.returncode, tail(p.stderr or p.stdout)))
    return p


def tail(text, n=8):
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-1200:]


_help_cache = {}


def kvmtrace_help(sub):
    """`kvmtrace SUB --help` text; Fail (not built yet) when the command does not exist."""
    if sub not in _help_cache:
        p = run(KVMTRACE + [sub, "--help"], timeout=300)
        _help_cache[sub] = p
    p = _help_cache[sub]
    if p.returncode != 0:
        raise Fail("`kvmtrace %s` is not available yet (exit %d: %s)" % (sub, p.returncode, tail(p.stderr or p.stdout, 3)))
    return p.stdout


def mode_args(sub, modes):
    """CLI arguments restricting `kvmtrace SUB` to attach `modes`, or None if it has no such option."""
    h = kvmtrace_help(sub)
    if "--modes" in h:
        return ["--modes", ",".join(modes)]
    if "--mode" in h and len(modes) == 1:
        return ["--mode", modes[0]]
    if modes == ("kprobe", "tracepoint") and "--no-fentry" in h:
        return ["--no-fentry"]
    return None


def kprobe_events():
    try:
        with open(os.path.join(TRACEFS, "kprobe_events")) as f:
            return [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return []


def bpf_prog_ids():
    """Set of loaded BPF programs: (id, name, type) from bpftool, else ids from the bpf(2)
    syscall (BPF_PROG_GET_NEXT_ID; Debian 11's mirror may lack bpftool), None if neither works."""
    if shutil.which("bpftool"):
        p = run(["bpftool", "-j", "prog", "show"], timeout=60)
        if p.returncode == 0:
            try:
                return {(x["id"], x.get("name", ""), x.get("type", "")) for x in json.loads(p.stdout or "[]")}
            except ValueError:
                pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint32 * 4)()
        ids, start = set(), 0
        while True:
            attr[0], attr[1] = start, 0
            if libc.syscall(321, 11, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:  # bpf(BPF_PROG_GET_NEXT_ID)
                if ctypes.get_errno() == 2:  # ENOENT: end of the list
                    return {(i, "", "") for i in ids}
                return None
            start = attr[1]
            ids.add(start)
    except Exception:
        return None


def kallsyms_has(name):
    with open("/proc/kallsyms") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) >= 3 and parts[2] == name:
                return True
    return False


def unmap_handler():
    return "kvm_unmap_gfn_range" if kallsyms_has("kvm_unmap_gfn_range") else "kvm_unmap_hva_range"


# --------------------------------------------------------------------------------------------
# a tiny independent VM (ctypes, no kvmtrace code): the baseline for raw kprobe/fentry counts

KVM_CREATE_VM = 0xAE01
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15


class MiniVm:
    """A VM with `nslots` memslots of `slot_size` bytes of anonymous memory (no vCPU)."""

    def __init__(self, nslots=8, slot_size=1 << 20):
        import ctypes
        import fcntl

        self.ctypes, self.fcntl = ctypes, fcntl
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.kvm = os.open("/dev/kvm", os.O_RDWR)
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.slot_size, self.nslots = slot_size, nslots
        self.mem = mmap.mmap(-1, nslots * slot_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self._madvise(self.base, nslots * slot_size, MADV_NOHUGEPAGE)
        for i in range(nslots):
            self.set_slot(i, slot_size)
        for off in range(0, nslots * slot_size, mmap.PAGESIZE):
            self.mem[off] = 1

    def _madvise(self, addr, size, advice):
        if self.libc.madvise(self.ctypes.c_void_p(addr), size, advice) != 0:
            raise OSError(self.ctypes.get_errno(), "madvise")

    def set_slot(self, i, size):
        import struct

        buf = bytearray(struct.pack("IIQQQ", i, 0, i * self.slot_size, size, self.base + i * self.slot_size))
        self.fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, buf)

    def unmap_page(self, slot, page=0):
        self._madvise(self.base + slot * self.slot_size + page * mmap.PAGESIZE, mmap.PAGESIZE, MADV_DONTNEED)

    def close(self):
        os.close(self.vm)
        os.close(self.kvm)
        del self.base
        try:
            self.mem.close()
        except BufferError:
            pass


def _baseline(prog_kind):
    from bcc import BPF

    handler = unmap_handler()
    names = ["kvm_mmu_notifier_invalidate_range_start", handler, "kvm_set_memslot"]
    pid = os.getpid()
    body = "BPF_ARRAY(counts, u64, 3);\n" \
           "static __always_inline int inc(int i) {\n" \
           "  if ((bpf_get_current_pid_tgid() >> 32) != %d) return 0;\n" \
           "  u64 *v = counts.lookup(&i); if (v) __sync_fetch_and_add(v, 1); return 0; }\n" % pid
    if prog_kind == "kprobe":
        body += "".join("int on_%d(void *ctx) { return inc(%d); }\n" % (i, i) for i in range(3))
        b = BPF(text=body)
        for i, fn in enumerate(names):
            b.attach_kprobe(event=fn, fn_name="on_%d" % i)
    else:
        if not BPF.support_kfunc():
            raise Skip("bcc says fentry is unsupported here (BPF.support_kfunc() is False)")
        body += "".join("MODULE_KFUNC_PROBE(kvm, %s) { inc(%d); return 0; }\n" % (fn, i) for i, fn in enumerate(names))
        try:
            b = BPF(text=body)
        except Exception as e:  # bcc 0.26 on 6.1: "No such file or directory" (vmlinux BTF only)
            raise Skip("fentry on the kvm module does not load with this bcc: %s" % (str(e).strip()[:300],))
    vm = MiniVm(nslots=8)
    before = [b["counts"][b["counts"].Key(i)].value for i in range(3)]
    for s in range(4):
        vm.unmap_page(s)
    mid = [b["counts"][b["counts"].Key(i)].value for i in range(3)]
    vm.set_slot(7, 0)  # delete one slot
    after = [b["counts"][b["counts"].Key(i)].value for i in range(3)]
    vm.close()
    b.cleanup()
    got = {"invalidate": mid[0] - before[0], "unmap_handler": mid[1] - before[1], "set_memslot_on_delete": after[2] - mid[2],
           "set_memslot_total": after[2], "handler": handler}
    return got


def _expect_baseline(got, wrong=0):
    det = dict(got)
    want = 4 + wrong
    if got["invalidate"] != want or got["unmap_handler"] != want:
        raise Fail("4 single-page MADV_DONTNEED in 4 slots: expected %d invalidations and %d %s calls, counted %d and %d"
                   % (want, want, got["handler"], got["invalidate"], got["unmap_handler"]))
    if got["set_memslot_on_delete"] < 1:
        raise Fail("deleting a memslot fired kvm_set_memslot %d times" % got["set_memslot_on_delete"])
    return "pass", "exact: %d invalidations, %d %s, %d kvm_set_memslot (delete)" % (
        got["invalidate"], got["unmap_handler"], got["handler"], got["set_memslot_on_delete"]), det


# --------------------------------------------------------------------------------------------
# checks


def check_env_kvm():
    facts = {"kernel": os.uname().release, "kvm_dev": os.path.exists("/dev/kvm"),
             "module_btf_kvm": os.path.exists("/sys/kernel/btf/kvm"), "vmlinux_btf": os.path.exists("/sys/kernel/btf/vmlinux"),
             "python": sys.version.split()[0], "bpftool": bool(shutil.which("bpftool"))}
    for fn in ("kvm_mmu_notifier_invalidate_range_start", "kvm_unmap_gfn_range", "kvm_unmap_hva_range",
               "kvm_set_memslot", "__kvm_set_memory_region", "kvm_set_memory_region"):
        facts["sym_" + fn] = kallsyms_has(fn)
    try:
        import bcc
        from bcc import BPF

        facts["bcc"] = getattr(bcc, "__version__", "?")
        facts["support_kfunc"] = bool(BPF.support_kfunc())
    except Exception as e:
        facts["bcc"] = "import failed: %s" % e
    if not facts["kvm_dev"]:
        raise Fail("/dev/kvm missing after modprobe kvm_amd (see the serial log)")
    return "pass", "kernel %s, bcc %s, support_kfunc=%s, /sys/kernel/btf/kvm %s" % (
        facts["kernel"], facts.get("bcc"), facts.get("support_kfunc"), "present" if facts["module_btf_kvm"] else "absent"), facts


def check_baseline_kprobe_counts():
    return _expect_baseline(_baseline("kprobe"))


def check_baseline_fentry_counts():
    return _expect_baseline(_baseline("fentry"))


def check_harness_wrong_expectation():
    if os.environ.get("KVMTRACE_LAB_WRONG") != "1":
        raise Skip("deliberately wrong expectation; enabled only by KVMTRACE_LAB_WRONG=1")
    return _expect_baseline(_baseline("kprobe"), wrong=1)


_doctor = {}


def doctor(extra=()):
    key = tuple(extra)
    if key not in _doctor:
        kvmtrace_help("doctor")
        p = run(KVMTRACE + ["doctor", "--json"] + list(extra), timeout=600)
        try:
            data = json.loads(p.stdout)
        except ValueError:
            raise Fail("`kvmtrace doctor --json %s` (exit %d) printed no JSON: %s" % (" ".join(extra), p.returncode, tail(p.stderr or p.stdout)))
        _doctor[key] = data
    return _doctor[key]


def check_doctor_json():
    d = doctor()
    missing = [k for k in ("kernel", "bcc", "btf", "kvm", "vms", "plan", "problems") if k not in d]
    if missing:
        raise Fail("doctor --json lacks keys %s (has %s)" % (missing, sorted(d)))
    if not isinstance(d["plan"], list) or not all(isinstance(e, dict) for e in d["plan"]):
        raise Fail("doctor --json: plan is not a list of objects: %r" % (d["plan"],))
    bad = [e for e in d["plan"] if not all(k in e for k in ("op", "target", "attach", "latency", "slots"))]
    if bad:
        raise Fail("plan entries without op/target/attach/latency/slots: %s" % json.dumps(bad)[:600])
    return "pass", "keys present; plan ops %s" % [e["op"] for e in d["plan"]], {"doctor": d}


def _check_plan(d, want_mode, label):
    plan = {e.get("op"): e for e in d.get("plan", [])}
    errs = []
    for op in ("unmap", "memslot_update"):
        if op not in plan:
            errs.append("no plan entry for %s" % op)
    for op, e in sorted(plan.items()):
        if e.get("attach") in (None, "none") and op in ("age", "test_age", "change_pte"):
            continue  # e.g. change_pte is gone on 6.12; may be untraceable
        if e.get("attach") != want_mode:
            errs.append("%s: attach %s, expected %s (target %s)" % (op, e.get("attach"), want_mode, e.get("target")))
        if e.get("latency") != "exact":
            errs.append("%s: latency %s, expected exact" % (op, e.get("latency")))
        # exact change type everywhere: on a kvm module without BTF (5.10) kvm_set_memslot's
        # `change` position comes from the kernel version (argument 5 on 5.7-5.12)
        want_slots = "exact"
        if e.get("slots") != want_slots:
            errs.append("%s: slots %s, expected %s" % (op, e.get("slots"), want_slots))
    if LINEAR_SCAN and "unmap" in plan and plan["unmap"].get("scanned", "exact") in ("none", None):
        errs.append("unmap: slots scanned provenance %r on a linear-scan kernel (expected exact)" % plan["unmap"].get("scanned"))
    summary = {op: "%s %s lat=%s slots=%s scanned=%s" % (e.get("attach"), e.get("target"), e.get("latency"), e.get("slots"), e.get("scanned"))
               for op, e in plan.items()}
    if errs:
        raise Fail("%s on %d.%d: %s" % (label, KVER[0], KVER[1], "; ".join(errs)), {"plan": summary, "problems": d.get("problems")})
    return "pass", "%s: %s for all traceable ops, exact latency and slots" % (label, want_mode), {"plan": summary, "problems": d.get("problems")}


def check_doctor_plan_default():
    return _check_plan(doctor(), EXPECTED_DEFAULT_MODE, "default plan")


def check_doctor_plan_without_fentry():
    args = mode_args("doctor", ("kprobe", "tracepoint"))
    if args is None:
        raise Fail("`kvmtrace doctor` has no option to switch fentry off (looked for --modes, --mode, --no-fentry)")
    return _check_plan(doctor(args), "kprobe", "plan with %s" % " ".join(args))


def check_doctor_explains_fallback():
    """Where fentry is not chosen, doctor must say why (skipped alternative with a reason)."""
    if EXPECTED_DEFAULT_MODE == "fentry":
        raise Skip("fentry is the plan here; nothing to explain")
    d = doctor()
    why, errs = {}, []
    for e in d.get("plan", []):
        if e.get("op") not in ("unmap", "memslot_update"):
            continue
        reasons = [sk.get("reason", "") for sk in e.get("skipped", []) or [] if str(sk.get("alternative", "")).startswith("fentry")]
        reasons = [r for r in reasons if r.strip()]
        if reasons:
            why[e["op"]] = reasons[0]
        else:
            errs.append("%s: no skipped fentry alternative with a reason" % e.get("op"))
    problems = [p for p in d.get("problems", []) if "fentry" in json.dumps(p)]
    if errs:
        raise Fail("doctor --json on %d.%d does not explain the kprobe fallback: %s" % (KVER + ("; ".join(errs),)))
    return "pass", "doctor explains: %s" % why.get("unmap", "")[:200], {"why": why, "problems": problems}


# --- workload + record + report ---------------------------------------------------------------

_gt = {}


def workload(slots, scenario, iterations=1, tag=None):
    """Run `kvmtrace workload`; return its ground truth (dict) and the process's output."""
    h = kvmtrace_help("workload")
    out = os.path.join(RESULTS, "gt-%s-%s-%d.json" % (tag or "w", scenario, slots))
    cmd = KVMTRACE + ["workload", "--slots", str(slots), "--scenario", scenario, "--iterations", str(iterations), "--json-out", out]
    if "--slot-size" in h:
        cmd += ["--slot-size", os.environ.get("KVMTRACE_LAB_SLOT_SIZE", "256K")]
    p = run(cmd, timeout=900)
    if p.returncode != 0:
        raise Fail("%s exited %d: %s" % (" ".join(cmd[2:]), p.returncode, tail(p.stderr or p.stdout)))
    try:
        with open(out) as f:
            gt = json.load(f)
    except (OSError, ValueError) as e:
        raise Fail("workload wrote no ground-truth JSON at %s: %s" % (out, e))
    gt["_seconds"] = p.seconds
    return gt


def check_workload_ground_truth():
    gt = workload(SLOTS_SMALL, "unmap", tag="plain")
    _gt["plain"] = gt
    missing = [k for k in ("pid", "tids", "slots", "hva_ops", "hva_ops_outside_slots", "memslot_updates", "slot_ranges") if k not in gt]
    if missing:
        raise Fail("ground truth lacks %s (has %s)" % (missing, sorted(gt)))
    if not gt["hva_ops"].get("unmap"):
        raise Fail("unmap scenario reports no unmap operations: %r" % gt["hva_ops"])
    if len(gt["slot_ranges"]) != SLOTS_SMALL:
        raise Fail("slot_ranges has %d entries for --slots %d" % (len(gt["slot_ranges"]), SLOTS_SMALL))
    return "pass", "unmap x%d, memslot_updates %s, %.1fs" % (gt["hva_ops"]["unmap"], gt["memslot_updates"], gt["_seconds"]), \
        {k: gt[k] for k in ("slots", "hva_ops", "hva_ops_outside_slots", "memslot_updates")}


def _wait_attached(proc, before_kp, before_ids, timeout=300):
    """Wait until the recorder has attached something (new kprobe event / BPF program), or died."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if len(kprobe_events()) > len(before_kp):
            break
        ids = bpf_prog_ids()
        if ids is not None and before_ids is not None and len(ids - before_ids) >= 2:
            break
        if ids is None and time.time() - t0 > 60:
            break  # no way to see it; waited long enough for a TCG compile
        time.sleep(1)
    time.sleep(3)  # let attach complete for all programs
    return proc.poll() is None


def _bpf_leftovers(before_ids, wait=10):
    t0 = time.time()
    while True:
        ids = bpf_prog_ids()
        if ids is None or before_ids is None:
            return None
        new = ids - before_ids
        if not new or time.time() - t0 > wait:
            return sorted(new)
        time.sleep(1)


_sessions = {}


def session(mode):
    """One `kvmtrace record` session restricted to `mode`, around three workloads (unmap with
    SLOTS_SMALL and SLOTS_LARGE memslots, churn), then `kvmtrace report --json`. Cached per mode;
    a failure is cached too, so every dependent check reports it."""
    if mode in _sessions:
        s = _sessions[mode]
        if isinstance(s, BaseException):
            raise s
        return s
    try:
        s = _run_session(mode)
    except (Fail, Skip) as e:
        _sessions[mode] = e
        raise
    _sessions[mode] = s
    return s


def _run_session(mode):
    if mode == "fentry" and EXPECTED_DEFAULT_MODE != "fentry":
        raise Skip("fentry mode is not expected on %d.%d (kvm module functions need bcc MODULE_KFUNC_PROBE + module BTF)" % KVER)
    kvmtrace_help("record")
    kvmtrace_help("report")
    if mode == "tracepoint" and not os.path.isdir("/sys/kernel/tracing/events/kvm/kvm_unmap_hva_range"):
        # x86 has the generic kvm_unmap_hva_range trace event only since 5.13: kvmtrace must
        # refuse tracepoint-only tracing cleanly (exit 3, no traceback), and that is all to check
        p = run(KVMTRACE + ["record", "-o", os.path.join(RESULTS, "rec-tp-refused"), "--modes", "tracepoint",
                            "--duration", "1"], timeout=300)
        text = (p.stdout or "") + (p.stderr or "")
        if p.returncode != 3 or "Traceback" in text or "unmap" not in text:
            raise Fail("record --modes tracepoint without the tracepoint: exit %s, expected a clean exit 3: %s"
                       % (p.returncode, tail(text)))
        raise Skip("no kvm:kvm_unmap_hva_range on %d.%d (x86 has it since 5.13): tracepoint mode unavailable, "
                   "and record refuses it cleanly (exit 3)" % KVER)
    margs = mode_args("record", (mode,))
    if margs is None:
        if mode != EXPECTED_DEFAULT_MODE:
            raise Fail("`kvmtrace record` has no option to choose attach mode %s (looked for --modes/--mode)" % mode)
        margs = []
    out = os.path.join(RESULTS, "rec-%s" % mode)
    log = open(os.path.join(RESULTS, "record-%s.log" % mode), "w")
    before_kp, before_ids = kprobe_events(), bpf_prog_ids()
    cmd = KVMTRACE + ["record", "-o", out, "--interval", "1"] + margs
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not _wait_attached(proc, before_kp, before_ids):
            log.flush()
            raise Fail("`%s` exited (%s) before attaching: %s" % (" ".join(cmd[2:]), proc.returncode, tail(open(log.name).read())))
        attach_s = round(time.time() - t0, 1)
        gts = {"small": workload(SLOTS_SMALL, "unmap", tag=mode), "large": workload(SLOTS_LARGE, "unmap", tag=mode)}
        try:
            gts["churn"] = workload(SLOTS_SMALL, "churn", tag=mode)
        except Fail as e:
            gts["churn"] = e
        time.sleep(2.5)  # one more interval flush
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise Fail("`kvmtrace record` did not stop within 120 s of SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    rec_rc = proc.returncode
    leftover_kp = [e for e in kprobe_events() if e not in before_kp]
    leftover_ids = _bpf_leftovers(before_ids)
    p = run(KVMTRACE + ["report", out, "--json"], timeout=600)
    report, report_err = None, None
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report_err = "`kvmtrace report %s --json` (exit %d) printed no JSON: %s" % (os.path.basename(out), p.returncode, tail(p.stderr or p.stdout))
    slot_tables = ""
    try:
        with open(os.path.join(out, "kvmtrace-recording.json")) as f:
            slot_tables = (json.load(f).get("session") or {}).get("tp.slot_tables") or ""
    except (OSError, ValueError, AttributeError):
        pass
    return {"mode": mode, "gt": gts, "report": report, "report_err": report_err, "record_rc": rec_rc,
            "slot_tables": slot_tables,
            "record_log": tail(open(log.name).read(), 5), "attach_s": attach_s,
            "leftover_kprobes": leftover_kp, "leftover_bpf": leftover_ids}


def _report(s):
    if s["report_err"]:
        raise Fail(s["report_err"])
    return s["report"]


def _rows(report, key, pid, **match):
    rows = [r for r in report.get(key, []) if r.get("pid") == pid]
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _mode_checks(what):
    def check(mode):
        s = session(mode)
        return what(s)
    return check


def _unmap_count(s):
    rep = _report(s)
    out, errs = {}, []
    for tag in ("small", "large"):
        gt = s["gt"][tag]
        rows = _rows(rep, "hva_ops", gt["pid"], op="unmap")
        got = sum(r.get("count", 0) for r in rows)
        want = gt["hva_ops"]["unmap"]
        out[tag] = {"pid": gt["pid"], "slots": gt["slots"], "truth": want, "traced": got}
        if got != want:
            errs.append("%d slots (pid %d): traced %d unmap ops, ground truth %d" % (gt["slots"], gt["pid"], got, want))
    if errs:
        raise Fail("%s mode: %s" % (s["mode"], "; ".join(errs)))
    return "pass", "%s mode: unmap counts exact (%s)" % (s["mode"], ", ".join("%d" % out[t]["traced"] for t in out)), out


def _merged_slots(rows):
    """The slots-visited figures of one process's unmap rows as one: the report splits a VM's
    op by provenance, and an interval whose ops' system calls ended only in the next one has
    latency provenance "none" (seen: 1 + 512 ops in two rows). n and max over all rows, the mean
    weighted by n."""
    svs = [r.get("slots_visited") or {} for r in rows]
    svs = [v for v in svs if v.get("n")]
    if not svs:
        return {}
    n = sum(v["n"] for v in svs)
    mean = None if any(v.get("mean") is None for v in svs) else sum(v["mean"] * v["n"] for v in svs) / n
    return {"n": n, "mean": mean, "max": max(v.get("max") for v in svs)}


def _slots_visited(s):
    """The unmap scenario unmaps page by page: every range inside a slot overlaps exactly 1 slot,
    the ground truth's hva_ops_outside_slots overlap none. So max = 1 and the total slots visited
    = unmap ops - outside ops (the mean is checked through that total)."""
    rep = _report(s)
    out, errs = {}, []
    if s["mode"] == "tracepoint" and s.get("slot_tables", "").startswith("unavailable"):
        # the kernel refused the slot-table programs. The session's fallback must count every op
        # underived, none guessed; but every lab kernel with the tracepoint (6.1, 6.12) loads
        # them, so slots not derived here is a failure either way
        counts = []
        for tag in ("small", "large"):
            gt = s["gt"][tag]
            rows = _rows(rep, "hva_ops", gt["pid"], op="unmap")
            n = sum(r.get("count", 0) for r in rows)
            under = sum(r.get("underived") or 0 for r in rows)
            derived = [(r.get("slots_visited") or {}).get("mean") for r in rows if (r.get("slots_visited") or {}).get("mean") is not None]
            if under != n or derived:
                raise Fail("tracepoint mode without slot tables: %d of %d unmaps underived, derived means %r "
                           "(every op must be underived)" % (under, n, derived))
            counts.append("%d of %d" % (under, n))
        raise Fail("tracepoint mode on %d.%d: slots visited not derived (%s unmaps counted underived): %s"
                   % (KVER + (", ".join(counts), s["slot_tables"])))
    for tag in ("small", "large"):
        gt = s["gt"][tag]
        rows = _rows(rep, "hva_ops", gt["pid"], op="unmap")
        if not rows:
            raise Fail("%s mode: no unmap rows for pid %d in the report" % (s["mode"], gt["pid"]))
        sv = _merged_slots(rows)
        n = gt["hva_ops"]["unmap"]
        inside = n - (gt.get("hva_ops_outside_slots") or {}).get("unmap", 0)
        want_mean = float(inside) / n if n else 0.0
        out[tag] = {"report": sv, "ops": n, "ops_inside_slots": inside, "expected_mean": want_mean}
        under = sum(r.get("underived") or 0 for r in rows)
        if s["mode"] == "tracepoint" and (under or sv.get("n") != n):
            # every op derived in the kernel: a mean over fewer ops could still match by chance
            errs.append("%d slots: %d of %d unmaps underived, slots visited over %r ops" % (gt["slots"], under, n, sv.get("n")))
        if sv.get("max") != 1 or sv.get("mean") is None or abs(sv["mean"] - want_mean) > 1e-6:
            errs.append("%d slots: slots visited per unmap mean %r max %r, expected mean %.6f (%d of %d page-sized ranges "
                        "inside one slot) and max 1" % (gt["slots"], sv.get("mean"), sv.get("max"), want_mean, inside, n))
    if errs:
        raise Fail("%s mode: %s" % (s["mode"], "; ".join(errs)))
    if s.get("slot_tables"):
        out["slot_tables"] = s["slot_tables"]
    return "pass", "%s mode: slots visited per unmap = overlap count (max 1, mean %.4f / %.4f)" % (
        s["mode"], out["small"]["expected_mean"], out["large"]["expected_mean"]), out


def _slots_scanned(s):
    rep = _report(s)
    out = {}
    for tag in ("small", "large"):
        gt = s["gt"][tag]
        rows = _rows(rep, "hva_ops", gt["pid"], op="unmap")
        if not rows:
            raise Fail("%s mode: no unmap rows for pid %d in the report" % (s["mode"], gt["pid"]))
        out[tag] = {"slots": gt["slots"], "scanned": (rows[0].get("slots_scanned") or {}).get("mean")}
    if LINEAR_SCAN:
        errs = ["%d memslots: slots scanned per unmap %r" % (v["slots"], v["scanned"]) for v in out.values() if v["scanned"] != v["slots"]]
        if errs:
            raise Fail("%s mode, linear-scan kernel %d.%d: slots scanned must equal the memslot count: %s" % ((s["mode"],) + KVER + ("; ".join(errs),)))
        return "pass", "%s mode: slots scanned = memslot count (%d, %d)" % (s["mode"], out["small"]["scanned"], out["large"]["scanned"]), out
    a, b = out["small"]["scanned"], out["large"]["scanned"]
    # Interval-tree kernels scan nothing: kvmtrace must not report a scanned figure at all (a
    # made-up one would pass a "does not grow" test; none is the only right answer)
    if a is not None or b is not None:
        raise Fail("%s mode on %d.%d (interval tree, no linear scan): a slots-scanned figure was reported: %r at %d slots, "
                   "%r at %d; expected none" % (s["mode"], KVER[0], KVER[1], a, SLOTS_SMALL, b, SLOTS_LARGE))
    return "pass", "%s mode on %d.%d (interval tree): no slots-scanned figure reported, as the kernel scans none" % (
        (s["mode"],) + KVER), out


def _memslot_updates(s):
    rep = _report(s)
    gt = s["gt"]["churn"]
    if isinstance(gt, Exception):
        raise Fail("churn workload failed: %s" % gt)
    errs, out = [], {}
    for change in ("create", "delete", "move", "flags_only"):
        want = gt["memslot_updates"].get(change, 0)
        rows = _rows(rep, "memslot_updates", gt["pid"], change=change)
        got = sum(r.get("count", 0) for r in rows)
        lat = (rows[0].get("latency_ns") or {}) if rows else {}
        out[change] = {"truth": want, "traced": got, "latency_ns": lat}
        if got != want:
            errs.append("%s: traced %d, ground truth %d" % (change, got, want))
        elif want and not (lat.get("max") or lat.get("p50")):
            errs.append("%s: no latency recorded (%r)" % (change, lat))
    if errs:
        raise Fail("%s mode, churn pid %d: %s" % (s["mode"], gt["pid"], "; ".join(errs)))
    return "pass", "%s mode: memslot updates by change type exact, with latency" % s["mode"], out


def _cleanup_after_exit(s):
    if s["record_rc"] not in (0, 130):
        raise Fail("%s mode: `kvmtrace record` exited %s after SIGINT: %s" % (s["mode"], s["record_rc"], s["record_log"]))
    errs = []
    if s["leftover_kprobes"]:
        errs.append("kprobe_events left: %s" % s["leftover_kprobes"])
    if s["leftover_bpf"]:
        errs.append("BPF programs left: %s" % s["leftover_bpf"])
    if errs:
        raise Fail("%s mode, after `kvmtrace record` exited: %s" % (s["mode"], "; ".join(errs)))
    note = "" if s["leftover_bpf"] is not None else " (bpftool unavailable: BPF programs not checked)"
    return "pass", "%s mode: nothing left behind after exit%s" % (s["mode"], note), {}


def check_cleanup_after_sigkill():
    kvmtrace_help("record")
    before_kp, before_ids = kprobe_events(), bpf_prog_ids()
    margs = mode_args("record", ("kprobe",)) or []
    out = os.path.join(RESULTS, "rec-sigkill")
    log = open(os.path.join(RESULTS, "record-sigkill.log"), "w")
    proc = subprocess.Popen(KVMTRACE + ["record", "-o", out, "--interval", "1"] + margs, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not _wait_attached(proc, before_kp, before_ids):
            raise Fail("`kvmtrace record` exited (%s) before attaching: %s" % (proc.returncode, tail(open(log.name).read())))
        attached = {"kprobes": [e for e in kprobe_events() if e not in before_kp],
                    "bpf": sorted((bpf_prog_ids() or set()) - (before_ids or set()))}
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    time.sleep(1)
    left_kp = [e for e in kprobe_events() if e not in before_kp]
    left_bpf = _bpf_leftovers(before_ids)
    errs = []
    if left_kp:
        errs.append("kprobe_events left: %s" % left_kp)
    if left_bpf:
        errs.append("BPF programs left: %s" % left_bpf)
    if errs:
        raise Fail("after SIGKILL of `kvmtrace record`: %s" % "; ".join(errs))
    return "pass", "nothing left after SIGKILL (while attached: %d kprobe events, %d BPF programs)" % (
        len(attached["kprobes"]), len(attached["bpf"])), attached


MODE_CHECKS = {"record_unmap_count": _unmap_count, "record_slots_visited": _slots_visited,
               "record_slots_scanned": _slots_scanned, "record_memslot_updates": _memslot_updates,
               "cleanup_after_exit": _cleanup_after_exit}


# --- exact modes in process: VM lifetimes, memslot counts at event time -------------------------


# One child process runs Workload after Workload (one VM each, one after another) and prints the
# ground truths: the only process of the VMs, so its unmaps are exactly the workloads' own (the
# tracer's threads, allocating in this process, would add notifier calls of their own).
_CHILD = """
import json, sys
from kvmtrace.workload import Workload
out = []
for slots, pages in json.loads(sys.argv[1]):
    wl = Workload(slots=slots, slot_size=256 << 10, scenario="unmap", iterations=1, pages=pages, vcpu=False)
    with wl:
        wl.run()
    out.append(wl.ground_truth())
print(json.dumps(out))
"""


def _traced_workloads(specs):
    """Workloads [(slots, pages), ...] run one after another by one child process under a
    TraceSession with kvmtrace's default plan (the exact mode this kernel allows); returns
    (ground truths, the child's pid, the final cumulative snapshot, the plan)."""
    from kvmtrace.tracer.session import TraceSession

    with TraceSession(interval=1.0) as s:
        if not s.plan.vm_lifetime:
            raise Fail("plan has no VM lifetime probes: %s" % s.plan.vm_lifetime_reason)
        p = run([sys.executable, "-c", _CHILD, json.dumps(specs)], timeout=900)
        if p.returncode != 0:
            raise Fail("workload child exited %d: %s" % (p.returncode, tail(p.stderr or p.stdout)))
        gts = json.loads(p.stdout.strip().splitlines()[-1])
        time.sleep(0.5)
        return gts, gts[0]["pid"], s.snapshot(), s.plan


def check_exact_vm_lifetimes():
    """Three VMs created one after another by this process (a freed struct kvm is often reused by
    the next): three VMs with ordinals 1, 2, 3, each with exactly its own unmaps and creates."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    gts, pid, snap, plan = _traced_workloads([(4, 16)] * 3)
    vms = sorted((v for v in snap.vms if v.pid == pid), key=lambda v: v.ordinal)
    unmaps = {h.vm_id: h.count for h in snap.hva if h.op == "unmap" and h.pid == pid}
    creates = {m.vm_id: m.count for m in snap.memslot if m.change == "create" and m.pid == pid}
    got = [{"vm": v.vm_id, "ordinal": v.ordinal, "label": v.label, "alive": v.alive, "memslots_max": v.memslots_max,
            "unmaps": unmaps.get(v.vm_id, 0), "creates": creates.get(v.vm_id, 0)} for v in vms]
    want = [{"unmaps": g["hva_ops"]["unmap"], "creates": g["memslot_updates"].get("create", 0)} for g in gts]
    addrs = [v.vm_id.split(":")[1] for v in vms]
    details = {"vms": got, "truth": want, "plan": plan.vm_lifetime_reason,
               "address_reused": len(set(addrs)) < len(addrs)}
    if [v["ordinal"] for v in got] != [1, 2, 3]:
        raise Fail("expected 3 VMs with ordinals 1, 2, 3, got %s" % [(v["vm"], v["ordinal"]) for v in got], details)
    errs = ["VM #%d: %d unmaps / %d creates traced, truth %d / %d" % (v["ordinal"], v["unmaps"], v["creates"], w["unmaps"], w["creates"])
            for v, w in zip(got, want) if (v["unmaps"], v["creates"]) != (w["unmaps"], w["creates"])]
    errs += ["VM #%d still alive after its destruction" % v["ordinal"] for v in got if v["alive"]]
    errs += ["VM #%d: memslots_max %r, expected 4" % (v["ordinal"], v["memslots_max"]) for v in got if v["memslots_max"] != 4]
    if errs:
        raise Fail("; ".join(errs), details)
    return "pass", "3 VMs of one process kept apart (%s), exact counts each (address reused: %s)" % (
        ", ".join(v["label"] for v in got), details["address_reused"]), details


def check_exact_memslot_buckets():
    """Unmaps at N memslots (509 on 5.10, the kernel's limit there) land in the memslot-count
    bucket of N, aggregated in the kernel; on linear-scan kernels every one scanned N slots."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    n = 509
    (gt,), pid, snap, plan = _traced_workloads([(n, 64)])
    rows = [b for b in snap.by_memslots if b.pid == pid and b.op == "unmap"]
    total = sum(b.count for b in rows)
    want_b = n.bit_length()  # snapshot.log2_bucket(509) = 9: [256, 512)
    top = [b for b in rows if b.bucket == want_b]
    vm = [v for v in snap.vms if v.pid == pid]
    details = {"buckets": [(b.bucket, b.count, b.memslots_max, b.scanned_sum) for b in rows],
               "truth_unmaps": gt["hva_ops"]["unmap"], "vm_memslots_max": [v.memslots_max for v in vm]}
    errs = []
    if total != gt["hva_ops"]["unmap"]:
        errs.append("buckets hold %d unmaps, ground truth %d" % (total, gt["hva_ops"]["unmap"]))
    if len(top) != 1 or top[0].memslots_max != n or top[0].count < 64:
        errs.append("no bucket %d with memslots_max %d and the 64 page unmaps" % (want_b, n))
    elif LINEAR_SCAN and top[0].scanned_sum != n * top[0].count:
        errs.append("scanned %r at %d memslots for %d unmaps, expected %d each" % (top[0].scanned_sum, n, top[0].count, n))
    elif not LINEAR_SCAN and top[0].scanned_sum is not None:
        errs.append("slots scanned %r on an interval-tree kernel" % top[0].scanned_sum)
    if [v.memslots_max for v in vm] != [n]:
        errs.append("VM memslots_max %r, expected [%d]" % ([v.memslots_max for v in vm], n))
    if errs:
        raise Fail("; ".join(errs), details)
    return "pass", "%d unmaps at %d memslots in bucket %d%s" % (top[0].count, n, want_b, (
        ", scanned %d each" % n) if LINEAR_SCAN else ""), details


def check_exact_multi_vm():
    """The workload's multi-vm scenario (3 VMs one after another, then 2 alive at once, in one
    process) under the default exact plan: every VM its own row, by its ordinal, with exactly its
    ground truth's unmaps (every madvise while it is alive: one notifier per VM), slots visited,
    memslot updates by change type and memslot counts."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    from kvmtrace.tracer.session import TraceSession
    from kvmtrace.workload import SCENARIOS

    if "multi-vm" not in SCENARIOS:
        raise Skip("the workload has no multi-vm scenario in this tree")
    out = os.path.join(RESULTS, "gt-multi-vm-exact.json")
    with TraceSession(interval=1.0) as s:
        p = run(KVMTRACE + ["workload", "--scenario", "multi-vm", "--quiet", "--json-out", out], timeout=900)
        if p.returncode != 0:
            raise Fail("multi-vm workload exited %d: %s" % (p.returncode, tail(p.stderr or p.stdout)))
        time.sleep(0.5)
        snap = s.snapshot()
    with open(out) as f:
        gt = json.load(f)
    pid = gt["pid"]
    vms = {v.ordinal: v for v in snap.vms if v.pid == pid}
    hva = {h.vm_id: h for h in snap.hva if h.pid == pid and h.op == "unmap"}
    upd = {}
    for m in snap.memslot:
        if m.pid == pid:
            upd.setdefault(m.vm_id, {})[m.change] = m.count
    errs, got = [], []
    for want in gt["vms"]:
        v = vms.get(want["ordinal"])
        if v is None:
            errs.append("VM #%d: no row" % want["ordinal"])
            continue
        h = hva.get(v.vm_id)
        row = {"ordinal": v.ordinal, "vm": v.vm_id, "unmaps": h.count if h else 0,
               "visited": h.slots_sum if h else 0, "updates": {k: c for k, c in upd.get(v.vm_id, {}).items() if c},
               "memslots_max": v.memslots_max}
        got.append(row)
        w_upd = {k: c for k, c in want["memslot_updates"].items() if c}
        if (row["unmaps"], row["visited"], row["updates"], row["memslots_max"]) != (
                want["hva_ops"]["unmap"], want["hva_slots_visited"]["unmap"], w_upd, want["memslots_max"]):
            errs.append("VM #%d: traced unmaps %d, visited %d, updates %s, memslots_max %r; truth %d, %d, %s, %r" % (
                want["ordinal"], row["unmaps"], row["visited"], row["updates"], row["memslots_max"],
                want["hva_ops"]["unmap"], want["hva_slots_visited"]["unmap"], w_upd, want["memslots_max"]))
    extra = sorted(set(vms) - {w["ordinal"] for w in gt["vms"]})
    if extra:
        errs.append("VMs traced that the workload did not create: ordinals %s" % extra)
    details = {"traced": got, "truth": gt["vms"]}
    if errs:
        raise Fail("; ".join(errs), details)
    return "pass", "%d VMs of one process (%d at once), each exact: %s" % (
        len(got), sum(1 for w in gt["vms"] if w.get("concurrent")), ", ".join(
            "#%d %d unmaps" % (r["ordinal"], r["unmaps"]) for r in got)), details


def check_exact_report_by_memslots():
    """`kvmtrace record` (default plan, no --events) around one VM with 509 memslots unmapping 64
    pages, then `report --json`: the memslot-count table has the unmaps at 509 memslots (from
    the kernel's buckets), scanned 509 per unmap on linear-scan kernels."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    out = os.path.join(RESULTS, "rec-by-memslots")

    def work():
        p = run(KVMTRACE + ["workload", "--slots", "509", "--slot-size", "256K", "--scenario", "unmap", "--pages", "64",
                            "--iterations", "1", "--quiet", "--json-out", os.path.join(RESULTS, "gt-by-memslots.json")])
        if p.returncode != 0:
            raise Fail("workload exited %d: %s" % (p.returncode, tail(p.stderr or p.stdout)))

    _while_attached(["record", "-o", out, "--interval", "1"], "record-by-memslots.log", work)
    with open(os.path.join(RESULTS, "gt-by-memslots.json")) as f:
        gt = json.load(f)
    rep = json.loads(run(KVMTRACE + ["report", out, "--json", "--accept-warnings"], check=True).stdout)
    rows = [r for r in rep.get("by_memslots", []) if r.get("op") == "unmap"]
    details = {"by_memslots": rows, "truth_unmaps": gt["hva_ops"]["unmap"]}
    top = [r for r in rows if r.get("memslots_max") == 509]
    errs = []
    if sum(r.get("count", 0) for r in rows) != gt["hva_ops"]["unmap"]:
        errs.append("by_memslots holds %d unmaps, ground truth %d" % (sum(r.get("count", 0) for r in rows), gt["hva_ops"]["unmap"]))
    if len(top) != 1 or top[0].get("count", 0) < 64:
        errs.append("no memslot-count row with max 509 holding the 64 page unmaps")
    elif LINEAR_SCAN and (top[0].get("slots_scanned") or {}).get("mean") != 509:
        errs.append("slots scanned at 509 memslots: %r, expected 509" % (top[0].get("slots_scanned"),))
    if errs:
        raise Fail("; ".join(errs), details)
    return "pass", "report: %d unmaps at %s memslots (max 509)%s" % (
        top[0]["count"], top[0].get("memslots_bucket"), ", scanned 509" if LINEAR_SCAN else ""), details


def _find_key(obj, key):
    """The first value of `key` anywhere in nested JSON, else None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            got = _find_key(v, key)
            if got is not None:
                return got
    return None


def _while_attached(args, logname, work):
    """Run `kvmtrace ARGS` (record or top), wait until it has attached, call work(), let one more
    interval pass, stop it with SIGINT; -> (work's result, path of its output log)."""
    log = open(os.path.join(RESULTS, logname), "w")
    before_kp, before_ids = kprobe_events(), bpf_prog_ids()
    proc = subprocess.Popen(KVMTRACE + args, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not _wait_attached(proc, before_kp, before_ids):
            raise Fail("`kvmtrace %s` exited before attaching: %s" % (args[0], tail(open(log.name).read())))
        got = work()
        time.sleep(2.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return got, log.name


def _cb_programs(per_prog, role):
    """Run figures [(name, ns, cnt)] of kvmtrace's unmap-callback programs of `role` (entry or
    exit): kprobe names kp_enter_UNMAP_<fn> / kp_exit_UNMAP_<fn>, fentry kfunc__... / kretfunc__..."""
    out = []
    for name, v in (per_prog or {}).items():
        if "invalidate_range_start" not in name:
            continue
        entry = name.startswith("kp_enter_") or name.startswith("kfunc")
        exit_ = name.startswith("kp_exit_") or name.startswith("kretfunc")
        if (role == "entry" and entry) or (role == "exit" and exit_):
            out.append((name, int(v[0]), int(v[1])))
    return out


STATS_STATES = ("enabled", "sampled")  # always on, or duty-cycled (a subset of the runs)


def full_self_cost(sub):
    """`--self-cost full` when `kvmtrace SUB` has it (statistics on the whole time, so run counts
    are exact; the default samples them), else no argument."""
    return ["--self-cost", "full"] if "--self-cost" in kvmtrace_help(sub) else []


def check_exact_self_cost():
    """kvmtrace's own cost in the exact mode, against the workload's ground truth: `record`
    (default plan, `--self-cost full` where it exists) around one VM unmapping page by page; the recording's metadata has BPF run
    statistics enabled (or sampled), the unmap callback's entry and exit programs ran once per
    callback (= the unmaps kvmtrace counted, >= the ground truth's unmaps) when statistics were
    on the whole time, in-kernel ns per event > 0, user-space CPU > 0; `report --json` carries
    the cost and `report` prints its cost line."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    out = os.path.join(RESULTS, "rec-self-cost")
    gt, _log = _while_attached(["record", "-o", out, "--interval", "1"] + full_self_cost("record"), "record-self-cost.log",
                               lambda: workload(SLOTS_SMALL, "unmap", tag="self-cost"))
    meta = {}
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(out, name)) as f:
                    meta = json.load(f)
            except ValueError:
                continue
            if _find_key(meta, "self_cost") is not None:
                break
    cost = _find_key(meta, "self_cost")
    if not isinstance(cost, dict):
        raise Fail("the recording's metadata has no self_cost (files: %s)" % sorted(os.listdir(out)))
    rep = json.loads(run(KVMTRACE + ["report", out, "--json", "--accept-warnings"], check=True).stdout)
    text = run(KVMTRACE + ["report", out, "--accept-warnings"], check=True).stdout
    src = (rep.get("sources") or [{}])[0]
    truth = gt["hva_ops"]["unmap"]
    counted = sum(r.get("count", 0) for r in rep.get("hva_ops", []) if r.get("op") == "unmap")
    entry, exit_ = _cb_programs(cost.get("per_prog"), "entry"), _cb_programs(cost.get("per_prog"), "exit")
    state = str(cost.get("bpf_stats"))
    details = {"bpf_stats": state, "truth_unmaps": truth, "counted_unmaps": counted, "entry": entry, "exit": exit_,
               "bpf_ns_per_event": cost.get("bpf_ns_per_event"), "bpf_run_cnt": cost.get("bpf_run_cnt"),
               "user_cpu_s": cost.get("user_cpu_s"), "report": {k: src.get(k) for k in (
                   "bpf_stats", "bpf_ns_per_event", "bpf_cpu_share", "user_cpu_share")},
               "cost_line": [ln for ln in text.splitlines() if "own cost" in ln]}
    errs = []
    if not state.startswith(STATS_STATES):
        errs.append("BPF statistics %r on a 5.8+ kernel as root (expected enabled or sampled)" % state)
    else:
        if len(entry) != 1 or len(exit_) != 1:
            errs.append("per-program figures lack the unmap callback's entry/exit program: %s"
                        % sorted((cost.get("per_prog") or {}).keys()))
        else:
            runs_in, runs_out = entry[0][2], exit_[0][2]
            if state.startswith("enabled"):  # on the whole time: every callback ran each program once
                if not (runs_in == runs_out == counted and runs_in >= truth):
                    errs.append("entry/exit runs %d/%d, kvmtrace counted %d unmaps, ground truth %d: expected "
                                "runs = counted >= truth" % (runs_in, runs_out, counted, truth))
            elif not (0 < runs_in <= counted):
                errs.append("sampled statistics: entry runs %d, expected 1..%d (the unmaps counted)" % (runs_in, counted))
            if not entry[0][1] > 0:
                errs.append("entry program run time %r ns" % entry[0][1])
        if not (cost.get("bpf_ns_per_event") or 0) > 0:
            errs.append("bpf_ns_per_event %r, expected > 0" % cost.get("bpf_ns_per_event"))
        if not str(src.get("bpf_stats")).startswith(STATS_STATES) or not (src.get("bpf_ns_per_event") or 0) > 0:
            errs.append("report --json sources: %r" % details["report"])
    if not (cost.get("user_cpu_s") or 0) > 0:
        errs.append("user_cpu_s %r, expected > 0" % cost.get("user_cpu_s"))
    if not details["cost_line"] or ("ns/event" not in details["cost_line"][0] and "in-kernel cost" not in details["cost_line"][0]):
        errs.append("`kvmtrace report` printed no cost line with ns/event: %s" % tail(text, 4))
    if errs:
        raise Fail("; ".join(errs), details)
    return "pass", "%s: unmap entry ran %d times, %d unmaps counted, ground truth %d; %.0f ns/event; report: %s" % (
        state, entry[0][2], counted, truth, cost["bpf_ns_per_event"], details["cost_line"][0].strip()), details


def check_exact_top_self_cost():
    """`kvmtrace top` (default plan, `--self-cost full` where it exists, so that every interval
    is measured; stdout not a terminal, so a plain table per interval) around
    one VM unmapping page by page: the interval headers carry kvmtrace's in-kernel cost (ns per
    event > 0 in an interval with events)."""
    if EXPECTED_DEFAULT_MODE not in ("kprobe", "fentry"):
        raise Skip("no exact mode expected here")
    gt, log = _while_attached(["top", "--interval", "1"] + full_self_cost("top"), "top-self-cost.log",
                              lambda: workload(SLOTS_SMALL, "unmap", tag="top-self-cost"))
    text = open(log).read()
    per = [int(m.group(1).replace(",", "")) for m in re.finditer(r"([\d,]+) ns/event", text)]
    details = {"truth_unmaps": gt["hva_ops"]["unmap"], "ns_per_event": per, "tail": tail(text, 6)}
    if not any(n > 0 for n in per):
        raise Fail("no `kvmtrace top` interval header shows kvmtrace's in-kernel ns/event > 0", details)
    return "pass", "top: in-kernel cost in %d interval headers, up to %d ns/event" % (len(per), max(per)), details


def get_check(name):
    fn = globals().get("check_" + name)
    if fn:
        return fn
    for what, impl in MODE_CHECKS.items():
        for mode in MODES:
            if name == "%s_%s" % (what, mode):
                return lambda impl=impl, mode=mode: impl(session(mode))
    raise KeyError(name)


def emit(rec):
    line = json.dumps(rec, default=str, sort_keys=True)
    print(MARK + line, flush=True)
    with open(os.path.join(RESULTS, "checks.jsonl"), "a") as f:
        f.write(line + "\n")


def main():
    global RESULTS
    RESULTS = RESULTS or tempfile.mkdtemp(prefix="lab-results-")
    only = [c for c in os.environ.get("KVMTRACE_LAB_ONLY", "").split(",") if c]
    names = only or CHECKS
    print(MARK + json.dumps({"check": "_start", "kernel": os.uname().release, "checks": names}), flush=True)
    failed = 0
    for name in names:
        t = time.time()
        try:
            status, reason, details = get_check(name)()
        except Skip as e:
            status, reason, details = "skip", str(e), {}
        except Fail as e:
            status, reason, details = "fail", str(e), e.details
        except subprocess.TimeoutExpired as e:
            status, reason, details = "fail", "timed out: %s" % e, {}
        except Exception as e:
            status, reason, details = "fail", "%s: %s" % (type(e).__name__, e), {"traceback": traceback.format_exc()[-2000:]}
        failed += status == "fail"
        emit({"check": name, "status": status, "reason": reason, "details": details, "seconds": round(time.time() - t, 1)})
    print(MARK + json.dumps({"check": "_end", "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
