# Every target works on a fresh machine with Python >= 3.10 and pip: `make test` and `make demo`
# create .venv and install the project (with its dev extra) on first use, and are fast after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps browser-deps lint test test-fast demo bench fuzz clean

setup: $(STAMP)

# Debian packages the tests drive as real parts (never downloaded binaries): chromium for the browser
# test, orthanc (a PACS) and dcmtk (storescu/findscu) for the DICOM node tests, dicom3tools
# (dciodvfy) to validate every DICOM object the tests write, openssl (the DICOM TLS tests' certificates);
# libopenjp2-7 (OpenJPEG, used through glymur) decodes JPEG 2000 at a reduced resolution level for the scorer.
# slurm-wlm (slurmctld, slurmd, sbatch...) and munge (munged): tests/test_slurm.py runs a one-machine SLURM
# cluster in a temporary folder to test the scheduler recipes (no system service is started or needed).
SYSTEM_TOOLS := chromium:chromium Orthanc:orthanc storescu:dcmtk dciodvfy:dicom3tools openssl:openssl slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; done; \
	  /sbin/ldconfig -p 2>/dev/null | grep -q 'libopenjp2\.so\.7' || missing="$$missing libopenjp2-7"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

browser-deps: system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,openvino]'
	touch $(STAMP)

# Lint (ruff: pycodestyle, pyflakes, bugbear, import order), format check, and mypy on the typed core
# (the model, the DICOM reader and writers, maps, inference, the checkpoint metadata, the input contract, the CLI).
TYPED := medxray/models medxray/dicom medxray/cam.py medxray/inference.py medxray/backends medxray/checkpoint.py \
         medxray/checkpoint_meta.py medxray/modelinput.py medxray/display.py medxray/overlay.py medxray/cli \
         medxray/scoring/messages.py medxray/scoring/mapstreams.py medxray/evaluation/stages.py \
         medxray/mapmethods.py medxray/precision.py medxray/scoreoptions.py medxray/lazyexports.py \
         medxray/pacs/queuer.py medxray/scoring/warm.py
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED)

# pytest prints the 25 slowest tests (pyproject addopts) so a creeping suite is seen.
test: setup system-deps lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser"

demo: setup
	$(VENV)/bin/medxray demo

# Benchmarks are not tests: each prints its ratio against a peer measured in the same run.
bench: setup system-deps
	for b in model_step train_step loader score_dicom int8_layers maps pacs_push localisation; do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

# Coverage-guided fuzzing of the DICOM reader and the image decoder (atheris), and mutation fuzzing of
# the DICOM node's network path (malformed associations/PDUs sent to a running serve-dicom); not part of `make test`.
# FUZZ_SECONDS is the total budget, split between the two harnesses; escaped inputs land in
# tests/data/fuzz-escapes/ and are replayed by the tests from then on.
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) -m pip install --quiet -e '.[fuzz]'
	RUST_BACKTRACE=0 $(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache demo_out
