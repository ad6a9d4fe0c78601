// One whole dense decoder layer for a one-token decode step, in one kernel call.
//
// Decoding one token runs ~9 kernels per layer (norm, q/k/v, RoPE, cache write, attention, o_proj, add + norm,
// gate/up + SwiGLU, down) plus MindSpore's own ops between them; every call costs a runtime launch and a
// thread wake-up. Here the same steps run back to back in C++ over the same functions the separate kernels
// use (linear.h, attention.h, common.h), so the values equal the separate kernels' bit for bit, and the pool's
// workers stay spinning from one step to the next.
#include "attention.h"
#include "linear.h"

using namespace qk;
using namespace qk::lin;

namespace {

// Per-thread scratch reused across calls (a decode step calls this once per layer).
struct Scratch {
  std::vector<float> h, q, k, v, attn, o, s, gate, up, act, down, kbuf, vbuf;
  XPrep prep;
};

inline float *sized(std::vector<float> &v, int64_t n) {
  v.resize(static_cast<size_t>(n));
  return v.data();
}

// Projections of one x ([M, K] fp32) into fp32 outputs: one parallel region when their weights share a dtype.
void project_all(const float *x, int64_t M, int64_t K, Proj *ps, const DType *wts, int P, XPrep &prep, bool q8) {
  bool same = true;
  for (int p = 1; p < P; ++p) same = same && wts[p] == wts[0];
  if (same) {
    prepare_x(x, M, K, wts[0], prep, q8);
    run_projections(wts[0], prep.xs, M, ps, P);
    return;
  }
  for (int p = 0; p < P; ++p) {
    prepare_x(x, M, K, wts[p], prep, q8);
    run_projections(wts[p], prep.xs, M, ps + p, 1);
  }
}

// Inputs: x [B, 1, H] fp32 (the residual stream), cos/sin [Bc, 1, D] (Bc in {1, B}), mask bool [MB, 1, 1, L]
// (MB in {1, B}), k_cache/v_cache [B, Hkv, L, D] (one float dtype, written in place at slot pos), pos int32
// scalar, input_layernorm and post_attention_layernorm weights [H], consts fp32 [eps, attention scale], the
// weights of q, k, v, o, gate, up, down ([N, K]; int8, or uint8 int4 codes [N, K / 2]), with `quant` their seven
// fp32 scales, with `with_bias` the q/k/v biases. Output: y [B, 1, H] fp32, the layer's output.
// q8: int8/int4 weights read quantised activations (linear.h, quantize_x). Returns 0, or 1 wrong count, 2 dtype,
// 3 shape.
int decode_layer(bool quant, bool with_bias, bool q8, int nparam, void **params, int *ndims, int64_t **shapes,
                 const char **dtypes) {
  constexpr int kW = 10;  // first weight input
  const int nin = kW + 7 * (quant ? 2 : 1) + (with_bias ? 3 : 0);
  if (nparam != nin + 1) return 1;
  if (dtype_of(dtypes[0]) != F32 || dtype_of(dtypes[nin]) != F32) return 2;
  if (ndims[0] != 3 || shapes[0][1] != 1) return 3;
  const int64_t B = shapes[0][0], H = shapes[0][2];
  const DType ct = dtype_of(dtypes[4]);
  if (!is_float(ct) || dtype_of(dtypes[5]) != ct) return 2;
  if (ndims[4] != 4 || ndims[5] != 4) return 3;
  const int64_t Hkv = shapes[4][1], L = shapes[4][2], D = shapes[4][3];
  for (int d = 0; d < 4; ++d)
    if (shapes[5][d] != shapes[4][d]) return 3;
  if (shapes[4][0] != B || D < 2 || D % 2 != 0 || Hkv < 1) return 3;
  if (std::strcmp(dtypes[3], "bool") != 0 || std::strcmp(dtypes[6], "int32") != 0) return 2;
  const int64_t MB = shapes[3][0];
  if (ndims[3] != 4 || (MB != 1 && MB != B) || shapes[3][1] != 1 || shapes[3][2] != 1 || shapes[3][3] != L) return 3;
  const DType rt = dtype_of(dtypes[1]);
  if (!is_float(rt) || dtype_of(dtypes[2]) != rt) return 2;
  const int64_t cn = numel(ndims[1], shapes[1]), bc = cn / D;
  if (bc * D != cn || (bc != 1 && bc != B) || numel(ndims[2], shapes[2]) != cn) return 3;
  const DType n1t = dtype_of(dtypes[7]), n2t = dtype_of(dtypes[8]);
  if (!is_float(n1t) || !is_float(n2t) || dtype_of(dtypes[9]) != F32) return 2;
  if (numel(ndims[7], shapes[7]) != H || numel(ndims[8], shapes[8]) != H || numel(ndims[9], shapes[9]) < 2) return 3;

  // q, k, v, o, gate, up, down.
  if (ndims[kW] != 2 || ndims[kW + 4] != 2) return 3;
  Proj ps[7];
  DType wts[7];
  const int64_t I = shapes[kW + 4][0];
  const int64_t Nq = shapes[kW][0], Hq = Nq / D;
  const int64_t ks[7] = {H, H, H, Hq * D, H, H, I};
  for (int p = 0; p < 7; ++p) {
    wts[p] = dtype_of(dtypes[kW + p]);
    if (int rc = parse_proj(kW + p, quant ? kW + 7 + p : -1, ks[p], params, ndims, shapes, dtypes, ps[p])) return rc;
    ps[p].ep.out_t = F32;
  }
  if (Hq * D != Nq || Hq % Hkv != 0 || ps[1].N != Hkv * D || ps[2].N != Hkv * D || ps[3].N != H ||
      ps[5].N != I || ps[6].N != H)
    return 3;
  if (with_bias) {
    for (int p = 0; p < 3; ++p) {
      const int bi = kW + 7 * (quant ? 2 : 1) + p;
      ps[p].ep.bias = params[bi];
      ps[p].ep.bias_t = dtype_of(dtypes[bi]);
      if (!is_float(ps[p].ep.bias_t)) return 2;
      if (numel(ndims[bi], shapes[bi]) != ps[p].N) return 3;
    }
  }
  const float *x = static_cast<const float *>(params[0]);
  const float eps = static_cast<const float *>(params[9])[0], scale = static_cast<const float *>(params[9])[1];
  const int64_t M = B;
  static thread_local Scratch sc;

  // Attention half: norm, q/k/v, RoPE, cache write, attention over the cache, o_proj.
  float *h = sized(sc.h, M * H);
  rms_rows(x, F32, params[7], n1t, eps, h, F32, M, H);
  ps[0].ep.out = sized(sc.q, M * Nq);
  ps[1].ep.out = sized(sc.k, M * Hkv * D);
  ps[2].ep.out = sized(sc.v, M * Hkv * D);
  project_all(h, M, H, ps, wts, 3, sc.prep, q8);
  const int64_t qshape[4] = {B, Hq, 1, D}, kshape[4] = {B, Hkv, 1, D};  // [B, 1, heads * D] is [B, heads, 1, D]
  rope_one(sc.q.data(), F32, qshape, params[1], params[2], rt, bc, 2, false, sc.q.data());
  rope_one(sc.k.data(), F32, kshape, params[1], params[2], rt, bc, 2, false, sc.k.data());
  const int64_t pos = *static_cast<const int32_t *>(params[6]);
  kv_write(params[4], params[5], ct, sc.k.data(), sc.v.data(), F32, B, Hkv, L, D, 1, pos);
  const float *kf = as_f32(params[4], ct, B * Hkv * L * D, sc.kbuf);
  const float *vf = as_f32(params[5], ct, B * Hkv * L * D, sc.vbuf);
  float *attn = sized(sc.attn, M * Nq);
  attend_rows(sc.q.data(), F32, kf, vf, static_cast<const bool *>(params[3]), MB, scale, attn, F32, B, Hq, Hkv, 1, L,
              D);
  ps[3].ep.out = sized(sc.o, M * H);
  project_all(attn, M, Nq, ps + 3, wts + 3, 1, sc.prep, q8);

  // MLP half: residual add + norm, gate/up + SwiGLU, down, residual add.
  float *s = sized(sc.s, M * H);
  for (int64_t i = 0; i < M * H; ++i) s[i] = sc.o[i] + x[i];
  rms_rows(s, F32, params[8], n2t, eps, h, F32, M, H);
  ps[4].ep.out = sized(sc.gate, M * I);
  ps[5].ep.out = sized(sc.up, M * I);
  project_all(h, M, H, ps + 4, wts + 4, 2, sc.prep, q8);
  float *act = sized(sc.act, M * I);
  swiglu_span(sc.gate.data(), F32, sc.up.data(), F32, act, F32, 0, M * I);
  ps[6].ep.out = sized(sc.down, M * H);
  project_all(act, M, I, ps + 6, wts + 6, 1, sc.prep, q8);
  float *y = static_cast<float *>(params[nin]);
  for (int64_t i = 0; i < M * H; ++i) y[i] = s[i] + sc.down[i];
  return 0;
}

}  // namespace

// One exported name per input count (MindSpore caches a Custom op by its function name).
QK_KERNEL(DecodeLayer) { return decode_layer(false, false, false, nparam, params, ndims, shapes, dtypes); }
QK_KERNEL(DecodeLayerBias) { return decode_layer(false, true, false, nparam, params, ndims, shapes, dtypes); }
// int8 and/or int4 weights (each projection either), each with its fp32 scales.
QK_KERNEL(DecodeLayerQuant) { return decode_layer(true, false, false, nparam, params, ndims, shapes, dtypes); }
QK_KERNEL(DecodeLayerQuantBias) { return decode_layer(true, true, false, nparam, params, ndims, shapes, dtypes); }
// The same with quantised activations for the int8/int4 projections.
QK_KERNEL(DecodeLayerQuantQ8A) { return decode_layer(true, false, true, nparam, params, ndims, shapes, dtypes); }
QK_KERNEL(DecodeLayerQuantBiasQ8A) { return decode_layer(true, true, true, nparam, params, ndims, shapes, dtypes); }
