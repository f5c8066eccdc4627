#!/usr/bin/env bash
# CUDA build check for machines without a GPU (CI, the dev boxes): proves that csrc/cuda/*.cu compile,
# link and register a CUDA kernel for every pyqkv op. Nothing is run on a GPU.
#
# The project's own venv has a CPU torch, which cannot build CUDA code, so this builds in a second venv,
# .venv-cuda-<version>, holding torch==2.15.0 (the current release; PYQKV_CUDA_CHECK_TORCH=2.14.0 checks
# another) from PyPI: its Linux wheel is a CUDA 13.0 build whose nvidia-* packages match the local nvcc
# 13.0 and supply the CUDA library headers (cuBLAS, cuSPARSE, ...) that a bare nvcc install lacks; CPATH
# points nvcc and g++ at them. One version per run keeps CI time down (a build is several minutes on 2
# cores): the newest, because code guarded by TORCH_VERSION_MINOR for older releases was written from
# their headers (shared/research/gpu-dispatch.md §2), while the newest is where new breakage shows.
# pip's machine-wide constraints may cap torch below the current release (/etc/xdg/pip here): this venv's
# installs replace them (PIP_CONSTRAINT) with its own pin only.
#
# The build goes to build/cuda-check/ (never the source tree), so the CPU build's pyqkv/_C*.so is left
# alone; the check imports the built package from there.
#
# Skips (exit 0, with the reason) when PYQKV_CUDA_CHECK=0 or when nvcc is missing. When the python in
# $PYQKV_MAIN_PY (the Makefile passes the project venv) already has a CUDA torch, that build compiled
# the CUDA sources itself: the check then inspects it instead of building a second one (a GPU machine
# needs no network for `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${PYQKV_CUDA_CHECK_TORCH:-2.15.0}
VENV=$ROOT/.venv-cuda-$TORCH_VERSION
TORCH_PIN=torch==$TORCH_VERSION
OUT=$ROOT/build/cuda-check
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}  # one arch keeps the CI build short; setup.py's default has more

if [ "${PYQKV_CUDA_CHECK:-1}" = "0" ]; then
  echo "cuda-build-check: skipped (PYQKV_CUDA_CHECK=0)"
  exit 0
fi

# The assertion, shared by both paths: every op of the schema (csrc/ops.cpp) with a CPU kernel has a CUDA
# kernel too (ops registered once for every device, as composites, need none). Read from the dispatcher, so
# a new op is checked without being listed here.
CHECK_PY="
import sys, torch, pyqkv
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('pyqkv::'))
ops = [op for op in ops if has('pyqkv::' + op, 'CPU')]
if 'attention' not in ops:
    sys.exit(f'cuda-build-check: FAILED: the schema has no pyqkv::attention CPU kernel ({ops})')
missing = [op for op in ops if not has('pyqkv::' + op, 'CUDA')]
where = pyqkv._C.__file__
if missing:
    sys.exit(f'cuda-build-check: FAILED: no CUDA kernel for {missing} in {where}')
print(f'cuda-build-check: ok: CUDA kernels registered for {len(ops)} ops ({\", \".join(ops)}) '
      f'with torch {torch.__version__} (CUDA {torch.version.cuda}) from {where}')
"

HAVE_NVCC=yes
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    # torch derives CUDA_HOME from nvcc's path, which is wrong when nvcc is a wrapper script (here
    # /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc, giving /usr/local without
    # lib64/libcudart). nvcc itself reports its toolkit root.
    CUDA_HOME=$(cd /tmp && nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    CUDA_HOME=$(cd "${CUDA_HOME:-/usr/local/cuda}" && pwd -P)
    export CUDA_HOME
  else
    HAVE_NVCC=no
  fi
fi
if [ "$HAVE_NVCC" = no ]; then
  echo "cuda-build-check: skipped (nvcc not found and CUDA_HOME unset: CUDA sources cannot be compiled here)"
  exit 0
fi

if [ -n "${PYQKV_MAIN_PY:-}" ] && "$PYQKV_MAIN_PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "cuda-build-check: $PYQKV_MAIN_PY has a CUDA torch: checking the project build itself"
  (cd "$ROOT" && "$PYQKV_MAIN_PY" -c "$CHECK_PY")
  exit 0
fi

t0=$SECONDS
if [ ! -f "$VENV/.ready" ]; then
  echo "cuda-build-check: creating $VENV with $TORCH_PIN (first run only; downloads the CUDA 13 wheels)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # The constraint pins torch for every package resolved in this install, so nothing can swap it.
  echo "$TORCH_PIN" > "$VENV/constraints.txt"
  # (grep drops the noise of pip configs whose local find-links folders do not hold every package)
  PIP_CONSTRAINT="$VENV/constraints.txt" "$VENV/bin/python" -m pip install -q "$TORCH_PIN" setuptools wheel ninja einops \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$VENV/.ready"
fi
t_install=$((SECONDS - t0))

SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CUDA_INC=$SITE/nvidia/cu13/include
if [ ! -f "$CUDA_INC/cublas_v2.h" ]; then
  echo "cuda-build-check: FAILED: expected the CUDA 13 library headers at $CUDA_INC (cublas_v2.h missing);" \
       "has the torch wheel's layout changed? Found: $(ls -d "$SITE"/nvidia/*/ 2>/dev/null | tr '\n' ' ')" >&2
  exit 1
fi

mkdir -p "$OUT"
t1=$SECONDS
# --force: setuptools only compares .cu/.cpp timestamps (not headers) with the .so; ninja still
# recompiles only what changed, from its own dependency files, so a re-run costs one link.
(
  export PATH="$VENV/bin:$PATH"  # torch finds ninja on PATH
  export CPATH="$CUDA_INC${CPATH:+:$CPATH}"
  export PYQKV_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS"
  # Python's own CFLAGS carry -g, and debug info for the torch headers costs ~40% of g++ time. A CFLAGS
  # variable replaces them (setuptools), so pass them on with -g0 last.
  export CFLAGS="${CFLAGS:-$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('CFLAGS') or '')")} -g0"
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  "$VENV/bin/python" setup.py -q build_ext --force --build-temp "$OUT/temp" --build-lib "$OUT/lib"
) > "$OUT.log" 2>&1 || {
  tail -n 80 "$OUT.log" >&2
  echo "cuda-build-check: FAILED: CUDA build failed (full log: $OUT.log)" >&2
  exit 1
}
t_build=$((SECONDS - t1))
# A clean CUDA build is part of the check: nvcc/ptxas/g++ warnings from our sources fail it.
if grep -E "(csrc/.*(warning|error))|(ptxas.*(warning|error))" "$OUT.log" >&2; then
  echo "cuda-build-check: FAILED: the CUDA build printed warnings (full log: $OUT.log)" >&2
  exit 1
fi

# Import the freshly built package: the Python sources beside the new .so, first on the path, run from
# that folder so that the repo's ./pyqkv (with the CPU .so) cannot shadow it.
rm -f "$OUT"/lib/pyqkv/*.py
cp "$ROOT"/pyqkv/*.py "$OUT/lib/pyqkv/"
# (-W: this venv has no numpy, and torch says so on import; nothing here needs it)
(cd "$OUT/lib" && PYTHONPATH="$OUT/lib" "$VENV/bin/python" -W "ignore:Failed to initialize NumPy" -c "$CHECK_PY")
echo "cuda-build-check: venv ${t_install}s, build ${t_build}s (sm_${ARCHS//./}), total $((SECONDS - t0))s"
