# Every target works on a fresh machine with Python >= 3.10 and pip: `make test` and `make demo`
# create .venv and install the project (with its dev extra) on first use, and are fast after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,openvino]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser"

demo: setup
	$(VENV)/bin/medxray demo

bench: setup
	$(PY) bench/model_step.py

clean:
	rm -rf $(VENV) .pytest_cache demo_out
