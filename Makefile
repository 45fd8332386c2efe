# `make run` and `make test` each bootstrap .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench sysdeps clean

$(STAMP): setup.py
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update && apt-get install -y python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# System packages the tests use: OpenSSH's sshd (real-SSH tests), Prometheus (promtool's lint and
# a real server scraping the dispatcher), PostgreSQL (the dispatch lock; tests start their own
# server in a temp dir, so the package's default cluster is not needed) and the openssl command (an
# independent check of EC2 key fingerprints).
sysdeps:
	@{ test -x /usr/sbin/sshd && command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
	   && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; } || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    openssh-server prometheus postgresql openssl; }

run: $(STAMP)
	$(VENV)/bin/dispatch-cloud run --demo

test: $(STAMP) sysdeps
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
