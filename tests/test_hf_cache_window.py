"""Sliding-window caches under pyqkv.hf.attach (issue 21 item 8).

transformers' DynamicSlidingWindowLayer keeps the last window - 1 positions of a layer (and counts every
position in cumulative_length); each step it attends over those plus the new ones. The attached layer's
mirror (pyqkv/hf/hf_cache.py) must stay in sync with such a layer as it does with a DynamicLayer: HF's
layer holds views of the mirror's storage, and a decode step appends its rows in place instead of loading
the whole window afresh (an O(window) copy per layer per token). Checked here:

- KVCache.keep_last, the windowed storage under it: contents, no copy when dropping, storage bounded and
  its copying amortized O(1) per position;
- greedy generate on small random models whose window is shorter than prompt + new tokens (Mistral with
  eager and sdpa, Gemma 2 / Gemma 3 / Olmo 3 / Qwen 2 with sliding and full layers mixed): the tokens equal
  HF's, the logits equal HF's by the tolerance rule and bit for bit the logits of the same attached model
  reloading its window every step (the behaviour before), and HF's cache afterwards holds what HF's own
  run leaves in it;
- no reload on a decode step (a spy on the mirror's load path);
- the paths where HF changes the cache behind the mirror's back: a cache prefilled by HF, detach and HF
  continuing, beam search (reordering), assisted decoding (past recording and cropping).
"""

from __future__ import annotations

import pytest
import torch
from test_hf_families import FAMILIES, left_padded
from tolerance import assert_close, hf_reference

import pyqkv
from pyqkv.hf import hf_cache
from pyqkv.hf.hf_cache import MIRRORS_ATTR

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

BY_ID = {f.id: f for f in FAMILIES}
WINDOW = 4  # every sliding family of the table has sliding_window=4: shorter than the 10-token prompt
NEW = 10

# (family, attention implementation): the sliding families of the family table, mixed layers included
SLIDING = [
    ("mistral-sliding", "sdpa"),
    ("mistral-sliding", "eager"),
    ("gemma2", "eager"),
    ("gemma3", "eager"),
    ("olmo3", "eager"),
    ("qwen2-bias-window", "sdpa"),
]


def sliding_model(device, fam_id, impl="eager"):
    fam = BY_ID[fam_id]
    assert fam.config.get("sliding_window") == WINDOW
    return fam.make(device, impl=impl)


def gen_kwargs(am, **extra):
    return dict(
        attention_mask=am,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        **extra,
    )


class LoadSpy:
    """Counts calls of the mirror's load path (a fresh KVCache filled from HF's cache) while installed."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = hf_cache.CacheMirror._load

        def spy(mirror, bridge, self_cache, layer):
            self.calls.append((mirror.layer_idx, self_cache.get_seq_length(mirror.layer_idx)))
            return original(mirror, bridge, self_cache, layer)

        monkeypatch.setattr(hf_cache.CacheMirror, "_load", spy)


def reload_every_step(monkeypatch):
    """The mirror forgets its KVCaches after every call, so each step loads HF's cache afresh (what a
    sliding layer got before it was kept in sync): the reference for bit-for-bit equality."""
    original = hf_cache.CacheMirror.run

    def run(mirror, bridge, hidden_states, cache, call):
        out = original(mirror, bridge, hidden_states, cache, call)
        self_cache = getattr(cache, "self_attention_cache", cache)
        getattr(self_cache, MIRRORS_ATTR, {}).pop(mirror.layer_idx, None)
        return out

    monkeypatch.setattr(hf_cache.CacheMirror, "run", run)


def cache_of(generated):
    """generate's cache (named `cache` in newer transformers, `past_key_values` before)."""
    return generated["cache"] if "cache" in generated else generated["past_key_values"]


def sliding_layers(cache):
    return [layer for layer in cache.layers if type(layer).__name__ == "DynamicSlidingWindowLayer"]


# ----------------------------------------------------------------------------------------------------
# KVCache.keep_last


def test_keep_last_drops_the_oldest_positions_without_copying():
    cache = pyqkv.KVCache()
    k = torch.randn(2, 10, 2, 8)
    v = torch.randn(2, 10, 2, 8)
    cache.append(k, v)
    ptr = cache.k_storage.data_ptr()
    cache.keep_last(3)
    assert cache.length == 3 and cache.k_storage.data_ptr() == ptr
    assert torch.equal(cache.keys, k[:, -3:]) and torch.equal(cache.values, v[:, -3:])
    cache.keep_last(5)  # more than it holds: nothing changes
    assert cache.length == 3 and torch.equal(cache.keys, k[:, -3:])
    k2, v2 = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    keys, values = cache.append(k2, v2)
    assert torch.equal(keys, torch.cat([k[:, -3:], k2], 1)) and torch.equal(values, torch.cat([v[:, -3:], v2], 1))
    cache.keep_last(0)
    assert cache.length == 0 and cache.keys.shape == (2, 0, 2, 8)


