// Linear layer y = x @ W^T (* scale) (+ bias) over fp32/fp16/bf16/int8 weights with fp32 accumulation.
//
// Decode is memory-bound: each weight row is streamed once per call and reused for every row of x, so the
// bytes read per token are the weight bytes (half of fp32 for bf16, a quarter for int8). Several weight
// rows are walked together: more independent memory streams in flight, and each x vector loaded once
// serves all of them. Int8 weights carry fp32 scales per output channel ([N]) or per group of K ([N, G]).
#include <algorithm>

#include "common.h"

using namespace qk;

namespace {

#if QK_SIMD
// One step covers 16 weights as two 8-float vectors. (A 512-bit version measured within +-10% of this one
// on an AVX-512 machine: decode is bound by memory, not by vector width.)
using VF = __m256;
constexpr int VW = 8;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vload(const float *p) { return _mm256_loadu_ps(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vset1(float v) { return _mm256_set1_ps(v); }
inline float vsum(VF v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
template <int WT>
inline void wload(const void *p, int64_t i, VF &w0, VF &w1);
template <>
inline void wload<F32>(const void *p, int64_t i, VF &w0, VF &w1) {
  const float *f = static_cast<const float *>(p) + i;
  w0 = _mm256_loadu_ps(f);
  w1 = _mm256_loadu_ps(f + 8);
}
template <>
inline void wload<BF16>(const void *p, int64_t i, VF &w0, VF &w1) {
  // 16 bf16 in one load; in each 32-bit lane the low half is the even element and the high half the odd
  // one, so a shift and a mask give both as fp32 (x is pre-split into even/odd to match).
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + i));
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
template <>
inline void wload<F16>(const void *p, int64_t i, VF &w0, VF &w1) {
  const __m128i *h = reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i);
  w0 = _mm256_cvtph_ps(_mm_loadu_si128(h));
  w1 = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
}
template <>
inline void wload<I8>(const void *p, int64_t i, VF &w0, VF &w1) {
  const int8_t *b = static_cast<const int8_t *>(p) + i;
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(b))));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(b + 8))));
}
constexpr int KS = 2 * VW;  // weights per row per step
#else
constexpr int KS = 16;
#endif

// Chunks of ~64 KiB of weights are handed out to the threads dynamically: on a shared machine one thread
// may be descheduled, and a static split would leave the other waiting for it.
constexpr int64_t kChunkBytes = 64 << 10;
// Software prefetch this far ahead of the weight rows being read: the hardware prefetchers alone left a
// core at ~10 GB/s on bf16/int8 rows (measured best at 8 KiB among 0.25-16 KiB, all dtypes).
constexpr int64_t kPrefetchBytes = 8192;
// Weight rows walked together (4 beat 1, 2, 6 and 8 at one row of x).
constexpr int RB = 4;

template <int WT>
constexpr int64_t wbytes() {
  return WT == F32 ? 4 : (WT == I8 ? 1 : 2);
}

// x as the vector loop reads it: per row, the first Kv = K - K % KS elements, each step of KS elements
// laid out as the two vectors the weight loads produce (for bf16: the even elements, then the odd ones).
struct XView {
  const float *x;   // the original rows [M, K] (tails)
  const float *xv;  // the vector-loop layout, rows `ld` apart (ld = Kv for a copy, K for x itself)
  int64_t K, Kv, ld;
};

struct Epilogue {
  const float *scale;  // int8 weights: [N] per channel, or [N, G] per group (then applied in the loop)
  int64_t groups;      // G (1 = per channel)
  const void *bias;
  DType bias_t;
  void *out;
  DType out_t;
  int64_t N;
  inline void put(int64_t m, int64_t n, float v) const {
    if (scale && groups == 1) v *= scale[n];
    if (bias) v += load(bias, bias_t, n);
    store(out, out_t, m * N + n, v);
  }
};

