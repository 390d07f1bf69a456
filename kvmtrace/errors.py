"""Typed errors and problems. Every failure a user can cause or meet ends up here, and cli.main
turns it into one message (with the remedy) and an exit status, never a traceback. A ``Problem``
is what a check found (doctor lists them; a command raises ``problem.error()``): consumers decide
by its ``code``, never by matching its message."""

from dataclasses import dataclass


class KvmtraceError(Exception):
    """An error with a remedy. ``exit_code`` becomes the process exit status."""

    exit_code = 1

    def __init__(self, message: str, remedy: str = "", exit_code: int = None):
        super().__init__(message)
        self.message = message
        self.remedy = remedy
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        if self.remedy:
            return f"{self.message}\n  fix: {self.remedy}"
        return self.message


class UsageError(KvmtraceError):
    """Bad input from the user (arguments, files)."""

    exit_code = 2


class PermissionProblem(KvmtraceError):
    """Not enough privilege (root / CAP_BPF / CAP_PERFMON / /dev/kvm access)."""

    exit_code = 2


class CapabilityMissing(KvmtraceError):
    """The kernel or the host lacks something kvmtrace needs (BPF, tracepoints, /dev/kvm, bcc)."""

    exit_code = 3


class DataFileError(UsageError):
    """A recording or report input is empty, truncated, foreign or of a wrong version."""


@dataclass(frozen=True)
class Problem:
    """Something a check found missing or wrong on this host: a stable ``code`` (what programs
    and tests decide by, e.g. ``fentry.eperm``), one line for the user, and the fix."""

    code: str
    message: str
    fix: str = ""
    exit_code: int = CapabilityMissing.exit_code

    def error(self) -> KvmtraceError:
        """The error a command raises for this problem."""
        cls = PermissionProblem if self.exit_code == PermissionProblem.exit_code else CapabilityMissing
        return cls(self.message, self.fix, exit_code=self.exit_code)

    def as_dict(self) -> dict:
        return {"code": self.code, "problem": self.message, "fix": self.fix}