def test_keep_last_rejects_bad_counts():
    cache = pyqkv.KVCache()
    cache.append(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"^n: expected a non-negative int, got -1"):
        cache.keep_last(-1)
    with pytest.raises(TypeError, match=r"^n: expected a non-negative int, got float 2.0"):
        cache.keep_last(2.0)
    assert cache.length == 4


def test_windowed_cache_storage_is_bounded_and_its_copying_amortized():
    """Appending one position and keeping the last window - 1, step after step: the keys are always the
    last positions, the storage stops growing at a few windows, and the positions moved to the storage's
    front when it runs out average at most two per appended position (amortized O(1), as growing is)."""
    window, steps = 9, 400
    cache = pyqkv.KVCache()
    history = torch.randn(1, steps, 2, 4)
    moved, last = 0, None
    for t in range(steps):
        cache.append(history[:, t : t + 1], history[:, t : t + 1] * 2)
        if last is not None and cache.keys.data_ptr() != last:  # the first valid row moved: a compaction
            moved += cache.length - 1
        cache.keep_last(window - 1)
        last = cache.keys.data_ptr()
        lo = max(0, t + 1 - (window - 1))
        assert torch.equal(cache.keys, history[:, lo : t + 1]) and torch.equal(cache.values, history[:, lo : t + 1] * 2)
    assert cache.capacity <= max(pyqkv.KVCache.MIN_CAPACITY, 4 * window)
    assert 0 < moved <= 2 * steps, f"{moved} positions moved over {steps} appends"


# ----------------------------------------------------------------------------------------------------
# generate under attach


@pytest.mark.parametrize("fam_id,impl", SLIDING, ids=[f"{f}-{i}" for f, i in SLIDING])
def test_generate_with_a_sliding_cache_equals_hf(device, fam_id, impl, monkeypatch):
    model = sliding_model(device, fam_id, impl)
    ids, am = left_padded(device)

    def run(m, dt):
        """generate's tokens and logits, and what its cache holds afterwards in each sliding layer."""
        r = m.generate(ids, **gen_kwargs(am))
        layers = sliding_layers(cache_of(r))
        assert layers and all(layer.keys.shape[2] == WINDOW - 1 for layer in layers)
        assert all(layer.cumulative_length == ids.shape[1] + NEW - 1 for layer in layers)
        return r.sequences, torch.stack(r.logits), [layer.keys for layer in layers], [layer.values for layer in layers]

    with torch.no_grad():
        tokens, logits, keys, values = hf_reference(model, run)
        pyqkv.hf.attach(model)
        ours = model.generate(ids, **gen_kwargs(am))
    assert ours.sequences.tolist() == tokens.lo.tolist()
    assert_close(torch.stack(ours.logits), logits, f"{fam_id} ({impl}) generate logits vs HF's")
    # HF's cache after the run holds what HF's own run leaves in it: the last window - 1 positions, every
    # position counted (the same mask sizes), the same contents, as views of the mirror's storage
    layers = sliding_layers(cache_of(ours))
    assert len(layers) == len(keys)
    for i, layer in enumerate(layers):
        seen = ids.shape[1] + NEW - 1
        assert layer.cumulative_length == seen and layer.get_mask_sizes(1) == (WINDOW, seen - (WINDOW - 1))
        assert_close(layer.keys, keys[i], f"sliding layer {i}'s keys after generate vs HF's")
        assert_close(layer.values, values[i], f"sliding layer {i}'s values after generate vs HF's")
    cache = cache_of(ours)
    storages = {entry[0].k_storage.untyped_storage().data_ptr() for entry in getattr(cache, MIRRORS_ATTR).values()}
    for i, layer in enumerate(layers):
        assert layer.keys.untyped_storage().data_ptr() in storages, f"sliding layer {i}: not the mirror's storage"
    with torch.no_grad():
        reload_every_step(monkeypatch)
        reloaded = model.generate(ids, **gen_kwargs(am))
    for step, (a, b) in enumerate(zip(ours.logits, reloaded.logits)):
        assert torch.equal(a, b), f"step {step}: the in-sync window differs from the window loaded afresh"