// acc[r][m] = dot(W[n + r], x[m]) for R weight rows and MB rows of x (group scales applied when G > 1).
template <int WT, int R, int MB>
inline void dot_block(const void *w, int64_t n, const XView &xs, const Epilogue &ep, float acc[R][MB]) {
  const int64_t K = xs.K, Kv = xs.Kv;
#if QK_SIMD
  VF a[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) a[r][m] = vzero();
  const int64_t G = ep.groups;
  const int64_t gsteps = G > 1 ? (K / G) / KS : Kv / KS;  // steps per scale group
  const char *wb = static_cast<const char *>(w);
  for (int64_t g = 0, k = 0; k < Kv; ++g) {
    VF t[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) t[r][m] = vzero();
    const int64_t kend = k + gsteps * KS;
    auto step = [&](int64_t kk) {
      VF x0[MB], x1[MB];
      for (int m = 0; m < MB; ++m) {
        x0[m] = vload(xs.xv + m * xs.ld + kk);
        x1[m] = vload(xs.xv + m * xs.ld + kk + VW);
      }
      for (int r = 0; r < R; ++r) {
        VF w0, w1;
        wload<WT>(w, (n + r) * K + kk, w0, w1);
        for (int m = 0; m < MB; ++m) t[r][m] = vfma(w1, x1[m], vfma(w0, x0[m], t[r][m]));
      }
    };
    // One cache line of each weight row per iteration: one prefetch per line, no branch in the loop.
    constexpr int64_t LS = 64 / (KS * wbytes<WT>()) > 0 ? 64 / (KS * wbytes<WT>()) : 1;
    for (; k + LS * KS <= kend; k += LS * KS) {
      for (int r = 0; r < R; ++r)
        _mm_prefetch(wb + ((n + r) * K + k) * wbytes<WT>() + kPrefetchBytes, _MM_HINT_T0);
      for (int64_t j = 0; j < LS; ++j) step(k + j * KS);
    }
    for (; k < kend; k += KS) step(k);
    if (G > 1) {
      for (int r = 0; r < R; ++r) {
        const VF s = vset1(ep.scale[(n + r) * G + g]);
        for (int m = 0; m < MB; ++m) a[r][m] = vfma(t[r][m], s, a[r][m]);
      }
    } else {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) a[r][m] = t[r][m];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vsum(a[r][m]);
#else
  (void)Kv;
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.f;
#endif
  // Scalar tail (and the whole row without SIMD); grouped scales need K % (G * KS) == 0, so no tail then.
  for (int64_t k = xs.Kv; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float wv = load(w, static_cast<DType>(WT), (n + r) * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] += wv * xs.x[m * K + k];
    }
#if !QK_SIMD
  if (ep.groups > 1) {  // without SIMD Kv is 0: redo the grouped sums exactly
    const int64_t gs = K / ep.groups;
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        float total = 0.f;
        for (int64_t g = 0; g < ep.groups; ++g) {
          float s = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k)
            s += load(w, static_cast<DType>(WT), (n + r) * K + k) * xs.x[m * K + k];
          total += s * ep.scale[(n + r) * ep.groups + g];
        }
        acc[r][m] = total;
      }
  }
#endif
}

template <int WT, int R, int MB>
inline void rows_block(const void *w, int64_t n, int64_t m0, const XView &xs, const Epilogue &ep) {
  XView sub{xs.x + m0 * xs.K, xs.xv + m0 * xs.ld, xs.K, xs.Kv, xs.ld};
  float acc[R][MB];
  dot_block<WT, R, MB>(w, n, sub, ep, acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) ep.put(m0 + m, n + r, acc[r][m]);
}

