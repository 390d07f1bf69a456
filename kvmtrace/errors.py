"""Typed errors. Every failure a user can cause or meet ends up here, and cli.main turns it into
one message (with the remedy) and an exit status, never a traceback."""


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
