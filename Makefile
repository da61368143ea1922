# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A second interpreter with the newest zarr 3 and WITHOUT torch: proves the core is framework-free and
# works beyond the zarr that Python 3.11 can install (3.1.x).
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python) $(shell command -v python3.13))
COMPAT_VENV   := .venv-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed
# The compat lane runs the format's tests (spec, golden stores, interop, binding, hostile and bit-flipped stores,
# codecs, reader, writer); the fault-injection suites of the writer protocols run in the main lane only.
COMPAT_TESTS  := tests/test_golden.py tests/test_spec.py tests/test_codecs.py tests/test_reader.py \
                 tests/test_writer.py tests/test_verify.py tests/test_interop.py \
                 tests/test_seeded.py tests/test_hostile_stores.py \
                 tests/test_faults_binding.py tests/test_labelmap.py tests/test_bitflips.py \
                 tests/test_codecs_sampled.py tests/test_codecs_tail.py

.PHONY: install demo test test-main test-compat lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned: a CPU wheel lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[torch,test,demo,lint]"
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml
	@test -n "$(COMPAT_PYTHON)" || { echo "make test-compat: no Python 3.13 found (set COMPAT_PYTHON)"; exit 1; }
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade "zarr>=3.2,<4" -e ".[test]"
	touch $(COMPAT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: test-main test-compat

test-main: lint $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 tests

lint: $(STAMP)
	$(PY) -m ruff check fkdstore tests benchmarks examples
	$(PY) -m mypy

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -c "import zarr, sys; print('compat lane: Python', sys.version.split()[0], 'zarr', zarr.__version__, '(no torch)')"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 $(wildcard $(COMPAT_TESTS))

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
