# `make run` and `make test` each bootstrap .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A second venv with the lowest version of every dependency setup.py allows (.ci/lowest_pins.py),
# so the floors it declares stay true; the driver and core tests run against it.
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
LOWEST_TESTS := tests/test_azure.py tests/test_fakearm_strict.py tests/test_conformance.py \
	tests/test_config.py tests/test_stdin_config.py tests/test_units.py tests/test_ssh.py \
	tests/test_ssh_timeouts.py tests/test_worker.py tests/test_planner.py tests/test_instancetype.py \
	tests/test_base.py tests/test_stub.py tests/test_api.py tests/test_metrics.py \
	tests/test_actorbase.py tests/test_ticker.py tests/test_sim.py tests/test_dispatchlock.py \
	tests/test_ec2.py

.PHONY: run test test-lowest bench sysdeps venvdep installs clean

# Debian's python3 has the venv module but not ensurepip until python3-venv is installed. apt
# takes one client at a time, so this runs before the other installs, which then run side by side.
venvdep:
	@$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; }

$(STAMP): setup.py | venvdep
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# System packages the tests use: OpenSSH's sshd (real-SSH tests), Prometheus (promtool's lint and
# a real server scraping the dispatcher), PostgreSQL (the dispatch lock; tests start their own
# server in a temp dir, so the package's default cluster is not needed) and the openssl command (an
# independent check of EC2 key fingerprints).
sysdeps: | venvdep
	@{ test -x /usr/sbin/sshd && command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
	   && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; } || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    openssh-server prometheus postgresql openssl; }

run: $(STAMP)
	$(VENV)/bin/dispatch-cloud run --demo

# Everything to install (system packages, .venv, .venv-lowest) at once: apt and two pips overlap.
installs:
	$(MAKE) -j3 --no-print-directory $(STAMP) $(LOWEST_STAMP) sysdeps

test: installs
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(MAKE) test-lowest

$(LOWEST_STAMP): setup.py .ci/lowest_pins.py | venvdep
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(PYTHON) .ci/lowest_pins.py > $(LOWEST)/pins.txt
	$(LOWEST)/bin/python -m pip install -q -r $(LOWEST)/pins.txt
	touch $(LOWEST_STAMP)

# The package is not installed there: the tests import it from this checkout.
test-lowest: $(LOWEST_STAMP) sysdeps
	PYTHONPATH=$(CURDIR) $(LOWEST)/bin/python -m pytest -q -p no:cacheprovider \
	  -W ignore::DeprecationWarning $(LOWEST_TESTS)

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LOWEST) *.egg-info
