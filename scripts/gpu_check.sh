#!/usr/bin/env bash
# Everything a GPU session checks, in one command (GPU time is short; a machine start costs minutes):
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# 1. the extension: uses a pyqkv/_C*.so built for this python and torch if one is there and registers
#    CUDA kernels (a build made elsewhere for the same torch and python), else builds here with nvcc;
# 2. scripts/cuda_smoke.py: every CUDA op against pyqkv/reference.py on the tricky cases, with the
#    backend the plan chooses (FlashAttention-2 where it applies), then again with each own kernel
#    forced (own_tc, own_decode, own_simt; the cases a forced kernel refuses are skipped);
# 3. bench/gpu_attention.py: prefill / decode / pattern / per-backend rows against PyTorch (the issue's
#    benchmark table) with its "summary" in $OUT/bench.json;
# 4. the test suite with CUDA (pytest -n 8 when pytest-xdist is there);
# 5. compute-sanitizer memcheck over the smoke cases (the FlashAttention-2 path and the own kernels'
#    window / softcap / bool-mask cases among them), then racecheck over a subset;
# 6. model: pyqkv/bench_model.py on the GPU (a Pythia-1.4B-shaped GPT-NeoX and a Llama-shaped GQA model,
#    bf16: prefill, every layer's pattern against HF eager, generate with and without a hook_z ablation on
#    every layer), its "summary" in $OUT/model.json; and tests/test_placement.py's GPU + CPU device map.
# The default limits add up to about 11 minutes after the build check: with 15 minutes of device time
# (starts included) pick stages, e.g. STAGES="smoke bench tests model" first.
# Each stage has its own time limit (seconds, overridable: T_SMOKE, T_BENCH, T_TESTS, T_MEMCHECK,
# T_RACECHECK), so a slow stage cannot eat the others; logs go to $OUT, a summary is printed last.
# STAGES picks stages (default: all, in the order above); TEST_K is pytest's -k (default "cuda": the CPU
# cases run in CI anyway); RACE_K lists the smoke-case names racecheck runs (comma-separated substrings).
# pytest is stopped with SIGINT at its limit, so it still prints which tests failed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyqkv-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$SECONDS
stage() { echo "=== $1 (at $((SECONDS - T0)) s)"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

HAS_CUDA_OPS="import torch, pyqkv, sys; sys.exit(not torch._C._dispatch_has_kernel_for_dispatch_key('pyqkv::attention', 'CUDA'))"
if $PY -c "$HAS_CUDA_OPS" 2>"$OUT/import.log"; then
  echo "extension: using the carried build $(ls pyqkv/_C*.so | tr '\n' ' ')"
else
  tail -n 3 "$OUT/import.log"
  stage "build (no usable carried .so)"
  rm -f pyqkv/_C*.so
  MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 PYQKV_CUDA=1 $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  $PY -c "$HAS_CUDA_OPS" || { echo "built, but no CUDA kernel registered"; exit 1; }
fi

STAGES=${STAGES:-smoke bench tests memcheck racecheck model}
want() { [[ " $STAGES " == *" $1 "* ]]; }

if want smoke; then
stage "smoke"
timeout "${T_SMOKE:-60}" $PY scripts/cuda_smoke.py >"$OUT/smoke.log" 2>&1
echo "smoke rc=$?"
for b in ${SMOKE_BACKENDS:-own_tc own_decode own_simt}; do
  timeout "${T_SMOKE_OWN:-20}" $PY scripts/cuda_smoke.py -k "${SMOKE_OWN_K:-}" --backend "$b" >"$OUT/smoke-$b.log" 2>&1
  echo "smoke --backend $b rc=$?"
done
fi

if want bench; then
stage "bench"
timeout "${T_BENCH:-170}" $PY bench/gpu_attention.py --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench rc=$?"
fi

if want tests; then
stage "tests"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${XDIST_N:-8}"
PLUGINS=""
$PY -c "import pytest_timeout" 2>/dev/null && PLUGINS="--timeout 120"
timeout -s INT -k 20 "${T_TESTS:-150}" $PY -m pytest -q -p no:cacheprovider $XDIST $PLUGINS -rfE --tb=short \
  -k "${TEST_K:-cuda}" tests >"$OUT/pytest.log" 2>&1
echo "tests rc=$?"
fi

if want memcheck; then
stage "memcheck"
timeout "${T_MEMCHECK:-70}" compute-sanitizer --tool memcheck --print-limit 20 $PY scripts/cuda_smoke.py \
  >"$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"
fi

if want racecheck; then
stage "racecheck"
: >"$OUT/racecheck.log"
IFS=, read -ra RACE_CASES <<<"${RACE_K:-window,softcap}"
for k in "${RACE_CASES[@]}"; do
  timeout "${T_RACECHECK:-30}" compute-sanitizer --tool racecheck --print-limit 20 $PY scripts/cuda_smoke.py -k "$k" \
    >>"$OUT/racecheck.log" 2>&1
  echo "racecheck -k '$k' rc=$?"
done
fi

if want model; then
stage "model"
timeout "${T_MODEL:-120}" $PY -m pyqkv bench-model --device cuda --dtype bfloat16 --shape pythia-1.4b llama-gqa-1b \
  --batch 8 --seq 2048 --reps 3 --generate 256 --generate-batch 1 16 --json "$OUT/model.json" >"$OUT/model.log" 2>&1
echo "bench-model rc=$?"
timeout "${T_DEVICEMAP:-40}" $PY -m pytest -q -p no:cacheprovider -rfE tests/test_placement.py \
  -k device_map_split_between_cuda_and_cpu >"$OUT/devicemap.log" 2>&1
echo "device map rc=$?"
fi

stage "summary"
echo "--- smoke: failures and the last line"
for f in "$OUT"/smoke*.log; do
  echo "$(basename "$f"):"
  grep -E "^FAIL" "$f" 2>/dev/null | head -n 30
  tail -n 1 "$f" 2>/dev/null
done
echo "--- bench"
tail -n 40 "$OUT/bench.log" 2>/dev/null
echo "--- tests"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" 2>/dev/null | cut -c 1-300 | head -n 40
tail -n 2 "$OUT/pytest.log" 2>/dev/null
echo "--- model"
grep -E "summary|generate|rows agree" "$OUT/model.log" 2>/dev/null | head -n 20
tail -n 2 "$OUT/devicemap.log" 2>/dev/null
echo "--- memcheck"
grep -E "ERROR SUMMARY|Invalid|FAIL|passed" "$OUT/memcheck.log" 2>/dev/null | head -n 20
echo "--- racecheck"
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|FAIL|passed" "$OUT/racecheck.log" 2>/dev/null | head -n 20
echo "total $((SECONDS - T0)) s"
