"""`pyqkv bench-model`'s peak-memory column measures what a row holds (issue 19 item 5).

The column is each row's extra peak resident memory over one call, measured in a process of its own. A
row caching every layer's pattern holds L * B * H * S * S float32 values when the call returns; here a
small model (2 layers, 4 heads, hidden 32, a 1000-token vocabulary) at S = 3136 makes that 300 MiB
while its compute and every other tensor stay small, so the column must show at least the patterns for
the caching rows and much less for the unhooked ones. Timings are never asserted.
"""

from __future__ import annotations

import pytest

from pyqkv import bench, bench_model

SHAPE = "tiny"
B, S = 1, 3136  # 2 layers * 4 heads * S * S float32 values: 300 MiB


def pattern_mb(shape: str = SHAPE) -> float:
    cfg = bench_model._config(shape)
    return cfg.num_hidden_layers * B * cfg.num_attention_heads * S * S * 4 / 2**20


def test_the_tiny_shape_holds_about_300_mb_of_patterns():
    assert 290 < pattern_mb() < 320


@pytest.mark.parametrize("row", ["pyqkv run_with_cache", "HF eager + output_attentions"])
def test_a_row_caching_every_pattern_reports_at_least_the_patterns(row):
    peak = bench_model.peak_memory_mb(row, B, S, None, SHAPE)
    assert peak >= pattern_mb(), f"{row}: peak {peak:.0f} MB, its patterns alone are {pattern_mb():.0f} MB"


@pytest.mark.parametrize("row", ["pyqkv attached", "HF sdpa"])
def test_an_unhooked_row_reports_much_less(row):
    """No pattern is kept (nor made: both run fused attention); what the call holds is the logits and the
    transients of one layer, a few tens of MB here. Above zero: the call does allocate its activations."""
    peak = bench_model.peak_memory_mb(row, B, S, None, SHAPE)
    assert 0 < peak < pattern_mb() / 4, f"{row}: peak {peak:.0f} MB"


def test_call_peak_counts_memory_freed_before_the_call_and_reused_by_it():
    """The probe itself, in this process: a call that allocates and holds 200 MB reports at least that,
    although the process held (and freed) more before it (the high-water mark is reset first, and memory
    malloc kept after the free is handed back so that reusing it shows)."""
    import torch

    junk = torch.ones(100 * 2**20)  # 400 MB, touched: the high-water mark before the call
    del junk
    peak = bench.call_peak_kib(lambda: torch.ones(50 * 2**20))
    if peak is None:
        pytest.skip("this kernel does not let a process reset its high-water mark (/proc/self/clear_refs)")
    assert 200 <= peak / 1024 < 260, peak / 1024


def test_the_reported_case_gpt2_small_default_size():
    """The case the issue saw print 0 MB: HF sdpa on the default GPT-2-small shape (B = 2, S = 512) returns
    logits of B * S * 50257 float32 values (196 MB), which a fresh process reading its high-water mark
    without a reset hid under the peak of building the models."""
    logits_mb = 2 * 512 * bench_model.VOCAB * 4 / 2**20
    peak = bench_model.peak_memory_mb("HF sdpa", 2, 512, None, "gpt2-small")
    assert peak >= logits_mb, f"peak {peak:.0f} MB, the logits alone are {logits_mb:.0f} MB"


def test_rows_builds_only_the_rows_asked_for():
    fns = bench_model.rows(shape=SHAPE, names=["HF sdpa"])
    assert list(fns) == ["HF sdpa"]
    with pytest.raises(ValueError, match=r"^names: expected row names among .* got unknown \['nope'\]"):
        bench_model.rows(shape=SHAPE, names=["nope"])


def test_overhead_decode_rows_come_from_bench_overhead(tmp_path):
    """--overhead adds bench/overhead.py's rows (reused from there, not copied), timed against HF sdpa."""
    import json

    out = tmp_path / "model.json"
    argv = ["--shape", SHAPE, "--seq", "16", "--batch", "1", "--reps", "1", "--no-memory"]
    assert bench_model.main(argv + ["--overhead", "gpt2", "--overhead-tokens", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    overhead = bench_model._overhead_module()
    rows = result["overhead-decode"]["gpt2"]
    assert set(rows) == set(overhead.build_rows("gpt2", 2))
    assert rows["HF sdpa"]["vs_hf_sdpa"] == 1.0 and rows["attach"]["median_ms"] > 0
    assert set(result[SHAPE]["rows"]) >= {"HF sdpa", "pyqkv attached"}


def test_overhead_rejects_an_unknown_family(capsys):
    with pytest.raises(SystemExit):
        bench_model.main(["--shape", SHAPE, "--overhead", "gpt3"])
    assert "--overhead: expected families among ['gpt2', 'llama'], got ['gpt3']" in capsys.readouterr().err
