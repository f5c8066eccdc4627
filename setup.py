"""Build pyqkv's native ops with torch.utils.cpp_extension.

CUDA sources (csrc/cuda/*.cu) are compiled only when the installed torch has CUDA and nvcc is found;
the decision comes from the toolkit, not from a visible GPU, so a GPU-less build machine can still build
CUDA kernels. Environment switches: PYQKV_CUDA=1 forces CUDA (fails loudly if impossible), PYQKV_CUDA=0
skips it. Architectures come from TORCH_CUDA_ARCH_LIST (default below). Build with
`pip install --no-build-isolation .` so that pip never installs another torch into a build environment.
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200; extend with TORCH_CUDA_ARCH_LIST


def cuda_decision():
    """(build_cuda, reason) from torch's CUDA version, nvcc, and the PYQKV_CUDA switch."""
    switch = os.environ.get("PYQKV_CUDA", "").strip()
    if switch == "0":
        return False, "PYQKV_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if problems:
        if switch == "1":
            sys.exit("pyqkv: PYQKV_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc at {cpp_extension.CUDA_HOME}"


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


build_cuda, reason = cuda_decision()
cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) if build_cuda else []

# at::parallel_for is inlined from ATen's OpenMP backend: without -fopenmp it compiles to a serial loop.
# No -std flag: torch.utils.cpp_extension adds the standard its own headers need (C++20 for torch 2.13 and 2.14;
# torch 2.14's headers use `requires` clauses and fail under -std=c++17).
cxx_flags = ["-O3", "-fopenmp"]
extra = {"cxx": cxx_flags}
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    Extension = cpp_extension.CUDAExtension
else:
    Extension = cpp_extension.CppExtension

ops = sorted({os.path.splitext(os.path.basename(p))[0] for p in cpp_sources if "/cpu/" in p})
cuda_ops = sorted({os.path.splitext(os.path.basename(p))[0] for p in cuda_sources})
print(f"pyqkv: building CPU ops: {', '.join(ops)}")
if build_cuda:
    print(f"pyqkv: building CUDA ops: {', '.join(cuda_ops)} for {os.environ['TORCH_CUDA_ARCH_LIST']} ({reason})")
else:
    print(f"pyqkv: CUDA ops skipped: {reason}")

setup(
    ext_modules=[
        Extension(
            "pyqkv._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
