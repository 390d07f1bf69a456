"""Host side of the kernel-lab tier (helpers; the fixture is in conftest.py): builds the guest images, boots each suite once with
tests/lab/guest_checks.py as the command, and parses its per-check JSON lines.

Environment:
  KVMTRACE_LAB=0           skip the tier (make test-host); 1 = run it and fail if the host cannot
  CI=true                  never skip because of the host: a host that cannot run the lab fails
  KVMTRACE_LAB_SUITES      comma list (default bullseye,bookworm,trixie)
  KVMTRACE_LAB_JOBS        guests booted concurrently (default 2: TCG uses one core per guest)
  KVMTRACE_LAB_CACHE       image cache (default /var/cache/kvmtrace-lab)
  KVMTRACE_LAB_TIMEOUT     per-boot budget in seconds for every suite (default: SUITE_BUDGET)
"""

import json
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB = os.path.join(REPO, "lab")
MARK = "KVMTRACE-LAB-CHECK "
ALL_SUITES = ("bullseye", "bookworm", "trixie")
GUEST_CMD = ["python", "tests/lab/guest_checks.py"]
# Per-boot budget (seconds) of each suite: about twice what its boot took on this 2-core kind of
# host with two guests booted together and nothing else running (as in CI: docs/lab.md, "Timing"),
# since other work on the host's two cores stretched a boot by up to 1.7x (measured). trixie runs
# every check of the others in three attach modes (fentry, kprobe and tracepoint) where they run
# one or two, so its boot is the longest: ~1,050 s; 900 s (the one budget of before) cut it off.
SUITE_BUDGET = {"bullseye": 1200, "bookworm": 1500, "trixie": 1800}


def suites():
    env = os.environ.get("KVMTRACE_LAB_SUITES", "")
    return [s for s in env.split(",") if s] or list(ALL_SUITES)


def budget(suite):
    """Seconds lab/run.sh gives `suite`'s boot: KVMTRACE_LAB_TIMEOUT if set, else SUITE_BUDGET."""
    env = os.environ.get("KVMTRACE_LAB_TIMEOUT", "").strip()
    return int(env) if env else SUITE_BUDGET.get(suite, 900)


def harness_suite():
    """The suite whose boot also runs the deliberately wrong check (harness_wrong_expectation)."""
    return os.environ.get("KVMTRACE_LAB_HARNESS_SUITE") or suites()[-1]


def _truthy(v):
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason():
    """Why this host cannot run the lab, or None."""
    if os.environ.get("KVMTRACE_LAB", "").strip() == "0":
        return "KVMTRACE_LAB=0"
    if os.geteuid() != 0:
        return "the kernel lab needs root (debootstrap, chroot, mkfs)"
    if not shutil.which("qemu-system-x86_64") and not shutil.which("apt-get"):
        return "no qemu-system-x86_64 and no apt-get to install it"
    if not shutil.which("git"):
        return "no git (the working tree is copied with git ls-files)"
    return None


def lab_gate():
    """Skip (with the reason) when the host cannot run the lab, except in CI or with KVMTRACE_LAB=1."""
    why = unavailable_reason()
    if why is None:
        return
    forced = _truthy(os.environ.get("CI")) or os.environ.get("KVMTRACE_LAB", "").strip() == "1"
    if forced and why != "KVMTRACE_LAB=0":
        pytest.fail("kernel lab required here (CI=%s, KVMTRACE_LAB=%s) but: %s"
                    % (os.environ.get("CI", ""), os.environ.get("KVMTRACE_LAB", ""), why), pytrace=False)
    pytest.skip("kernel lab skipped: %s" % why)


class LabRun:
    """One boot of one suite running the guest checks."""

    def __init__(self, suite, rc, stdout, stderr, results, seconds):
        self.suite, self.rc, self.stdout, self.stderr, self.results, self.seconds = suite, rc, stdout, stderr, results, seconds
        self.checks, self.kernel = {}, "?"
        text = stdout
        path = os.path.join(results, "output.log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                text = f.read()
        for line in text.splitlines():
            i = line.find(MARK)
            if i < 0:
                continue
            try:
                rec = json.loads(line[i + len(MARK):])
            except ValueError:
                continue
            if rec.get("check") == "_start":
                self.kernel = rec.get("kernel", "?")
            elif not str(rec.get("check", "_")).startswith("_"):
                self.checks[rec["check"]] = rec

    @property
    def harness_error(self):
        """A message when the boot itself failed (timeout, kernel BUG, no boot, image build)."""
        if self.rc in (124, 125) or (self.rc not in (0, 1) and not self.checks):
            return "lab run of %s failed (exit %s): %s" % (self.suite, self.rc, (self.stderr or "").strip()[-4000:])
        return None

    def message(self, name):
        rec = self.checks.get(name)
        where = "%s (%s)" % (self.suite, self.kernel)
        if rec is None:
            return "%s: check %s reported nothing (guest exit %s; results %s)\n%s" % (
                where, name, self.rc, self.results, (self.stderr or "").strip()[-2000:])
        msg = "%s: %s %s: %s" % (where, name, rec["status"].upper(), rec.get("reason", ""))
        det = rec.get("details") or {}
        if det:
            msg += "\n  details: %s" % json.dumps(det, sort_keys=True, default=str)[:1500]
        msg += "\n  guest results: %s" % self.results
        return msg


def run_suite(suite, env_extra=None, only=None, timeout=None):
    """Boot `suite` with the guest checks; return a LabRun (never raises for guest failures)."""
    import time

    results = tempfile.mkdtemp(prefix="kvmtrace-lab-%s-" % suite)
    cmd = [os.path.join(LAB, "run.sh"), "--quiet", "--timeout", str(budget(suite)), "--results", results]
    for k, v in sorted((env_extra or {}).items()):
        cmd += ["--env", "%s=%s" % (k, v)]
    if only:
        cmd += ["--env", "KVMTRACE_LAB_ONLY=" + ",".join(only)]
    t = time.time()
    try:
        env = dict(os.environ, KVMTRACE_LAB_NO_BUILD=os.environ.get("KVMTRACE_LAB_NO_BUILD", "1"))
        p = subprocess.run(cmd + [suite, "--"] + GUEST_CMD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           universal_newlines=True, timeout=timeout or budget(suite) + 600)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, "", "host-side timeout of lab/run.sh: %s" % e
    if rc == 3 and "KVMTRACE_LAB_NO_BUILD" in err and SESSION.build_error:
        err += "\n" + SESSION.build_error
    return LabRun(suite, rc, out, err, results, round(time.time() - t, 1))


class LabSession:
    """Builds all images concurrently, then boots the suites (KVMTRACE_LAB_JOBS at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures = None
        self.build_error = None

    def _start(self):
        ss = suites()
        p = subprocess.run([os.path.join(LAB, "build-image.sh")] + ss, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        if p.returncode != 0:
            self.build_error = "lab/build-image.sh %s failed (exit %d):\n%s" % (" ".join(ss), p.returncode, p.stdout[-4000:])
        pool = ThreadPoolExecutor(max_workers=int(os.environ.get("KVMTRACE_LAB_JOBS", "2")))
        # the harness self-test (a deliberately wrong expectation) rides along in one suite's boot
        hs = harness_suite()
        self._futures = {s: pool.submit(run_suite, s, {"KVMTRACE_LAB_WRONG": "1"} if s == hs else None) for s in ss}

    def get(self, suite):
        with self._lock:
            if self._futures is None:
                self._start()
        return self._futures[suite].result()


SESSION = LabSession()

