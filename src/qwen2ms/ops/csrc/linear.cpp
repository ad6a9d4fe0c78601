// Linear layer y = x @ W^T (* scale) (+ bias) over fp32/fp16/bf16/int8/int4 weights with fp32 accumulation.
//
// The GEMV internals live in linear.h (shared with the fused decode layer); this file parses the kernels'
// inputs and exports them.
#include "linear.h"

using namespace qk;
using namespace qk::lin;

namespace {

// A parsed call: x (fp32, and its vector-loop layout) and up to three projections of one weight dtype.
struct Call {
  DType xt = UNSUPPORTED, wt = UNSUPPORTED;
  int64_t M = 0, K = 0;
  int P = 0;
  Proj ps[3];
  XPrep prep;
  std::vector<float> xbuf;

  void run() { run_projections(wt, prep.xs, M, ps, P); }
};

// Inputs laid out as x [..., K], P weights [N_p, K] of one dtype (int4: uint8 [N_p, K / 2], K a multiple of
// 32), then (int8/int4 weights) P fp32 scales ([N_p] per channel or [N_p, G] per group, K / G a multiple of 32),
// then (with_bias) P biases [N_p].
// Fills `c` except the outputs (ep.out / ep.out_t). Returns 0, or 1 wrong count, 2 dtype, 3 shape.
int parse_call(int P, bool with_bias, int nin, void **params, int *ndims, int64_t **shapes, const char **dtypes,
               Call &c, bool q8 = false) {
  c.P = P;
  c.xt = dtype_of(dtypes[0]);
  c.wt = dtype_of(dtypes[1]);
  if (!is_float(c.xt) || c.wt == UNSUPPORTED) return 2;
  const bool quant = c.wt == I8 || c.wt == U4;
  if (nin != 1 + P * (1 + (quant ? 1 : 0) + (with_bias ? 1 : 0))) return 1;
  if (ndims[1] != 2) return 3;
  const int64_t K = shapes[1][1] * (c.wt == U4 ? 2 : 1);  // int4: two inputs per stored byte
  if (ndims[0] < 1 || shapes[0][ndims[0] - 1] != K) return 3;
  c.K = K;
  c.M = K ? numel(ndims[0], shapes[0]) / K : 0;
  for (int p = 0; p < P; ++p) {
    if (dtype_of(dtypes[1 + p]) != c.wt) return 2;
    Proj &pr = c.ps[p];
    if (int rc = parse_proj(1 + p, quant ? 1 + P + p : -1, K, params, ndims, shapes, dtypes, pr)) return rc;
    if (with_bias) {
      const int bi = 1 + P * (quant ? 2 : 1) + p;
      pr.ep.bias = params[bi];
      pr.ep.bias_t = dtype_of(dtypes[bi]);
      if (!is_float(pr.ep.bias_t)) return 2;
      if (numel(ndims[bi], shapes[bi]) != pr.N) return 3;
    }
  }
  prepare_x(as_f32(params[0], c.xt, c.M * K, c.xbuf), c.M, K, c.wt, c.prep, q8);
  return 0;
}

// y_p = x @ W_p^T (* scale_p) (+ bias_p) for P projections; outputs [..., N_p] follow the inputs. q8: int8/int4
// weights read quantised activations (see quantize_x in linear.h).
int project(int P, bool with_bias, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
            bool q8 = false) {
  const int nin = nparam - P;
  if (nin < 1 + P) return 1;
  Call c;
  if (int rc = parse_call(P, with_bias, nin, params, ndims, shapes, dtypes, c, q8)) return rc;
  for (int p = 0; p < P; ++p) {
    c.ps[p].ep.out = params[nin + p];
    c.ps[p].ep.out_t = dtype_of(dtypes[nin + p]);
    if (!is_float(c.ps[p].ep.out_t)) return 2;
  }
  c.run();
  return 0;
}

// silu(x @ Wg^T) * (x @ Wu^T): both projections in one region, each rounded to the output dtype as the
// separate linear kernels would store it, then the SwiGLU kernel's arithmetic (swiglu_span).
int gate_up_swiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool q8 = false) {
  const int nin = nparam - 1;
  Call c;
  if (int rc = parse_call(2, false, nin, params, ndims, shapes, dtypes, c, q8)) return rc;
  const DType ot = dtype_of(dtypes[nin]);
  if (!is_float(ot)) return 2;
  if (c.ps[0].N != c.ps[1].N) return 3;
  const int64_t n = c.M * c.ps[0].N, esize = ot == F32 ? 4 : 2;
  std::vector<char> gate(static_cast<size_t>(n * esize)), up(static_cast<size_t>(n * esize));
  c.ps[0].ep.out = gate.data();
  c.ps[1].ep.out = up.data();
  c.ps[0].ep.out_t = c.ps[1].ep.out_t = ot;
  c.run();
  swiglu_span(gate.data(), ot, up.data(), ot, params[nin], ot, 0, n);
  return 0;
}
// x [..., K] rounded to int8 codes per block of 32 inputs and back (quantize_block's codes times their scale), in
// x's dtype: what the kernels above read with quantised activations, for the matmul path of many rows.
int quantize_rows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2) return 1;
  const DType xt = dtype_of(dtypes[0]);
  if (!is_float(xt) || dtype_of(dtypes[1]) != xt) return 2;
  if (ndims[0] < 1 || numel(ndims[0], shapes[0]) != numel(ndims[1], shapes[1])) return 3;
  const int64_t K = shapes[0][ndims[0] - 1];
  if (K == 0) return 0;
  const int64_t M = numel(ndims[0], shapes[0]) / K;
  std::vector<float> buf;
  const float *x = as_f32(params[0], xt, M * K, buf);
  void *y = params[1];
  parallel_for(M, 8, worth_threads(M * K), [&](int64_t r0, int64_t r1) {
    int8_t q[32];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; k += 32) {
        const int n = static_cast<int>(std::min<int64_t>(32, K - k));
        const float d = quantize_block(x + r * K + k, n, q);
        for (int j = 0; j < n; ++j) store(y, xt, r * K + k + j, static_cast<float>(q[j]) * d);
      }
  });
  return 0;
}
}  // namespace

