# `make run` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8001
CHROMIUM := /usr/bin/chromium
WORDNET := /usr/share/wordnet/data.noun

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

run: install
	mkdir -p inbox
	$(BIN)/collection start inbox --host $(HOST) --port $(PORT)

# The browser tests drive Debian's Chromium through Playwright (no browser download).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the browser tests will be skipped"; \
	else \
		echo "note: install Debian's chromium (sudo apt-get install chromium) to run the browser tests"; \
	fi

# The test that checks the shipped WordNet hierarchy against WordNet 3.0 needs Debian's wordnet-base.
$(WORDNET):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null) \
		|| echo "warning: could not install wordnet-base; the hierarchy check will be skipped"; \
	else \
		echo "note: install Debian's wordnet-base (sudo apt-get install wordnet-base) to check the WordNet hierarchy"; \
	fi

test: install $(CHROMIUM) $(WORDNET)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
