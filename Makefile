# Two commands do all the set-up on a fresh machine:
#   make demo   builds and runs the main job (python -m pyqkv)
#   make test   builds and runs the test suite
# Both use the virtual environment .venv: when the python3 on PATH already has a usable torch
# (2.11 - 2.14) the venv sees it (--system-site-packages); otherwise torch 2.13.0 is installed there.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -c requirements/constraints.txt
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
HAVE_TORCH := $(shell $(PYTHON) -c "import torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); assert (2, 11) <= v < (2, 15)" 2>/dev/null && echo yes)

.PHONY: demo test bench build clean cuda-build-check fuzz sanitize gpu-check

demo: $(VENV)/.built
	$(PY) -m pyqkv

test: $(VENV)/.built
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory sanitize
	$(MAKE) --no-print-directory cuda-build-check

# The CUDA kernels compile, link and register, even without a GPU: builds them against a CUDA torch in
# .venv-cuda (created on first use) into build/cuda-check. See scripts/check_cuda_build.sh.
cuda-build-check:
	PYQKV_MAIN_PY=$(PY) bash scripts/check_cuda_build.sh

# The property tests' long profile: thousands of hypothesis examples of every op against the reference
# (tests/test_fuzz.py; `make test` runs its short, derandomized profile).
fuzz: $(VENV)/.built
	PYQKV_FUZZ=long $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py --hypothesis-show-statistics

# The op and Bridge tests against a build of the CPU extension with AddressSanitizer and UBSan, made in
# build/sanitize (the regular build is left alone). See scripts/sanitize.sh.
sanitize: $(VENV)/.ready
	PYQKV_MAIN_PY=$(PY) bash scripts/sanitize.sh

bench: $(VENV)/.built
	mkdir -p bench/out
	$(PY) -m pyqkv bench --compile --json bench/out/cpu.json

build: $(VENV)/.built

$(VENV)/.ready: requirements/test.txt requirements/constraints.txt
ifeq ($(HAVE_TORCH),yes)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
endif
	$(PY) -c "import pytest, hypothesis, einops, transformers, ninja, matplotlib" 2>/dev/null || $(PIP) -r requirements/test.txt
	touch $@

# --no-build-isolation: compile against the torch in the venv, never a freshly downloaded one.
$(VENV)/.built: $(VENV)/.ready $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info pyqkv/*.so $(VENV)/.built

# On a GPU machine: the CUDA smoke test, the GPU benchmark, the CUDA half of the test suite and
# compute-sanitizer memcheck/racecheck, each time-boxed, logs in $(GPU_OUT). See scripts/gpu_check.sh.
GPU_OUT ?= build/gpu-check
gpu-check: $(VENV)/.built
	OUT=$(GPU_OUT) PYTHON=$(PY) bash scripts/gpu_check.sh
