#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU extension: builds pyqkv's C++ ops with
# -fsanitize=address,undefined into build/sanitize/ (never the source tree: the pyqkv/_C*.so there is the
# one everybody's tests and benchmarks load) and runs the op and Bridge tests against that build.
#
# Exit status: 0 when every test passes with no sanitizer report; nonzero when a test fails or a sanitizer
# fires (an out-of-bounds access, a use after free, undefined behaviour: each aborts the test process).
#
#   make sanitize                       # or: bash scripts/sanitize.sh [extra pytest arguments]
#   PYQKV_SANITIZE_TESTS="tests/test_ops.py" make sanitize
#
# The build is incremental: --force because setuptools compares only .cpp timestamps (not headers) with
# the .so; ninja then recompiles only the sources whose dependencies changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYQKV_MAIN_PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/sanitize
CXX=${CXX:-g++}
TESTS=${PYQKV_SANITIZE_TESTS:-"tests/test_ops.py tests/test_rotary.py tests/test_bridge.py tests/test_bridge_positions.py tests/test_bridge_fastpath.py tests/test_bridge_oracle.py tests/test_hooks.py tests/test_bad_input.py tests/test_fuzz.py tests/test_decode_soak.py tests/test_pattern_slice.py"}

start=$(date +%s)
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "sanitize: building the CPU extension with $SAN into $OUT"
# CFLAGS / LDFLAGS reach every compile and the link (setup.py's -O3 -fopenmp still apply: the sanitized
# code is the optimized code that ships). PYQKV_CUDA=0: CUDA sources need nvcc's own sanitizer, not this.
mkdir -p "$OUT"
PYQKV_CUDA=0 CXX="$CXX" CFLAGS="$SAN" LDFLAGS="-fsanitize=address,undefined" \
  "$PY" setup.py -q build_ext --force --build-temp "$OUT/temp" --build-lib "$OUT/lib" > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; echo "sanitize: FAILED: the sanitized build failed (log: $OUT/build.log)"; exit 1; }
built=$(date +%s)

# The package under test: this tree's Python files with the sanitized _C next to them.
PKG=$OUT/pkg
rm -rf "$PKG"
mkdir -p "$PKG"
cp -r pyqkv "$PKG/pyqkv"
rm -rf "$PKG"/pyqkv/_C*.so "$PKG"/pyqkv/__pycache__ "$PKG"/pyqkv/*/__pycache__
cp "$OUT"/lib/pyqkv/_C*.so "$PKG/pyqkv/"

# Python itself is not instrumented, so the ASan runtime must be loaded before anything else; and with
# it libstdc++, which python does not link: ASan looks up the real __cxa_throw when it starts, and
# without it the first C++ exception (every argument check that raises) aborts the process.
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
  [ -f "$lib" ] || { echo "sanitize: FAILED: $lib not found for $CXX"; exit 1; }
done
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# detect_leaks=0: CPython and torch keep process-lifetime allocations (interned objects, the op registry,
# thread pools) that they never free by design; LeakSanitizer would report thousands of them at exit,
# none ours. Out-of-bounds and use-after-free detection is unaffected.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:print_summary=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
export PYTHONPATH=$PKG
export PYQKV_FUZZ=${PYQKV_FUZZ:-ci}

# -P: no script or current directory on sys.path, so `import pyqkv` finds $PKG, not ./pyqkv.
"$PY" -P -c "
import sys, pyqkv
where = pyqkv._C.__file__
if not where.startswith('$PKG/'):
    sys.exit(f'sanitize: FAILED: imported pyqkv._C from {where}, not the sanitized build in $PKG')
print(f'sanitize: testing {where}')
"
status=0
# --capture=sys: pytest's default capture redirects file descriptor 2 into a temporary file, which an
# aborting process never prints; a sanitizer report goes to fd 2 and must reach the terminal.
# shellcheck disable=SC2086
"$PY" -P -m pytest -q -p no:cacheprovider --capture=sys $TESTS "$@" || status=$?
end=$(date +%s)
if [ "$status" -ne 0 ]; then
  echo "sanitize: FAILED (pytest exit status $status; a sanitizer report above means memory or UB trouble)"
  exit "$status"
fi
echo "sanitize: ok: no AddressSanitizer or UndefinedBehaviorSanitizer report; build $((built - start)) s, tests $((end - built)) s"
