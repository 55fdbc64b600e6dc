# `make test` and `make demo` set up their own environment first (.venv), so both work from a fresh clone on a
# machine that has only python3. torch is installed pinned, before anything else: an unpinned torch requirement
# would pull several GB of CUDA wheels, while torch==2.13.0 is the CPU build here.

VENV          := .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
RUFF          := $(VENV)/bin/ruff
STAMP         := $(VENV)/install.stamp
TORCH_VERSION := 2.13.0
LINT_DIRS     := $(wildcard hf_ddpm tests training examples benchmarks)

.PHONY: venv lint test test-slow demo clean distclean

venv: $(STAMP)

# Reinstalls whenever pyproject.toml changes; the stamp lives inside .venv, so deleting .venv starts over.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV) || { echo "python3 -m venv failed: on Debian/Ubuntu install python3-venv" >&2; exit 1; }
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	@touch $@

lint: venv
	$(RUFF) check $(LINT_DIRS)
	$(RUFF) format --check $(LINT_DIRS)

# Fast tests only: pyproject.toml's pytest addopts deselect those marked slow.
test: lint
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# Trains the default model (digits-16-tiny on scikit-learn's bundled digits: training/train.py's defaults) on the
# CPU and writes outputs/demo: the pipeline (EMA weights), samples.png (64 samples, 250 respaced steps), logs and
# checkpoints. A sample grid every 30 epochs (not 10): each costs as much as ~100 training steps.
# One thread: on two cores a second OpenMP thread loses more to any other load than it gains.
demo: venv
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 1 \
		--mixed_precision no --dynamo_backend no \
		training/train.py --output_dir outputs/demo --overwrite_output_dir --eval_batch_size 64 --save_images_epochs 30
	@echo "samples: outputs/demo/samples.png; pipeline: HFDDPMPipeline.from_pretrained(\"outputs/demo\")"

# Benchmarks against diffusers on this machine (benchmarks/run.py): sampling, training, quality (bits/dim, FID), FID
# against model evaluations per scheduler, evaluation throughput, the data path, the allocator's CPU floor, the
# likelihood estimators and, where CUDA is available, the GPU section; writes benchmarks/results/ (JSON, RESULTS.md,
# plots). About three hours on two CPU cores; `make bench BENCH_ARGS=--quick` takes well under an hour.
BENCH_STAMP := $(VENV)/bench.stamp
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -e ".[dev,bench]"
	@touch $@

.PHONY: bench
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

# Also removes the environment (the next `make test` rebuilds it, torch included).
distclean: clean
	rm -rf $(VENV)
