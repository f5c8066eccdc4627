"""The project as a user meets it: the README's Python block runs as written, the lists of hook points in
the README and in docs/behaviour.md are the table in pyqkv/points.py, and importing a source tree whose
extension is not built says what is wrong and how to build it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from pyqkv import points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_readme_python_blocks_run_as_written(capsys):
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", _read("README.md"), flags=re.S)
    assert blocks, "README.md has no ```python block"
    for i, code in enumerate(blocks):
        # Each block runs as a module of its own, as a user's script would (torch.compile looks a traced
        # function's module up in sys.modules).
        name = f"readme_block_{i}"
        module = sys.modules[name] = types.ModuleType(name)
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), module.__dict__)
        finally:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert "torch.Size([2, 4, 12, 12])" in out, out


@pytest.mark.parametrize("doc", ["README.md", "docs/behaviour.md"])
def test_documented_hook_points_are_the_table(doc):
    text = _read(doc)
    found = re.search(r"<!-- hook-points:begin -->\n(.*?)\n<!-- hook-points:end -->", text, flags=re.S)
    assert found, f"{doc}: no hook-points block"
    assert found.group(1).strip() == points.markdown_table(), (
        f"{doc}: the hook-point list differs from pyqkv/points.py; paste the output of `python -m pyqkv.points`"
    )


def test_import_without_a_built_extension_says_how_to_build(tmp_path):
    shutil.copytree(
        os.path.join(ROOT, "pyqkv"),
        tmp_path / "pyqkv",
        ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"),
    )
    # Without the editable install's finder, which would find the tree's built extension.
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        f"sys.path.insert(0, {str(tmp_path)!r}); import pyqkv"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pyqkv's native extension pyqkv._C is missing: it is not built"), res.stderr
    assert "make build" in last and "pip install --no-build-isolation -e ." in last
