# kbvq: `make demo` installs and runs the pipeline on the built-in test-bed; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KBVQ   := $(VENV)/bin/kbvq

.PHONY: install demo test test-fast testbed testbed-mini bench bench-calibrate bench-vq bench-stages clean

install: $(VENV)/.installed

# torch is installed first, pinned, only where none is present: GPU users keep their CUDA build,
# and on a fresh CPU machine an unpinned install would pull a 5 GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,eval]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

testbed: install
	$(KBVQ) testbed --out testbed --variant full

testbed-mini: install
	$(KBVQ) testbed --out testbed-mini --variant mini

demo: install testbed-mini
	$(KBVQ) run --recipe recipes/testbed-mini-w2.yaml

bench: bench-calibrate bench-vq bench-stages

bench-calibrate: install
	$(PY) benchmarks/bench_calibrate.py

bench-vq: install
	$(PY) benchmarks/bench_vq.py

bench-stages: install
	$(PY) benchmarks/bench_stages.py

clean:
	rm -rf runs .pytest_cache
