# Set-up on a fresh machine is part of every target:
#   make demo   builds and runs the main job (python -m pyqkv): installs only what the demo needs
#   make test   builds and runs the test suite (pytest): a few minutes on a 2-core machine
#   make ci     what CI runs (.ci/run): make test, then the sanitizer build, the CUDA build check and the
#               Hugging Face tests on the oldest supported transformers
# All use the virtual environment .venv: when the python3 on PATH already has a usable torch
# (2.11 - 2.15) the venv sees it (--system-site-packages); otherwise torch 2.13.0 is installed there.
# Every later install is constrained to the torch the venv has (.venv/torch-pin.txt), so no dependency
# can replace it (a new torch from the registry is a CUDA build of several GB).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP     = $(PY) -m pip install -c requirements/constraints.txt -c $(VENV)/torch-pin.txt
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
HAVE_TORCH := $(shell $(PYTHON) -c "import torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); assert (2, 11) <= v < (2, 16)" 2>/dev/null && echo yes)

.PHONY: demo test ci bench bench-model build clean cuda-build-check fuzz sanitize gpu-check emulate test-hf-oldest test-hf-all lint format

demo: $(VENV)/.built $(VENV)/.demo-deps
	$(PY) -m pyqkv

test: $(VENV)/.built $(VENV)/.test-deps
	$(PY) -m pytest -q tests

ci: test
	$(MAKE) --no-print-directory sanitize
	$(MAKE) --no-print-directory cuda-build-check
	$(MAKE) --no-print-directory test-hf-oldest

# The CUDA kernels compile, link and register, even without a GPU: builds them against a CUDA torch in
# .venv-cuda (created on first use; several GB) into build/cuda-check. See scripts/check_cuda_build.sh.
cuda-build-check:
	PYQKV_MAIN_PY=$(PY) bash scripts/check_cuda_build.sh

# The property tests' long profile: thousands of hypothesis examples of every op against the reference
# (tests/test_fuzz.py; `make test` runs its short, derandomized profile).
fuzz: $(VENV)/.built $(VENV)/.test-deps
	PYQKV_FUZZ=long $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py --hypothesis-show-statistics

# The op and Bridge tests against a build of the CPU extension with AddressSanitizer and UBSan, made in
# build/sanitize (the regular build is left alone). See scripts/sanitize.sh.
sanitize: $(VENV)/.torch $(VENV)/.test-deps
	PYQKV_MAIN_PY=$(PY) bash scripts/sanitize.sh

# The Hugging Face tests on the oldest transformers pyproject.toml admits (the GPU machine's), in a venv
# of their own that reuses this tree's build. See scripts/test_hf_oldest.sh.
test-hf-oldest: $(VENV)/.built
	PYQKV_MAIN_PY=$(PY) bash scripts/test_hf_oldest.sh

# Every causal-LM family of transformers against eager under attn_implementation="pyqkv" (tests/test_hf_interface.py;
# make test runs a fixed subset). About 17 minutes on 2 cores.
test-hf-all: $(VENV)/.built $(VENV)/.test-deps
	PYQKV_HF_ALL=1 $(PY) -m pytest -q -rfs tests/test_hf_interface.py

bench: $(VENV)/.built $(VENV)/.test-deps
	mkdir -p bench/out
	$(PY) -m pyqkv bench --compile --json bench/out/cpu.json

# A whole GPT-2-small-shaped model against HF (sdpa, eager + output_attentions) and TransformerLens's bridge
# (installed with --no-deps into build/bench-peers; see requirements/bench-peers.txt). pyqkv/bench_model.py.
bench-model: $(VENV)/.built $(VENV)/.test-deps build/bench-peers/.ready
	mkdir -p bench/out
	HF_HUB_OFFLINE=1 PYTHONPATH=build/bench-peers $(PY) -m pyqkv bench-model --json bench/out/cpu-model.json

build/bench-peers/.ready: requirements/bench-peers.txt
	$(PY) -m pip install -q --no-deps --upgrade --target build/bench-peers -r requirements/bench-peers.txt
	touch $@

build: $(VENV)/.built

# The venv and its torch; torch-pin.txt records that torch for every later install.
$(VENV)/.torch: requirements/constraints.txt
ifeq ($(HAVE_TORCH),yes)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -c requirements/constraints.txt torch==2.13.0
endif
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	touch $@

$(VENV)/.demo-deps: $(VENV)/.torch requirements/demo.txt
	$(PIP) -r requirements/demo.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.demo-deps requirements/test.txt
	$(PIP) -r requirements/test.txt
	touch $@

# --no-build-isolation: compile against the torch in the venv, never a freshly downloaded one.
$(VENV)/.built: $(VENV)/.torch requirements/build.txt $(SOURCES)
	$(PIP) -r requirements/build.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info pyqkv/*.so $(VENV)/.built

# The CUDA kernels' logic on CPU threads (tools/cuda_emulate, see its README.md): every case of
# scripts/cuda_smoke.py through the kernels compiled by g++ for simulated GPUs, against the CPU op.
emulate: $(VENV)/.built $(VENV)/.test-deps
	$(PY) tools/cuda_emulate/run.py $(EMULATE_ARGS)

# ruff for Python, clang-format for csrc (both from PyPI, in the venv).
lint: $(VENV)/.test-deps
	$(PY) -m ruff check pyqkv tests bench scripts tools
	$(PY) -m ruff format --check pyqkv tests bench scripts tools
	$(VENV)/bin/clang-format --dry-run --Werror $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: $(VENV)/.test-deps
	$(PY) -m ruff format pyqkv tests bench scripts tools
	$(PY) -m ruff check --fix pyqkv tests bench scripts tools
	$(VENV)/bin/clang-format -i $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# On a GPU machine: the CUDA smoke test, the GPU benchmark, the CUDA half of the test suite and
# compute-sanitizer memcheck/racecheck, each time-boxed, logs in $(GPU_OUT). See scripts/gpu_check.sh.
GPU_OUT ?= build/gpu-check
gpu-check: $(VENV)/.built $(VENV)/.test-deps
	OUT=$(GPU_OUT) PYTHON=$(PY) bash scripts/gpu_check.sh
