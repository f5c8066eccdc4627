"""The main job and the benchmark command: their code paths run (tiny sizes), their self-checks pass, and
the benchmark's result has every row the README's table reports. Timings themselves are never asserted."""

import json

from tolerance import assert_close

from pyqkv import bench
from pyqkv.__main__ import demo, main


def test_demo_checks_pass(capsys):
    assert demo(timing_seq=(16,), timing_batch=1, reps=1) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and "hook_pattern [2, 12, 64, 64]" in out
    assert "pyqkv.hf.attach on a random 4-layer GPT-2" in out and "min - max" in out


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "bench-model" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    captured = capsys.readouterr()
    # An unknown command says so on stderr, with the usage, and prints nothing on stdout (issue 20 item 4).
    assert captured.out == ""
    assert "usage: pyqkv" in captured.err and "unknown command 'frobnicate'" in captured.err


def test_bench_result_has_every_row(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--seq",
                "16",
                "--context",
                "16",
                "--batch",
                "1",
                "--reps",
                "1",
                "--steps",
                "2",
                "--no-memory",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    rows = result["prefill"]["16"]
    assert set(rows) == {
        "pyqkv fast path",
        "pyqkv + read-only hook_pattern",
        "pyqkv use_split_qkv_input",
        "reference (materialized)",
        "torch fused (addmm+SDPA)",
    }
    assert all(r["median_ms"] > 0 for r in rows.values()) and rows["pyqkv fast path"]["gflops"] > 0
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] and isinstance(r["noisy"], bool) for r in rows.values())
    assert set(result["decode"]["16"]) == {"pyqkv + KVCache", "reference + torch.cat", "ratio"}
    assert result["gemm_gflops"] > 0


def test_bench_baselines_compute_the_same_layer():
    """The rows time the same function: every row's output, the Bridge's and the baselines', meets the
    tolerance rule against the materialized layer run in float64 and in float32 (the same random weights)."""
    import torch
    from tolerance import by_hand

    x = torch.randn(2, 9, 64)
    materialized = {
        dt: bench.MaterializedLayer(bench.LayerWeights.random(d_model=64, n_heads=4, d_head=16, dtype=dt))
        for dt in (torch.float32, torch.float64)
    }
    want = by_hand(lambda dt: materialized[dt](x.to(dt)), x.dtype)
    rows = bench.prefill_rows(bench.LayerWeights.random(d_model=64, n_heads=4, d_head=16))
    for name, fn in rows.items():
        assert_close(fn(x), want, f"bench row {name!r} vs the materialized layer")


def test_peak_memory_probe_sees_the_pattern():
    """The peak-memory column must be able to tell a materialized pattern from none."""
    fast = bench.peak_memory_mb("pyqkv fast path", 1, 512)
    materialized = bench.peak_memory_mb("reference (materialized)", 1, 512)
    pattern_bytes = 12 * 512 * 512 * 4 / 2**20  # one [B, H, S, S] float32 tensor, MB
    assert materialized - fast > pattern_bytes


def test_bench_help_shows_defaults_and_run_time(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: [128, 512, 1024])" in out and "about 3 minutes" in out


def test_bench_plot_checks_matplotlib_before_measuring(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(bench, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured first")))
    assert bench.main(["--plot", "x.png"]) == 1
    assert "pyqkv[bench]" in capsys.readouterr().err


def test_bench_plot_is_a_png(tmp_path):
    png = tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--seq",
                "16",
                "32",
                "--context",
                "16",
                "--batch",
                "1",
                "--reps",
                "1",
                "--steps",
                "2",
                "--no-memory",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_saved_json(tmp_path):
    """A table saved with --json can be plotted later (JSON turns the S keys into strings)."""
    result = bench.run(seq_lens=(16, 32), contexts=(), batch=1, reps=1, memory=False, quiet=True)
    saved = json.loads(json.dumps(result))
    bench.plot(saved, str(tmp_path / "again.png"))
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_model_rows_agree_and_summarize():
    """The model-level benchmark's rows compute the same model, and its summary has the ratios the README
    and the GPU JSON report (at a tiny size; timings are not asserted)."""
    from pyqkv import bench_model

    result = bench_model.run(
        batch=1, seq=16, reps=1, layers=1, memory=False, quiet=True, generate=2, generate_batches=(1,), prompt=4
    )
    assert result["rows_agree"] < 1e-4
    assert {
        "unhooked_vs_hf_sdpa",
        "run_with_cache_patterns_vs_hf_eager",
        "generate_tokens_per_s_vs_hf_sdpa",
        "generate_hooked_vs_hf_sdpa",
    } <= set(result["summary"])
    assert set(result["generate"][1]) == {"generate: HF sdpa", "generate: pyqkv", "generate: pyqkv + hook_z ablation"}
