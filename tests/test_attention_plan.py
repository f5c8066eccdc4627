"""The attention backends as data (csrc/attention_plan.h): which backend pyqkv.ops.attention runs for
an input, and why the others refuse it, on meta tensors with a CUDA device capability given. So the
whole selection table is tested on a machine without a GPU. The plan is a pure function of shapes,
strides, dtypes, flags, the device capability and the torch build; nothing here runs attention on a
GPU.

Notation: B batch, S query positions, K key positions, H query heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from pyqkv import ops

H200 = (9, 0)
bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
ALL = set(ops.BACKENDS)
CUDA_BACKENDS = ALL - {"cpu"}


def views(B, S, K, H, Hkv, Dh, dtype, device="meta"):
    """q, k, v as the Bridge passes them: column blocks of one fused projection [B, L, (H + 2 Hkv) Dh]
    (two when K != S; a head-major cache view for the decode shapes)."""
    n = (H + 2 * Hkv) * Dh
    fused = torch.randn(B, S, n, dtype=dtype, device=device)
    q = fused[..., : H * Dh].unflatten(-1, (H, Dh))
    if K == S:
        k = fused[..., H * Dh : (H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
        v = fused[..., (H + Hkv) * Dh :].unflatten(-1, (Hkv, Dh))
    else:  # KVCache storage [B, Hkv, capacity, Dh] viewed as [B, K, Hkv, Dh]
        cache = torch.randn(2, B, Hkv, K + 64, Dh, dtype=dtype, device=device)
        k, v = (c[:, :, :K].transpose(1, 2) for c in cache)
    return q, k, v


def plan(B=1, S=1024, K=None, H=32, Hkv=8, Dh=128, dtype=bf16, *, cap=H200, qkv=None, **kw):
    K = S if K is None else K
    q, k, v = qkv if qkv is not None else views(B, S, K, H, Hkv, Dh, dtype)
    kw.setdefault("causal", True)
    kw.setdefault("torch_version", (2, 14))
    kw.setdefault("flash_available", True)
    p = ops.attention_plan(q, k, v, scale=Dh**-0.5, device_capability=cap, **kw)
    # The chosen backend refuses nothing; each refusing backend (every backend is asked) says why.
    assert p.backend is None or p.backend not in p.refusals
    for name, reasons in p.refusals.items():
        assert reasons and all(isinstance(r, str) and r for r in reasons), name
    return p


def reasons(p, backend) -> str:
    return " | ".join(p.refusals.get(backend, []))


# (id, plan kwargs, expected backend, {backend: fragment of one of its reasons})
TABLE = [
    ("prefill-bf16-gqa-causal", {}, "flash", {"mem_efficient": "not wired", "cudnn": "opt-in only"}),
    ("prefill-fp16-mha", dict(H=32, Hkv=32, dtype=f16), "flash", {}),
    ("prefill-non-causal-K>S", dict(S=17, K=40, causal=False), "flash", {"cudnn": "not wired"}),
    ("decode-bf16-S1-K4096", dict(S=1, K=4096), "flash", {}),
    ("decode-MQA-R8", dict(S=1, K=2048, H=8, Hkv=1, Dh=64), "flash", {}),
    (
        "decode-GQA-R16-flash-off",
        dict(S=1, K=2048, H=16, Hkv=1, Dh=64, flash_available=False),
        "own_simt",
        {"own_decode": "not a decode shape", "own_tc": "a decode shape"},
    ),
    ("decode-MQA-R8-flash-off", dict(S=1, K=2048, H=8, Hkv=1, Dh=64, flash_available=False), "own_decode", {}),
    (
        "decode-pattern",
        dict(S=1, K=4096, return_pattern=True),
        "own_simt",
        {"own_decode": "the pattern is written by the CUDA-core kernel"},
    ),
    ("window", dict(window=256), "flash", {"cudnn": "sliding window is not exposed"}),
    ("window-K>S", dict(window=7, S=17, K=40), "flash", {}),
    (
        "softcap",
        dict(softcap=50.0),
        "own_tc",
        {"flash": "softcap is compiled out", "mem_efficient": "has no softcap", "cudnn": "has no softcap"},
    ),
    (
        "alibi",
        dict(alibi=torch.empty(1, 32, 1024, device="meta")),
        "own_tc",
        {"flash": "ALiBi is compiled out", "cudnn": "ALiBi is not exposed"},
    ),
    (
        "pad2d",
        dict(mask=torch.empty(1, 1024, dtype=torch.bool, device="meta")),
        "own_tc",
        {"flash": "a 2-D padding mask needs the varlen path"},
    ),
    (
        "bool4d",
        dict(mask=torch.empty(1, 1, 1024, 1024, dtype=torch.bool, device="meta"), causal=False),
        "own_tc",
        {"flash": "takes no 4-D mask"},
    ),
    ("pattern", dict(return_pattern=True), "own_tc", {"flash": "the pattern from its lse is not wired"}),
    (
        "float32-prefill",
        dict(dtype=f32),
        "own_simt",
        {
            "flash": "takes float16 / bfloat16, got Float",
            "own_tc": "takes float16 / bfloat16 only",
            "own_decode": "not a decode shape",
        },
    ),
    ("float32-decode", dict(dtype=f32, S=1, K=4096), "own_decode", {}),
    (
        "float64",
        dict(dtype=f64, S=17, K=40, H=4, Hkv=2, Dh=64),
        "own_simt",
        {"own_decode": "float64", "mem_efficient": "got Double"},
    ),
    (
        "Dh-odd-33",
        dict(Dh=33, S=89, H=4, Hkv=4),
        "own_tc",
        {"flash": "Dh a multiple of 8", "mem_efficient": "multiple of 8"},
    ),
    ("Dh-512", dict(Dh=512, S=89, H=4, Hkv=4), "own_simt", {"flash": "at most 256", "own_tc": "Dh=512 > 256"}),
    ("sm75", dict(cap=(7, 5)), "own_simt", {"flash": "sm_80", "own_tc": "needs sm_80+"}),
    ("sm75-decode", dict(cap=(7, 5), S=1, K=4096), "own_decode", {}),
    ("sm120-flash-range", dict(cap=(13, 0)), "own_tc", {"flash": "sm_80 .. sm_121, the device is sm_130"}),
    ("flash-switched-off", dict(flash_available=False), "own_tc", {"flash": "switched off"}),
    ("cudnn-causal-S!=K", dict(S=17, K=40), "flash", {"cudnn": "top-left aligned: S == K only"}),
    (
        "mem-eff-gqa-torch-2.13",
        dict(torch_version=(2, 13), flash_available=False),
        "own_tc",
        {"mem_efficient": "GQA (H=32, Hkv=8) needs torch 2.14+"},
    ),
    (
        "cudnn-fp32-mask-torch-2.13",
        dict(torch_version=(2, 13), causal=False, mask=torch.empty(1, 1, 1024, 1024, device="meta")),
        "own_tc",
        {"cudnn": "an additive mask must have q's dtype on torch <= 2.13"},
    ),
]


@pytest.mark.parametrize("case_id,kw,backend,fragments", TABLE, ids=[c[0] for c in TABLE])
def test_selection_table(case_id, kw, backend, fragments):
    kw = dict(kw)
    dims = {n: kw.pop(n) for n in ("B", "S", "K", "H", "Hkv", "Dh", "dtype", "cap") if n in kw}
    p = plan(**dims, **kw)
    assert p.backend == backend, f"{case_id}: expected {backend}, got {p.backend}\n{p}"
    for name, fragment in fragments.items():
        assert fragment in reasons(p, name), f"{case_id}: {name}'s reasons lack {fragment!r}: {reasons(p, name)!r}"
    # A backend before the chosen one in priority order refuses; the CPU backend refuses CUDA tensors.
    order = list(ops.BACKENDS)
    for name in order[: order.index(backend)]:
        assert name in p.refusals, f"{name} comes first and does not refuse"
    assert "runs on CPU tensors" in reasons(p, "cpu")


def test_mem_efficient_gqa_from_torch_2_14():
    """mem-efficient attention gained GQA in torch 2.14: the reason is there for 2.13, gone for 2.14."""
    assert "GQA" in reasons(plan(torch_version=(2, 13)), "mem_efficient")
    assert "GQA" not in reasons(plan(torch_version=(2, 14)), "mem_efficient")
    assert "GQA" not in reasons(plan(H=32, Hkv=32, torch_version=(2, 13)), "mem_efficient")


def test_cudnn_is_opt_in():
    """PYQKV_CUDNN=1, read once per process like PYQKV_ATTENTION_BACKEND: checked in a fresh interpreter."""
    assert "opt-in only" in reasons(plan(), "cudnn")
    code = "import test_attention_plan as t; assert 'opt-in only' not in t.reasons(t.plan(), 'cudnn'); print('ok')"
    res = _run_with_env(code, PYQKV_CUDNN="1")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_misaligned_or_strided_qkv():
    """FlashAttention-2 loads 16 bytes at a time and checks nothing: an odd storage offset or a strided
    Dh is refused by the plan, and the own tensor-core kernel (element loads) takes it."""
    B, S, H, Dh = 1, 256, 8, 64
    buf = torch.empty(B, S, 3 * H * Dh + 1, dtype=bf16, device="meta")
    fused = buf[..., 1:]  # storage offset of one element: 2 bytes
    q, k, v = (fused[..., i * H * Dh : (i + 1) * H * Dh].unflatten(-1, (H, Dh)) for i in range(3))
    p = plan(qkv=(q, k, v), H=H, Hkv=H, Dh=Dh, S=S)
    assert p.backend == "own_tc"
    assert "16-byte aligned" in reasons(p, "flash")
    wide = torch.empty(B, S, H, 2 * Dh, dtype=bf16, device="meta")[..., ::2]
    p = plan(qkv=(wide, wide, wide), H=H, Hkv=H, Dh=Dh, S=S)
    assert p.backend == "own_tc" and "unit stride over Dh" in reasons(p, "flash")


def test_no_backend_lists_every_reason():
    """float64 with a head dim too large for shared memory: no CUDA backend accepts it."""
    p = plan(dtype=f64, Dh=4096, S=16, H=2, Hkv=2)
    assert p.backend is None
    assert set(p.refusals) == ALL
    assert "too large" in reasons(p, "own_simt")
    assert "shared memory" in str(p)


def test_cpu_tensors_plan_the_cpu_backend():
    q, k, v = views(2, 17, 40, 4, 2, 32, f32, device="cpu")
    p = ops.attention_plan(q, k, v, scale=0.2, causal=True)
    assert p.backend == "cpu"
    assert set(p.refusals) == CUDA_BACKENDS
    assert all("runs on CUDA tensors" in reasons(p, b) for b in CUDA_BACKENDS)


def test_meta_needs_a_capability():
    q, k, v = views(1, 8, 8, 2, 2, 16, bf16)
    with pytest.raises(ValueError, match=r"device_capability: expected \(major, minor\) to plan for meta tensors"):
        ops.attention_plan(q, k, v, scale=0.25, causal=True)
    with pytest.raises(ValueError, match=r"device_capability: expected \(major, minor\), got 3 numbers"):
        ops.attention_plan(q, k, v, scale=0.25, causal=True, device_capability=(9, 0, 1))


def test_plan_checks_the_arguments_like_the_op():
    q, k, v = views(1, 8, 8, 4, 2, 16, bf16)
    with pytest.raises(ValueError, match="window: expected causal=True with a sliding window"):
        ops.attention_plan(q, k, v, scale=0.25, causal=False, window=4, device_capability=H200)
    with pytest.raises(ValueError, match=r"k: expected a KV head count that divides H=4"):
        ops.attention_plan(q, k[:, :, :0], v[:, :, :0], scale=0.25, causal=True, device_capability=H200)


# --------------------------------------------------------------------------------------------------
# Forcing a backend: the context manager and PYQKV_ATTENTION_BACKEND


def test_forced_backend_is_the_only_one_considered():
    with ops.attention_backend("own_simt"):
        p = plan()
        assert p.backend == "own_simt" and p.refusals == {}
        p = plan(dtype=f64, Dh=4096, S=16, H=2, Hkv=2)  # refused: only its reasons
        assert p.backend is None and list(p.refusals) == ["own_simt"]
    assert plan().backend == "flash", "the context manager must restore the plan's own choice"


def test_forced_backend_that_refuses_raises_with_its_reasons():
    q, k, v = views(2, 5, 9, 4, 2, 8, f32, device="cpu")
    with ops.attention_backend("flash"):
        with pytest.raises(ValueError) as info:
            ops.attention(q, k, v, scale=0.3, causal=True)
    message = str(info.value)
    for fragment in (
        "the forced backend 'flash'",
        "refuses q [B, S, H, Dh] = [2, 5, 4, 8] Float",
        "flash: runs on CUDA tensors",
    ):
        assert fragment in message, message
    z, _, _ = ops.attention(q, k, v, scale=0.3, causal=True)  # restored: the CPU backend runs again
    with ops.attention_backend("cpu"):
        z_cpu, _, _ = ops.attention(q, k, v, scale=0.3, causal=True)
    assert torch.equal(z, z_cpu)


_ENV_CHECK = """
import pytest, torch
from pyqkv import ops
import test_attention_plan as t
p = t.plan()
assert p.backend is None and list(p.refusals) == ["own_decode"], p
with ops.attention_backend("own_tc"):  # the context manager wins over the environment
    assert t.plan().backend == "own_tc"
q, k, v = t.views(1, 3, 3, 2, 2, 8, t.f32, device="cpu")
with pytest.raises(ValueError, match="the forced backend 'own_decode'"):
    ops.attention(q, k, v, scale=0.3, causal=True)
print("ok")
"""


def _run_with_env(code: str, **variables):
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_forces_a_backend():
    """PYQKV_ATTENTION_BACKEND is read once per process (no environment look-up per op call), so it is
    set before the process starts: checked in a fresh interpreter."""
    res = _run_with_env(_ENV_CHECK, PYQKV_ATTENTION_BACKEND="own_decode")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    res = _run_with_env("import test_attention_plan as t; t.plan()", PYQKV_ATTENTION_BACKEND="fa3")
    assert res.returncode != 0
    assert re.search(r"PYQKV_ATTENTION_BACKEND: expected one of flash, .*cpu, got 'fa3'", res.stderr), res.stderr[
        -3000:
    ]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"name: expected one of \('flash'"):
        with ops.attention_backend("sdpa"):
            pass
    with pytest.raises(ValueError, match="backend: expected one of flash"):
        torch.ops.pyqkv._set_attention_backend("sdpa")
