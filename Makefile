# Quick start (as root on a Debian/Ubuntu host):
#   make demo   # set up, then trace a real KVM VM that kvmtrace creates and drives
#   make test   # set up, then run the whole test suite (unit, host e2e, kernel lab)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-host test-lab doctor clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/kvmtrace demo

doctor: setup
	$(VENV)/bin/kvmtrace doctor

test: setup
	bash scripts/run-tests.sh

test-host: setup
	KVMTRACE_LAB=0 bash scripts/run-tests.sh

# kernel lab (root): build/cache the Debian 11/12/13 guest images, then boot each and run the lab
# tests inside (docs/lab.md). ~20-25 min cold, a few minutes warm.
.PHONY: lab
lab:
	bash lab/build-image.sh all

test-lab: setup
	KVMTRACE_LAB=$${KVMTRACE_LAB:-1} $(PY) -m pytest -ra -m lab tests/lab

clean:
	rm -rf $(VENV) build *.egg-info
