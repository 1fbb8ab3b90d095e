# fastdiff: one command to set up and run the main job, one to run the tests.
#   make train   create .venv, build fastdiff (C++/CUDA extension), run `fastdiff train` on the
#                embedded dataset (a few minutes on a CPU; samples.png in the run folder)
#   make bench   same setup, then `fastdiff bench`
#   make test    same setup, then `fastdiff kernels` and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch this project is built and tested against (a CUDA build; it runs on CPU too).
TORCH_SPEC ?= torch==2.14.1
TEST_DEPS := numpy ninja tqdm pillow pytest pytest-benchmark expecttest diffusers==0.42.1
BENCH_CSV ?= benchmarks/results/latest.csv
BENCH_ARGS ?=
# Each `make train` starts a new run folder (a run folder is resumed only with --resume).
TRAIN_ARGS ?= --out runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
# nvcc's standard home; the nvcc on PATH may be a wrapper that misleads torch.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup build train bench test kernels clean

setup: $(VENV)/.deps

$(VENV)/.deps:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TEST_DEPS)
	touch $@

# The extension build follows the sources: editing csrc/ or setup.py rebuilds it.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

train: build
	$(VENV)/bin/fastdiff train $(TRAIN_ARGS)

bench: build
	$(VENV)/bin/fastdiff info
	$(VENV)/bin/fastdiff bench --csv $(BENCH_CSV) $(BENCH_ARGS)

kernels: build
	$(VENV)/bin/fastdiff kernels

test: build
	$(VENV)/bin/fastdiff info
	$(VENV)/bin/fastdiff kernels
	$(PY) -m pytest tests -q

clean:
	rm -rf build fastdiff/_C*.so fastdiff/_build_config.py *.egg-info $(VENV)/.built
