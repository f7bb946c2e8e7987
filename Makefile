# `make run` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8001
CHROMIUM := /usr/bin/chromium
WORDNET := /usr/share/wordnet/data.noun

.PHONY: install run test test-datasette-1 bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

run: install
	mkdir -p inbox
	@echo "The collection command is $(BIN)/collection; after '. $(BIN)/activate' it is plain 'collection'."
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

# How the plugins fare on the newest Datasette 1.0 alpha, in a venv of its own. Not a
# requirement (pyproject.toml keeps datasette<1.0) and not part of `make test`: a report.
DS1 := .venv-ds1
test-datasette-1:
	$(PYTHON) -m venv $(DS1)
	$(DS1)/bin/python -m pip install --quiet -e '.[test]'
	$(DS1)/bin/python -m pip install --quiet --pre --upgrade datasette
	@$(DS1)/bin/python -c "import datasette.version as v; print('datasette', v.__version__)"
	$(DS1)/bin/python -m pytest tests/test_plugin.py -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DS1) *.egg-info .pytest_cache
