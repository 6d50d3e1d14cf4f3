# kbvq: `make demo` installs and runs the pipeline on the built-in test-bed; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KBVQ   := $(VENV)/bin/kbvq

.PHONY: install demo testbed-tables $(addprefix table,1 2 3 4 5 7 8 14 15) test test-fast testbed testbed-mini bench bench-calibrate bench-vq bench-stages bench-decode bench-distributed plus-ablation bench-scale clean

install: $(VENV)/.installed

# torch is installed first, pinned, only where none is present: GPU users keep their CUDA build,
# and on a fresh CPU machine an unpinned install would pull a 5 GB CUDA build.
# Each step says what it does, and the long installs show pip's own download progress (minutes on a
# fresh machine: torch alone is a large download).
$(VENV)/.installed: pyproject.toml
	@echo "== install 1/4: the virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== install 2/4: upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "== install 3/4: torch 2.13.0 (CPU), only if no torch is installed yet"
	$(PY) -c "import torch" 2>/dev/null && echo "torch is already installed: kept" || $(PY) -m pip install --progress-bar on torch==2.13.0
	@echo "== install 4/4: kbvq and its dependencies (transformers, datasets, faiss-cpu, lm-eval, ...)"
	$(PY) -m pip install --progress-bar on -e ".[test,eval]"
	@echo "== installed into $(VENV)"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

testbed: install
	$(KBVQ) testbed --out testbed --variant full

testbed-mini: install
	$(KBVQ) testbed --out testbed-mini --variant mini

# Table 1 of the paper on the mini test-bed: FP16, RTN, GPTQ, VQ and KBVQ at 2 and 3 bits.
demo: install testbed-mini
	$(KBVQ) table 1 --model testbed-mini

# make table1 MODEL=qwen15-moe (table2, table3, table4, table7, table8, table14, table15): run every
# recipe the table needs (recipes/MODEL/), resuming whatever is done, and print it beside the paper.
MODEL ?= testbed
TABLES := 1 2 3 4 5 7 8 14 15
$(addprefix table,$(TABLES)): table%: install
	$(KBVQ) table $* --model $(MODEL) --markdown runs/$(MODEL)/table$*.md

# Every table on the trained test-bed, on the CPU (TESTBED_MODEL=testbed-mini for the quick one).
TESTBED_MODEL ?= testbed
testbed-tables: install $(TESTBED_MODEL)
	for t in $(TABLES); do $(KBVQ) table $$t --model $(TESTBED_MODEL) --markdown runs/$(TESTBED_MODEL)/table$$t.md || exit 1; done

bench: bench-calibrate bench-vq bench-stages bench-decode

bench-calibrate: install
	$(PY) benchmarks/bench_calibrate.py

bench-vq: install
	$(PY) benchmarks/bench_vq.py

bench-stages: install
	$(PY) benchmarks/bench_stages.py

# calibrate and vq at world sizes 1 and 2 under torchrun (gloo, CPU), side by side; BENCH_DISTRIBUTED_ARGS=
# "--ranks 4 --threads 4 --device cuda" on a machine with 4 GPUs, for example.
bench-distributed: install
	$(PY) benchmarks/bench_distributed.py $(BENCH_DISTRIBUTED_ARGS)

# Decode/prefill speed and memory of packed models against their originals (CPU); the models it builds and
# quantizes are cached in .cache/bench-decode/. BENCH_DECODE_ARGS="--threads 2 --repeats 5" for example.
bench-decode: install testbed-mini
	$(PY) benchmarks/bench_decode.py $(BENCH_DECODE_ARGS)

# What each part of kbvq-w2-plus adds to the paper's 2-bit KBVQ, mean and spread over k-means seeds 0,1,2
# (`kbvq table plus`, benchmarks/plus_ablation.py); resumable. The whole experiment of issue 15:
# PLUS_ARGS="--testbed testbed-mini --testbed testbed --testbed testbed-upcycled --seeds 0,1,2"
# (build those first: make testbed, kbvq testbed --variant upcycled --out testbed-upcycled).
plus-ablation: install testbed-mini
	$(PY) benchmarks/plus_ablation.py $(PLUS_ARGS)

# Every stage at the paper models' real dimensions (one layer each, random bf16 weights, CPU): seconds per
# layer, peak RSS, directory bytes, bits, and a projected A6000 run; checkpoints cached in .cache/bench-scale/.
# Not in `bench` or CI (tens of minutes). BENCH_SCALE_ARGS="--models qwen15-moe" for one model.
bench-scale: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) benchmarks/bench_scale.py $(BENCH_SCALE_ARGS)

clean:
	rm -rf runs .pytest_cache
