"""Kernel lab tier: kvmtrace on real Debian 5.10 / 6.1 / 6.12 kernels booted under QEMU TCG.

Each suite boots once (tests/lab/conftest.py) and runs tests/lab/guest_checks.py; every guest
check becomes its own test here: test_guest[SUITE-CHECK]. See docs/lab.md.
"""

import os
import subprocess

import pytest

from tests.lab.harness import LAB, harness_suite, lab_gate, suites
from tests.lab.guest_checks import CHECKS

pytestmark = pytest.mark.lab

GUEST_CHECKS = [c for c in CHECKS if c != "harness_wrong_expectation"]


def _outcome(run, name):
    """pytest outcome of one guest check result (pass / skip / fail with a readable message)."""
    if run.harness_error:
        pytest.fail(run.harness_error, pytrace=False)
    rec = run.checks.get(name)
    if rec is None or rec["status"] == "fail":
        pytest.fail(run.message(name), pytrace=False)
    if rec["status"] == "skip":
        pytest.skip(run.message(name))
    assert rec["status"] == "pass", run.message(name)


@pytest.mark.parametrize("suite", suites())
def test_boot(lab_session, suite):
    """The guest booted, loaded KVM and ran the checks to the end."""
    run = lab_session.get(suite)
    if run.harness_error:
        pytest.fail(run.harness_error, pytrace=False)
    assert run.checks, "%s: no check results (exit %s): %s" % (suite, run.rc, run.stderr[-2000:])
    print("%s (%s): %d checks in %.0f s" % (suite, run.kernel, len(run.checks), run.seconds))


@pytest.mark.parametrize("check", GUEST_CHECKS)
@pytest.mark.parametrize("suite", suites())
def test_guest(lab_session, suite, check):
    _outcome(lab_session.get(suite), check)


def test_harness_detects_wrong_expectation(lab_session):
    """Prove the tier can fail: a guest check with a deliberately wrong expected count
    (KVMTRACE_LAB_WRONG=1, enabled in one suite's boot) must come back as a failure, make the
    guest script exit 1, and turn into a readable pytest failure."""
    suite = harness_suite()
    run = lab_session.get(suite)
    assert not run.harness_error, run.harness_error
    rec = run.checks.get("harness_wrong_expectation")
    assert rec is not None, run.message("harness_wrong_expectation")
    assert rec["status"] == "fail", "the wrong expectation passed?! %s" % run.message("harness_wrong_expectation")
    assert run.rc == 1, "guest_checks.py must exit 1 when a check fails, got %s" % run.rc
    with pytest.raises(pytest.fail.Exception) as exc:
        _outcome(run, "harness_wrong_expectation")
    msg = str(exc.value)
    assert "harness_wrong_expectation FAIL" in msg and "expected 5 invalidations" in msg and suite in msg, msg


def test_harness_timeout_is_reported(tmp_path):
    """The outer timeout kills the guest and reports it (exit 124, serial log tail)."""
    lab_gate()
    suite = suites()[0]
    env = dict(os.environ, KVMTRACE_LAB_NO_BUILD="0")
    p = subprocess.run([os.path.join(LAB, "run.sh"), "--quiet", "--timeout", "4", "--results", str(tmp_path), suite, "--", "true"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=1800)
    assert p.returncode == 124, (p.returncode, p.stderr[-2000:])
    assert "timed out after 4s" in p.stderr and "serial log tail" in p.stderr, p.stderr[-2000:]


def test_harness_reports_kernel_bug(tmp_path):
    """A kernel BUG / soft lockup line in the serial log fails the run (exit 125) with the log's tail,
    even while the command itself is still running."""
    lab_gate()
    suite = suites()[0]
    env = dict(os.environ, KVMTRACE_LAB_BUG_GRACE="2")
    cmd = "echo '<2>BUG: soft lockup - kvmtrace lab self-test' > /dev/kmsg; sleep 300"
    p = subprocess.run([os.path.join(LAB, "run.sh"), "--quiet", "--timeout", "600", "--results", str(tmp_path), suite, "--",
                        "sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=1800)
    assert p.returncode == 125, (p.returncode, p.stderr[-2000:])
    assert "kernel problem in the serial log" in p.stderr and "kvmtrace lab self-test" in p.stderr, p.stderr[-2000:]