// All rows of x against weight rows [n, n + R): x rows in blocks of eight (one weight row at a time) or up
// to four (two weight rows at a time), so the accumulators stay in registers.
template <int WT, int R>
inline void rows_all_m(const void *w, int64_t n, int64_t M, const XView &xs, const Epilogue &ep) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8)  // widen each weight vector once for eight rows of x
    for (int r = 0; r < R; ++r) rows_block<WT, 1, 8>(w, n + r, m, xs, ep);
  for (; m + 4 <= M; m += 4) {
    if constexpr (R >= 2) {
      for (int r = 0; r + 2 <= R; r += 2) rows_block<WT, 2, 4>(w, n + r, m, xs, ep);
      if constexpr (R % 2) rows_block<WT, 1, 4>(w, n + R - 1, m, xs, ep);
    } else {
      rows_block<WT, 1, 4>(w, n, m, xs, ep);
    }
  }
  switch (M - m) {
    case 3:
      rows_block<WT, (R > 2 ? 2 : R), 3>(w, n, m, xs, ep);
      if constexpr (R > 2) rows_block<WT, R - 2, 3>(w, n + 2, m, xs, ep);
      break;
    case 2: rows_block<WT, R, 2>(w, n, m, xs, ep); break;
    case 1: rows_block<WT, R, 1>(w, n, m, xs, ep); break;
    default: break;
  }
}

template <int WT>
void linear_impl(const XView &xs, const void *w, int64_t M, int64_t N, const Epilogue &ep) {
  const int64_t row_bytes = std::max<int64_t>(1, xs.K * wbytes<WT>());
  const int64_t nblocks = (N + RB - 1) / RB;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (row_bytes * RB));
  parallel_for(nblocks, chunk, N * xs.K >= (1 << 14), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * RB;
      if (n + RB <= N) {
        rows_all_m<WT, RB>(w, n, M, xs, ep);
      } else {
        for (int64_t r = n; r < N; ++r) rows_all_m<WT, 1>(w, r, M, xs, ep);
      }
    }
  });
}

// The vector-loop layout of x (see XView); for non-bf16 weights it is x itself.
const float *vector_layout(const float *x, int64_t M, int64_t K, int64_t Kv, DType wt, std::vector<float> &buf) {
  if (wt != BF16 || Kv == 0) return x;
  buf.resize(static_cast<size_t>(M * Kv));
  constexpr int H = KS / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kv; k += KS)
      for (int j = 0; j < H; ++j) {
        buf[m * Kv + k + j] = x[m * K + k + 2 * j];
        buf[m * Kv + k + H + j] = x[m * K + k + 2 * j + 1];
      }
  return buf.data();
}

// inputs: x [..., K], weight [N, K], (scale [N] or [N, G] fp32 when the weight is int8), (bias [N]);
// output [..., N]. Group scales need K % (G * 16) == 0 (groups of whole vector steps). Returns nonzero on
// bad inputs: 1 wrong count, 2 dtype, 3 shape.
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
  int64_t groups = 1;
  if (quant) {
    if (ndims[2] == 2) {
      if (shapes[2][0] != N || shapes[2][1] < 1) return 3;
      groups = shapes[2][1];
      if (groups > 1 && (K % groups != 0 || (K / groups) % 32 != 0)) return 3;
    } else if (ndims[2] != 1 || shapes[2][0] != N) {
      return 3;
    }
  }
  Epilogue ep{quant ? static_cast<const float *>(params[2]) : nullptr, groups, nullptr, F32, params[out], ot, N};
  if (n_extra == 1) {
    const int bi = quant ? 3 : 2;
    ep.bias = params[bi];
    ep.bias_t = dtype_of(dtypes[bi]);
    if (!is_float(ep.bias_t)) return 2;
  }
  std::vector<float> xbuf, vbuf;
  const float *x = as_f32(params[0], xt, M * K, xbuf);
#if QK_SIMD
  const int64_t Kv = K - K % KS;
#else
  const int64_t Kv = 0;
#endif
  const float *xv = vector_layout(x, M, K, Kv, wt, vbuf);
  XView xs{x, xv, K, Kv, xv == x ? K : Kv};
  switch (wt) {
    case F32: linear_impl<F32>(xs, params[1], M, N, ep); break;
    case F16: linear_impl<F16>(xs, params[1], M, N, ep); break;
    case BF16: linear_impl<BF16>(xs, params[1], M, N, ep); break;
    case I8: linear_impl<I8>(xs, params[1], M, N, ep); break;
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
