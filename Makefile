# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.codejepa-installed
DEMO_DIR ?= $(HOME)/.cache/codejepa/demo
# Passed in the environment, not pasted into the recipe: a folder name with spaces or shell
# characters stays one name.
export DEMO_DIR

.PHONY: test demo install clean

install: $(STAMP)

# torch is installed pinned first: an unpinned torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash bench/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
