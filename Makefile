# Two commands on a fresh machine (see README):
#   make run    install everything (dependencies + Fashion-MNIST) and run the main job
#   make test   install everything and run the tests
PYTHON ?= python3
VENV   ?= .venv
CONFIG ?= configs/fashion-mnist-rded-ipc10.yaml
BIN    := $(VENV)/bin

.PHONY: run test test-fast install data browser clean

run: install data
	$(BIN)/ddpipe run $(CONFIG)

test: install data browser
	$(BIN)/python -m pytest -q --durations=25

test-fast: install  # the edit loop: no end-to-end tests; tests that need Fashion-MNIST are skipped without it
	$(BIN)/python -m pytest -q -m "not slow"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

data:
	scripts/install-data.sh

browser:
	scripts/install-browser.sh

clean:
	rm -rf $(VENV) runs .pytest_cache test-artifacts