// One exported name per input signature: MindSpore caches a Custom op's graph by its function name, so
// variants with different input counts must not share one.
QK_KERNEL(Linear) { return nparam == 3 ? project(1, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearBias) { return nparam == 4 ? project(1, true, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearInt8) { return nparam == 4 ? project(1, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearInt8Bias) { return nparam == 5 ? project(1, true, nparam, params, ndims, shapes, dtypes) : 1; }
// Three projections of one x (attention's q, k, v): x, 3 weights, (3 int8 scales), (3 biases); 3 outputs.
QK_KERNEL(LinearQkv) { return nparam == 7 ? project(3, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearQkvBias) { return nparam == 10 ? project(3, true, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearQkvInt8) { return nparam == 10 ? project(3, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearQkvInt8Bias) { return nparam == 13 ? project(3, true, nparam, params, ndims, shapes, dtypes) : 1; }
// The MLP's first half, silu(gate(x)) * up(x): x, gate and up weights, (their int8 scales); one output.
QK_KERNEL(GateUpSwiGLU) { return nparam == 4 ? gate_up_swiglu(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(GateUpSwiGLUInt8) { return nparam == 6 ? gate_up_swiglu(nparam, params, ndims, shapes, dtypes) : 1; }
// The int4 variants (uint8 packed weights [N, K / 2] and their fp32 group scales): the same functions, exported
// under their own names because their backward passes differ from int8's.
QK_KERNEL(LinearInt4) { return nparam == 4 ? project(1, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearInt4Bias) { return nparam == 5 ? project(1, true, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearQkvInt4) { return nparam == 10 ? project(3, false, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearQkvInt4Bias) { return nparam == 13 ? project(3, true, nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(GateUpSwiGLUInt4) { return nparam == 6 ? gate_up_swiglu(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(QuantizeQ8) { return quantize_rows(nparam, params, ndims, shapes, dtypes); }
// Quantised activations ("Q8A"): the int8/int4 kernels above with x rounded to int8 codes per block of 32 and
// integer dot products (linear.h, quantize_x). Own names: MindSpore caches a Custom op by its function name.
QK_KERNEL(LinearInt8Q8A) { return nparam == 4 ? project(1, false, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearInt8BiasQ8A) { return nparam == 5 ? project(1, true, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearQkvInt8Q8A) { return nparam == 10 ? project(3, false, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearQkvInt8BiasQ8A) {
  return nparam == 13 ? project(3, true, nparam, params, ndims, shapes, dtypes, true) : 1;
}
QK_KERNEL(GateUpSwiGLUInt8Q8A) { return nparam == 6 ? gate_up_swiglu(nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearInt4Q8A) { return nparam == 4 ? project(1, false, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearInt4BiasQ8A) { return nparam == 5 ? project(1, true, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearQkvInt4Q8A) { return nparam == 10 ? project(3, false, nparam, params, ndims, shapes, dtypes, true) : 1; }
QK_KERNEL(LinearQkvInt4BiasQ8A) {
  return nparam == 13 ? project(3, true, nparam, params, ndims, shapes, dtypes, true) : 1;
}
QK_KERNEL(GateUpSwiGLUInt4Q8A) { return nparam == 6 ? gate_up_swiglu(nparam, params, ndims, shapes, dtypes, true) : 1; }
