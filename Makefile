# The README's two commands: `make serve` and `make test`. Everything installs itself.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PLUGINS := $(patsubst %/setup.cfg,%,$(wildcard plugins/*/setup.cfg))
CONFIG  ?= mailhost.toml

.PHONY: serve test install install-test system-packages bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# mailhost and the bundled protocol plugins, editable. pip byte-compiles what it copies,
# never editable sources: compile them here, or every start recompiles them wherever
# PYTHONDONTWRITEBYTECODE is set (containers, CI images).
install: $(VENV)/bin/python
	$(PY) -m pip install --quiet -e . $(addprefix -e ,$(PLUGINS))
	$(PY) -m compileall -q host $(PLUGINS) >/dev/null

# Run the host: the embedded SQLite store, the bundled plugins, the web admin.
serve: install
	@test -f $(CONFIG) || $(VENV)/bin/mailhost --config $(CONFIG) init
	$(VENV)/bin/mailhost --config $(CONFIG) serve

# Real servers for the tests: Dovecot (IMAP, POP3) from Debian's packages.
system-packages:
	@command -v dovecot >/dev/null 2>&1 && test -x /usr/lib/dovecot/imap -a -x /usr/lib/dovecot/pop3 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dovecot-imapd dovecot-pop3d >/dev/null; }

install-test: install system-packages
	$(PY) -m pip install --quiet -e ".[test]"

# The whole suite, against real Dovecot, a real SMTP server, SQLite and PostgreSQL, in one
# pytest-xdist worker per core: most of its time is `mailhost` processes starting and
# servers answering, not one core's work. Each worker starts its own servers on free ports
# and makes its own databases; tests that share files (the builds in the source tree) stay
# together in one worker (xdist_group). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: install-test
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info host/*.egg-info plugins/*/*.egg-info
