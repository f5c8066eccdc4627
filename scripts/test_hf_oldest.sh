#!/usr/bin/env bash
# The Hugging Face tests on the oldest transformers that pyproject.toml admits (5.17.0, the GPU machine's),
# beside the newest that the project venv tests with. transformers and the few packages it needs beyond the
# venv's (requirements/hf-oldest.txt, installed without dependencies) go into build/hf-oldest/site, first on
# the path; the package under test is this tree, with its built extension.
#
#   make test-hf-oldest          # or: bash scripts/test_hf_oldest.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYQKV_MAIN_PY:-$ROOT/.venv/bin/python}
OLDEST=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
SITE=$ROOT/build/hf-oldest/site
TESTS=${PYQKV_HF_TESTS:-"tests/test_hf.py tests/test_hf_families.py tests/test_placement.py tests/test_tensor_parallel.py tests/test_hf_interface.py tests/test_hf_cache_window.py tests/test_checkpoint.py tests/test_compile_hooks.py tests/test_tl_contract.py"}

REQS=requirements/hf-oldest.txt
if ! grep -q "^transformers==$OLDEST\$" "$REQS"; then
  echo "test-hf-oldest: FAILED: pyproject.toml admits transformers>=$OLDEST but $REQS pins another" >&2
  exit 1
fi
STAMP=$SITE/.installed-$(sha256sum "$REQS" | cut -c1-16)
if [ ! -f "$STAMP" ]; then
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-deps --target "$SITE" -r "$REQS" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$STAMP"
fi
got=$(PYTHONPATH="$SITE:$ROOT" "$PY" -c "import transformers; print(transformers.__version__)")
if [ "$got" != "$OLDEST" ]; then
  echo "test-hf-oldest: FAILED: expected transformers $OLDEST on the path, imported $got" >&2
  exit 1
fi
echo "test-hf-oldest: transformers $got ($SITE), pyqkv from $ROOT"
# transformers checks its dependencies' versions on import: a mismatch fails here, loudly.
PYTHONPATH="$SITE:$ROOT" "$PY" -m pytest -q -p no:cacheprovider $TESTS "$@"
