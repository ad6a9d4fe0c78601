// Fused SwiGLU, silu(gate) * up, and its backward pass.
#include "common.h"

using namespace qk;

// inputs: gate [...], up [...] (same shape); output: silu(gate) * up, dtype of gate.
// Matches the reference's rounding: silu(gate) is cast to the input dtype before the product.
QK_KERNEL(SwiGLU) {
  if (nparam != 3) return 1;
  DType gt = dtype_of(dtypes[0]), ut = dtype_of(dtypes[1]), yt = dtype_of(dtypes[2]);
  if (!is_float(gt) || !is_float(ut) || !is_float(yt)) return 2;
  const int64_t n = numel(ndims[0], shapes[0]);
  if (numel(ndims[1], shapes[1]) != n) return 3;
  parallel_for(n, 1 << 13, worth_threads(n), [&](int64_t b, int64_t e) {
    swiglu_span(params[0], gt, params[1], ut, params[2], yt, b, e);
  });
  return 0;
}

// inputs: dy, gate, up; outputs: dgate = dy*up*s*(1 + gate*(1-s)) with s = sigmoid(gate), dup = dy*silu(gate).
QK_KERNEL(SwiGLUGrad) {
  if (nparam != 5) return 1;
  DType dt = dtype_of(dtypes[0]), gt = dtype_of(dtypes[1]), ut = dtype_of(dtypes[2]);
  DType dgt = dtype_of(dtypes[3]), dut = dtype_of(dtypes[4]);
  if (!is_float(dt) || !is_float(gt) || !is_float(ut)) return 2;
  const int64_t n = numel(ndims[1], shapes[1]);
  parallel_for(n, 1 << 13, worth_threads(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float d = load(params[0], dt, i), a = load(params[1], gt, i), b = load(params[2], ut, i);
      float s = 1.0f / (1.0f + std::exp(-a));
      store(params[3], dgt, i, d * b * s * (1.0f + a * (1.0f - s)));
      store(params[4], dut, i, d * a * s);
    }
  });
  return 0;
}
