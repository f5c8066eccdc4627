// The op schemas of pyqkv: declared once here; each backend registers kernels in its own file
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA). Notation: B batch, S query positions, K key
// positions, H query heads, Hkv key/value heads, Dh head dim, D model dim.
#include <torch/library.h>

TORCH_LIBRARY(pyqkv, m) {
  // Fused QKV weight -> per-head weights in HookedTransformer format.
  // weight: [D, n_out] (conv1d) or [n_out, D] (Linear), n_out = (H + 2 Hkv) Dh.
  // Returns W_Q [H, D, Dh], W_K [Hkv, D, Dh], W_V [Hkv, D, Dh]. A bias is split as a [1, n_out]
  // conv1d weight, so one kernel serves both.
  m.def(
      "split_qkv(Tensor weight, int n_heads, int n_kv_heads, int d_head, str layout, bool conv1d)"
      " -> (Tensor, Tensor, Tensor)");
  // The inverse of split_qkv: per-head weights -> one fused weight in the given layout/orientation.
  m.def("pack_qkv(Tensor W_Q, Tensor W_K, Tensor W_V, str layout, bool conv1d) -> Tensor");

  // Per-head projection  b s n d, n d e -> b s n e  (+ b[n, e]).
  m.def("per_head_proj(Tensor x, Tensor W, Tensor? b) -> Tensor");

  // Scaled, masked attention. q [B,S,H,Dh]; k, v [B,K,Hkv,Dh] (any strides); mask None, [B,K] padding
  // (bool or integer, nonzero = attend; float only when it holds 0 = pad and 1 = attend alone:
  // check_padding_mask in csrc/attention.h), [B|1,1|H,S,K] bool (true = attend) or [B|1,1|H,S,K]
  // additive (visible iff > hidden_threshold: csrc/attention.h). Causal is bottom-right aligned.
  // alibi: None or a per-key bias [B|1, H|1, K] (ALiBi: Bloom, Falcon-RW), the same for every query
  // position; it hides nothing by itself. softcap: None / 0 (off) or c > 0 (Gemma 2): the score is
  //   s = scale * q.k;  s = c * tanh(s / c);  s += alibi[b,h,j];  s += mask[b,h,i,j].
  // window: None or W >= 1 keys (Hugging Face's sliding_window, the query's own position included),
  // causal only: query i at position p = K - S + i sees keys p - W < j <= p.
  // Returns z [B,S,H,Dh], lse [B,H,S] (float32, -inf on fully masked rows) and pattern [B,H,S,K]
  // (an empty tensor unless return_pattern).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal,"
      " bool return_pattern, Tensor? alibi=None, float? softcap=None, int? window=None)"
      " -> (Tensor, Tensor, Tensor)");

  // The split form of attention (csrc/attention_split.cpp), for hooks on the scores and the pattern:
  // the same arguments and rules as attention. attn_scores -> scores [B,H,S,K] in dtype (default q's),
  // hidden entries at finfo(dtype).min; attn_softmax -> pattern [B,H,S,K] in dtype (default the
  // scores'); attn_apply(pattern [B,H,S,K], v [B,K,Hkv,Dh]) -> z [B,S,H,Dh].
  m.def(
      "attn_scores(Tensor q, Tensor k, Tensor? mask, float scale, bool causal, Tensor? alibi=None,"
      " float? softcap=None, int? window=None, ScalarType? dtype=None) -> Tensor");
  m.def("attn_softmax(Tensor scores, ScalarType? dtype=None) -> Tensor");
  m.def("attn_apply(Tensor pattern, Tensor v) -> Tensor");

  // Entries of attention's pattern (and scores) at chosen heads, query rows and key columns, from the lse
  // that attention returned for the same arguments, without the [B, H, S, K] tensor (csrc/pattern_slice.h).
  // q, k, mask, scale, causal, alibi, softcap, window: as attention; lse [B, H, S] (attention's, float32;
  // float64 for float64 q). heads [H'], queries [S'], keys [K']: None (all) or 1-D integer indices in
  // [0, H), [0, S), [0, K), in any order, repeats allowed. Returns pattern [B, H', S', K'] in q's dtype,
  // pattern[b, h', i', j'] = exp(score - lse[b, h, i]) where query i sees key j and 0 where it does not
  // (h = heads[h'], i = queries[i'], j = keys[j']), and, with return_scores, the scores there in
  // score_dtype (default q's), as attn_scores computes them (hidden entries at finfo(score_dtype).min);
  // else an empty tensor.
  m.def(
      "pattern_slice(Tensor q, Tensor k, Tensor lse, Tensor? mask, float scale, bool causal, Tensor? alibi=None,"
      " float? softcap=None, int? window=None, Tensor? heads=None, Tensor? queries=None, Tensor? keys=None,"
      " bool return_scores=False, ScalarType? score_dtype=None) -> (Tensor, Tensor)");
  // pattern_slice composed of ATen ops (csrc/pattern_slice_aten.cpp): what CUDA runs, and, under this
  // name, callable on any device so that the CPU tests check it against the CPU kernel.
  m.def(
      "_pattern_slice_aten(Tensor q, Tensor k, Tensor lse, Tensor? mask, float scale, bool causal,"
      " Tensor? alibi=None, float? softcap=None, int? window=None, Tensor? heads=None, Tensor? queries=None,"
      " Tensor? keys=None, bool return_scores=False, ScalarType? score_dtype=None) -> (Tensor, Tensor)");

  // The 2-D padding mask rule of attention (csrc/attention.h) on its own, for a caller that checks before
  // it runs anything (the Bridge's pre-check): a TypeError / ValueError naming `name`, or nothing. Reads
  // the values (a device sync on CUDA) only when the mask is float.
  m.def("check_padding_mask(Tensor mask, str name) -> ()");

  // Which backend attention would run (csrc/attention_plan.h) and why the others refuse: the name
  // ("" when none accepts) and "backend<TAB>reason" lines. device_capability (major, minor) plans for a
  // CUDA device (required for meta tensors); torch_version and flash_available describe the torch build.
  m.def(
      "attention_plan(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal,"
      " bool return_pattern, Tensor? alibi=None, float? softcap=None, int? window=None,"
      " int[]? device_capability=None, int[]? torch_version=None, bool? flash_available=None)"
      " -> (str, str[])");
  // Forces one attention backend process-wide ("" clears); returns the previous one.
  m.def("_set_attention_backend(str name) -> str");

  // RoPE on the first R features of every head: x [B,S,n,Dh] (any strides), cos/sin [B|1,S,R] (any
  // float dtype), R even, R <= Dh. out = x*cos + rotate(x)*sin in float32 (float64 for float64 x),
  // rotate = rotate_half, or rotate_every_two when interleaved (GPT-J, CodeGen); features R.. pass
  // through. Returns a new contiguous [B,S,n,Dh] in x's dtype.
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");

  // Writes k_new/v_new [B,S,Hkv,Dh] into caches [B,Hkv,capacity,Dh] at positions start..start+S-1.
  m.def("kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, int start) -> ()");
}
