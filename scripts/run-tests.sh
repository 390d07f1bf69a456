#!/usr/bin/env bash
# Run the test suite from the venv set up by scripts/setup.sh. pytest's exit 5 ("no tests ran")
# is a failure here: a suite that runs nothing proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${KVMTRACE_VENV:-.venv}
"$VENV/bin/python" -m pytest -ra "$@" tests
rc=$?
if [ $rc = 5 ]; then echo "run-tests: pytest collected no tests" >&2; exit 1; fi
exit $rc
