// Linear layer y = x @ W^T (* scale) (+ bias) over fp32/fp16/bf16/int8 weights with fp32 accumulation.
//
// Decode is memory-bound: each weight row is streamed once per call and reused for up to four rows of x,
// so the bytes read per token are the weight bytes (half of fp32 for bf16, a quarter for int8).
#include <algorithm>

#include "common.h"

using namespace qk;

namespace {

#if QK_SIMD
template <int WT>
inline __m256 load8(const void *p, int64_t i);
template <>
inline __m256 load8<F32>(const void *p, int64_t i) {
  return _mm256_loadu_ps(static_cast<const float *>(p) + i);
}
template <>
inline __m256 load8<BF16>(const void *p, int64_t i) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <>
inline __m256 load8<F16>(const void *p, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i)));
}
template <>
inline __m256 load8<I8>(const void *p, int64_t i) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(static_cast<const int8_t *>(p) + i));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// acc[m] = dot(W[row], x[m]) for MB rows of x; U vectors of 8 per step keep enough FMAs in flight.
template <int WT, int MB, int U>
inline void dot_rows(const void *w, int64_t woff, const float *x, int64_t K, float *acc) {
  __m256 a[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) a[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    __m256 wv[U];
    for (int u = 0; u < U; ++u) wv[u] = load8<WT>(w, woff + k + 8 * u);
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) a[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), a[m][u]);
  }
  for (; k + 8 <= K; k += 8) {
    __m256 wv = load8<WT>(w, woff + k);
    for (int m = 0; m < MB; ++m) a[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), a[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = a[m][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, a[m][u]);
    acc[m] = hsum(s);
  }
  for (; k < K; ++k) {
    float wv = load(w, static_cast<DType>(WT), woff + k);
    for (int m = 0; m < MB; ++m) acc[m] += wv * x[m * K + k];
  }
}
#else
template <int WT, int MB, int U>
inline void dot_rows(const void *w, int64_t woff, const float *x, int64_t K, float *acc) {
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float wv = load(w, static_cast<DType>(WT), woff + k);
    for (int m = 0; m < MB; ++m) acc[m] += wv * x[m * K + k];
  }
}
#endif

struct Epilogue {
  const float *scale;  // per output channel, int8 weights only
  const void *bias;
  DType bias_t;
  void *out;
  DType out_t;
  int64_t N;
  inline void put(int64_t m, int64_t n, float v) const {
    if (scale) v *= scale[n];
    if (bias) v += load(bias, bias_t, n);
    store(out, out_t, m * N + n, v);
  }
};

template <int WT>
void linear_impl(const float *x, const void *w, int64_t M, int64_t N, int64_t K, const Epilogue &ep) {
  // Chunks of ~32 KiB of weights handed out dynamically: on a shared machine one thread may be
  // descheduled, and a static split would leave the other waiting for it.
  const int64_t wbytes = WT == F32 ? 4 : (WT == I8 ? 1 : 2);
  const int64_t chunk = std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(1, K * wbytes));
  parallel_for(N, chunk, N * K >= (1 << 14), [&](int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t woff = n * K;
    float acc[4];
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      dot_rows<WT, 4, 2>(w, woff, x + m * K, K, acc);
      for (int i = 0; i < 4; ++i) ep.put(m + i, n, acc[i]);
    }
    if (M - m == 3) {
      dot_rows<WT, 3, 2>(w, woff, x + m * K, K, acc);
      for (int i = 0; i < 3; ++i) ep.put(m + i, n, acc[i]);
    } else if (M - m == 2) {
      dot_rows<WT, 2, 4>(w, woff, x + m * K, K, acc);
      for (int i = 0; i < 2; ++i) ep.put(m + i, n, acc[i]);
    } else if (M - m == 1) {
      dot_rows<WT, 1, 4>(w, woff, x + m * K, K, acc);
      ep.put(m, n, acc[0]);
    }
  }
  });
}

}  // namespace

namespace {
// inputs: x [..., K], weight [N, K], (scale [N] fp32 when weight is int8), (bias [N]); output [..., N].
int linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam < 3) return 1;
  const int out = nparam - 1;
  DType xt = dtype_of(dtypes[0]), wt = dtype_of(dtypes[1]), ot = dtype_of(dtypes[out]);
  if (!is_float(xt) || !is_float(ot) || wt == UNSUPPORTED) return 2;
  const bool quant = wt == I8;
  const int n_extra = nparam - 3 - (quant ? 1 : 0);
  if (n_extra != 0 && n_extra != 1) return 1;
  if (quant && dtype_of(dtypes[2]) != F32) return 2;
  if (ndims[1] != 2) return 3;
  const int64_t N = shapes[1][0], K = shapes[1][1];
  if (shapes[0][ndims[0] - 1] != K) return 3;
  const int64_t M = K ? numel(ndims[0], shapes[0]) / K : 0;
  Epilogue ep{quant ? static_cast<const float *>(params[2]) : nullptr, nullptr, F32, params[out], ot, N};
  if (n_extra == 1) {
    const int bi = quant ? 3 : 2;
    ep.bias = params[bi];
    ep.bias_t = dtype_of(dtypes[bi]);
    if (!is_float(ep.bias_t)) return 2;
  }
  std::vector<float> xbuf;
  const float *x = as_f32(params[0], xt, M * K, xbuf);
  switch (wt) {
    case F32: linear_impl<F32>(x, params[1], M, N, K, ep); break;
    case F16: linear_impl<F16>(x, params[1], M, N, K, ep); break;
    case BF16: linear_impl<BF16>(x, params[1], M, N, K, ep); break;
    case I8: linear_impl<I8>(x, params[1], M, N, K, ep); break;
    default: return 2;
  }
  return 0;
}
}  // namespace

// One exported name per input signature: MindSpore caches a Custom op's graph by its function name, so
// variants with different input counts must not share one.
QK_KERNEL(Linear) { return nparam == 3 ? linear(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearBias) { return nparam == 4 ? linear(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearInt8) { return nparam == 4 ? linear(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(LinearInt8Bias) { return nparam == 5 ? linear(nparam, params, ndims, shapes, dtypes) : 1; }