@pytest.mark.parametrize("fam_id,impl", [("mistral-sliding", "sdpa"), ("gemma2", "eager")])
def test_decode_steps_load_nothing(device, fam_id, impl, monkeypatch):
    """One load per layer when the generate call's fresh cache is first seen (nothing to copy), none on
    the decode steps after it, although the window is full from the prefill on."""
    model = sliding_model(device, fam_id, impl)
    n_layers = model.config.num_hidden_layers
    ids, am = left_padded(device)
    pyqkv.hf.attach(model)
    spy = LoadSpy(monkeypatch)
    with torch.no_grad():
        model.generate(ids, **gen_kwargs(am))
    assert sorted(spy.calls) == [(i, 0) for i in range(n_layers)], spy.calls


def test_prefilled_by_hf_continued_attached_then_by_hf_again(device):
    """A sliding cache filled by HF's own modules (a prompt longer than the window) is continued by the
    attached layers, and after detach HF continues from the views the mirror left: every step equals HF
    running the same sequence of calls on its own cache."""
    model = sliding_model(device, "mistral-sliding", "sdpa")
    ids, _ = left_padded(device, B=2, pads=(0, 0))
    steps = [ids[:, :7], ids[:, 7:8], ids[:, 8:10], torch.full((2, 1), 5, device=device)]

    def calls(m, dt, upto):
        cache = DynamicCache(config=m.config)
        return [m(x, past_key_values=cache, use_cache=True).logits for x in steps[:upto]], cache

    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: calls(m, dt, 4)[0])
        cache = DynamicCache(config=model.config)
        out = [model(steps[0], past_key_values=cache, use_cache=True).logits]
        pyqkv.hf.attach(model)
        out += [model(x, past_key_values=cache, use_cache=True).logits for x in steps[1:3]]
        pyqkv.hf.detach(model)
        out.append(model(steps[3], past_key_values=cache, use_cache=True).logits)
    for i, (a, r) in enumerate(zip(out, ref)):
        assert_close(a, r, f"call {i} (HF, attached, attached, HF after detach) vs HF throughout")
    assert all(layer.cumulative_length == 11 and layer.keys.shape[2] == WINDOW - 1 for layer in cache.layers)


def test_beam_search_with_a_sliding_cache(device):
    """Beam search reorders HF's cache between steps (new tensors): the mirror notices and follows."""
    model = sliding_model(device, "mistral-sliding", "eager")
    ids, am = left_padded(device, B=2, pads=(0, 2))
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


def test_assisted_decoding_with_a_sliding_cache(device):
    """Prompt-lookup decoding switches the sliding layers to past recording (they keep every position
    until HF crops them after verifying the candidates): the mirror leaves such a layer to HF's own update
    and reads only the window from it."""
    model = sliding_model(device, "mistral-sliding", "sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8]], device=device)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, prompt_lookup_num_tokens=3)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        plain = model.generate(ids, **{k: v for k, v in kw.items() if k != "prompt_lookup_num_tokens"})
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert ref.tolist() == plain.tolist()  # assisted decoding is exact for greedy search
    assert out.tolist() == ref.tolist()


def test_a_layer_recording_its_past_is_read_as_its_window(device):
    """A sliding layer recording its past (activate_past_recording, as assisted decoding sets it) holds
    every position until HF crops it; calls made before any crop see only the last window - 1 of them
    plus their own (its mask sizes): the attached layers, continuing such a cache filled by HF, too."""
    probe = transformers.cache_utils.DynamicSlidingWindowLayer(sliding_window=WINDOW)
    probe.activate_past_recording()
    probe.update(torch.zeros(1, 1, 7, 2), torch.zeros(1, 1, 7, 2))
    if probe.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))[0].shape[2] != WINDOW:
        pytest.skip(
            f"transformers {transformers.__version__}: a recording sliding layer returns every position, more "
            "than its mask sizes, so HF itself cannot run this sequence of calls"
        )
    model = sliding_model(device, "mistral-sliding", "sdpa")
    ids, _ = left_padded(device, B=2, pads=(0, 0))
    steps = [ids[:, :7], ids[:, 7:8], ids[:, 8:10]]

    def calls(m, dt):
        cache = DynamicCache(config=m.config)
        cache.activate_past_recording()
        return [m(x, past_key_values=cache, use_cache=True).logits for x in steps]

    with torch.no_grad():
        ref = hf_reference(model, calls)
        cache = DynamicCache(config=model.config)
        cache.activate_past_recording()
        out = [model(steps[0], past_key_values=cache, use_cache=True).logits]
        assert cache.layers[0].keys.shape[2] == 7  # HF kept every position
        pyqkv.hf.attach(model)
        out += [model(x, past_key_values=cache, use_cache=True).logits for x in steps[1:]]
    for i, (a, r) in enumerate(zip(out, ref)):
        assert_close(a, r, f"call {i} (HF, then attached) on a recording cache vs HF throughout")
    assert all(layer.cumulative_length == 10 and layer.keys.shape[2] == 10 for layer in cache.layers)
