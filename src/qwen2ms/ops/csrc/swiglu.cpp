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
  const void *g = params[0], *u = params[1];
  void *y = params[2];
  if (gt == F32 && ut == F32) {
    const float *gf = static_cast<const float *>(g), *uf = static_cast<const float *>(u);
    float *yf = static_cast<float *>(y);
    parallel_for(n, 1 << 13, worth_threads(n), [&](int64_t b, int64_t e) {
      int64_t i = b;
#if QK_SIMD
      const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
      for (; i + 8 <= e; i += 8) {
        const __m256 a = _mm256_loadu_ps(gf + i);
        const __m256 sig = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, a)));
        _mm256_storeu_ps(yf + i, _mm256_mul_ps(_mm256_div_ps(a, sig), _mm256_loadu_ps(uf + i)));
      }
#endif
      for (; i < e; ++i) yf[i] = gf[i] / (1.0f + std::exp(-gf[i])) * uf[i];
    });
    return 0;
  }
  parallel_for(n, 1 << 13, worth_threads(n), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float a = load(g, gt, i);
      store(y, yt, i, round_to(gt, a / (1.0f + std::exp(-a))) * load(u, ut, i));
    }
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
