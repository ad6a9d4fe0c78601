// GEMV/small-GEMM internals of the linear kernels, shared by linear.cpp and the fused decode layer.
//
// Decode is memory-bound: each weight row is streamed once per call and reused for every row of x, so the
// bytes read per token are the weight bytes (half of fp32 for bf16, a quarter for int8). Several weight
// rows are walked together: more independent memory streams in flight, and each x vector loaded once
// serves all of them. Int8 weights carry fp32 scales per output channel ([N]) or per group of K ([N, G]);
// int4 weights (packed two per byte, see U4 in common.h) carry them per group of 32 or more inputs.
#pragma once

#include <algorithm>

#include "common.h"

namespace qk {
namespace lin {
#if QK_SIMD && defined(__AVX512F__) && defined(__AVX512BW__)
// One step covers 32 weights as two 16-float vectors (built with AVX-512 when the CPU has it: widening
// int8 to fp32 then takes half the shuffle instructions, which bound the int8 kernel).
using VF = __m512;
constexpr int VW = 16;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vload(const float *p) { return _mm512_loadu_ps(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vset1(float v) { return _mm512_set1_ps(v); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
template <int WT>
inline void wload(const void *p, int64_t i, VF &w0, VF &w1);
template <>
inline void wload<F32>(const void *p, int64_t i, VF &w0, VF &w1) {
  const float *f = static_cast<const float *>(p) + i;
  w0 = _mm512_loadu_ps(f);
  w1 = _mm512_loadu_ps(f + 16);
}
template <>
inline void wload<BF16>(const void *p, int64_t i, VF &w0, VF &w1) {
  __m512i v = _mm512_loadu_si512(static_cast<const uint16_t *>(p) + i);
  w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  w1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
template <>
inline void wload<F16>(const void *p, int64_t i, VF &w0, VF &w1) {
  const __m256i *h = reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + i);
  w0 = _mm512_cvtph_ps(_mm256_loadu_si256(h));
  w1 = _mm512_cvtph_ps(_mm256_loadu_si256(h + 1));
}
template <>
inline void wload<I8>(const void *p, int64_t i, VF &w0, VF &w1) {
  const __m128i *b = reinterpret_cast<const __m128i *>(static_cast<const int8_t *>(p) + i);
  w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b)));
  w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1)));
}
#elif QK_SIMD
// One step covers 16 weights as two 8-float vectors.
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
#endif
#if QK_SIMD
constexpr int KS = 2 * VW;  // weights per row per step

// dot(nibbles as stored (0..15), x) over one block of 32 inputs (16 bytes at `b`), x in the vector-loop layout.
// 512-bit: one widening, low nibbles are inputs 0-15 and high nibbles 16-31 (x as it is). 256-bit: two
// widenings of 8 bytes, whose low/high nibbles are inputs 0-7/16-23 and 8-15/24-31 (x permuted to match).
inline VF u4_block(const uint8_t *b, const float *x) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b)));
  const __m512i lo = _mm512_set1_epi32(15);
  const VF t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo)), vload(x));
  return vfma(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vload(x + 16), t);
#else
  const __m256i lo = _mm256_set1_epi32(15);
  const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(b)));
  const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(b + 8)));
  VF t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, lo)), vload(x));
  t = vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), vload(x + 8), t);
  t = vfma(_mm256_cvtepi32_ps(_mm256_and_si256(v1, lo)), vload(x + 16), t);
  return vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), vload(x + 24), t);
#endif
}
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

// Byte offset of weight element i (int4: two per byte; i is even wherever this is used).
template <int WT>
constexpr int64_t wbyte_offset(int64_t i) {
  return WT == F32 ? 4 * i : (WT == I8 ? i : (WT == U4 ? i / 2 : 2 * i));
}

// x as the vector loop reads it: per row, the first Kv = K - K % KS elements, each step of KS elements
// laid out as the two vectors the weight loads produce (for bf16: the even elements, then the odd ones).
struct XView {
  const float *x;   // the original rows [M, K] (tails)
  const float *xv;  // the vector-loop layout, rows `ld` apart (ld = Kv for a copy, K for x itself)
  int64_t K, Kv, ld;
  // int4 weights: the sum of x over each block of 32 inputs, [M, K / 32]. The vector loop multiplies x by the
  // stored nibbles (value + 8) and subtracts 8 * sum(x) per group once, saving two instructions per 16 weights.
  const float *bsum = nullptr;
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
  if constexpr (WT == U4) {
    // Block by block (32 inputs, 16 bytes per row), each block's partial dot scaled by its group's scale: the
    // generic step loop kept too many accumulators live for groups of only 32 inputs.
    const uint8_t *wr[R];
    for (int r = 0; r < R; ++r) wr[r] = static_cast<const uint8_t *>(w) + (n + r) * (K / 2);
    const int64_t nb = K / 32, gn = ep.groups > 1 ? ep.groups : 1, bpg = nb / gn;
    for (int64_t g = 0, b = 0; g < gn; ++g) {
      for (const int64_t bend = b + bpg; b < bend; ++b) {
        if ((b & 3) == 0)  // a cache line of each row per four blocks
          for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char *>(wr[r] + b * 16) + kPrefetchBytes, _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          const VF s = vset1(gn > 1 ? ep.scale[(n + r) * gn + g] : 1.f);  // per channel: the epilogue scales
          for (int m = 0; m < MB; ++m) a[r][m] = vfma(u4_block(wr[r] + b * 16, xs.xv + m * xs.ld + b * 32), s, a[r][m]);
        }
      }
    }
    // The stored nibbles are value + 8: take 8 * sum over groups of scale * sum(x over the group) off.
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        float corr = 0.f;
        for (int64_t g = 0; g < gn; ++g) {
          float sx = 0.f;
          for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) sx += xs.bsum[m * nb + b];
          corr += (gn > 1 ? ep.scale[(n + r) * gn + g] : 1.f) * sx;
        }
        acc[r][m] = vsum(a[r][m]) - 8.f * corr;
      }
  } else {
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
    constexpr int64_t LS = 64 / wbyte_offset<WT>(KS) > 0 ? 64 / wbyte_offset<WT>(KS) : 1;
    for (; k + LS * KS <= kend; k += LS * KS) {
      for (int r = 0; r < R; ++r)
        _mm_prefetch(wb + wbyte_offset<WT>((n + r) * K + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int64_t j = 0; j < LS; ++j) step(k + j * KS);
    }
    // Groups shorter than LS steps (int4/int8 groups of 32): prefetch whenever a cache line's worth begins.
    for (; k < kend; k += KS) {
      if ((k & (LS * KS - 1)) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(wb + wbyte_offset<WT>((n + r) * K + k) + kPrefetchBytes, _MM_HINT_T0);
      step(k);
    }
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
  }
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
  XView sub{xs.x + m0 * xs.K, xs.xv + m0 * xs.ld, xs.K, xs.Kv, xs.ld,
            xs.bsum ? xs.bsum + m0 * (xs.K / 32) : nullptr};
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

// The vector-loop layout of x (see XView); for fp32/fp16/int8 weights (and int4 with 512-bit vectors) it is x.
inline const float *vector_layout(const float *x, int64_t M, int64_t K, int64_t Kv, DType wt, std::vector<float> &buf) {
#if QK_SIMD
  if (wt == U4 && VW == 8 && Kv > 0) {
    // Per block of 32 the 256-bit int4 loads yield inputs 0-7, 16-23 (first step), 8-15, 24-31 (second step).
    buf.resize(static_cast<size_t>(M * Kv));
    static constexpr int kOrder[4] = {0, 16, 8, 24};
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < Kv; k += 32)
        for (int q = 0; q < 4; ++q) std::memcpy(&buf[m * Kv + k + 8 * q], &x[m * K + k + kOrder[q]], 8 * sizeof(float));
    return buf.data();
  }
#endif
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

// One weight matrix of a call: rows [N, K] and the epilogue that writes its output.
struct Proj {
  const void *w;
  int64_t N;
  Epilogue ep;
};

// Every projection of one x in one parallel region: the blocks of RB weight rows of all projections are
// handed out as one range, so q/k/v (or gate/up) cost one thread wake-up instead of one each.
template <int WT>
inline void project_impl(const XView &xs, int64_t M, const Proj *ps, int P) {
  const int64_t row_bytes = std::max<int64_t>(1, wbyte_offset<WT>(xs.K));
  int64_t first[4] = {0, 0, 0, 0}, work = 0;  // first block of each projection
  for (int p = 0; p < P; ++p) {
    first[p + 1] = first[p] + (ps[p].N + RB - 1) / RB;
    work += ps[p].N * xs.K;
  }
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (row_bytes * RB));
  parallel_for(first[P], chunk, work >= (1 << 14), [&](int64_t b0, int64_t b1) {
    int p = 0;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[p + 1]) ++p;
      const Proj &pr = ps[p];
      const int64_t n = (b - first[p]) * RB;
      if (n + RB <= pr.N) {
        rows_all_m<WT, RB>(pr.w, n, M, xs, pr.ep);
      } else {
        for (int64_t r = n; r < pr.N; ++r) rows_all_m<WT, 1>(pr.w, r, M, xs, pr.ep);
      }
    }
  });
}

// x prepared for the projections of one weight dtype: its vector-loop layout and (int4) block sums.
struct XPrep {
  std::vector<float> vbuf, sbuf;
  XView xs{};
};

// Fills p.xs for fp32 rows x [M, K] read against weights of dtype wt (x must outlive p.xs).
inline void prepare_x(const float *x, int64_t M, int64_t K, DType wt, XPrep &p) {
#if QK_SIMD
  const int64_t Kv = K - K % KS;
#else
  const int64_t Kv = 0;
#endif
  const float *xv = vector_layout(x, M, K, Kv, wt, p.vbuf);
  p.xs = XView{x, xv, K, Kv, xv == x ? K : Kv};
  if (wt == U4 && Kv > 0) {
    const int64_t nb = K / 32;
    p.sbuf.resize(static_cast<size_t>(M * nb));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        float sum = 0.f;
        for (int j = 0; j < 32; ++j) sum += x[m * K + b * 32 + j];
        p.sbuf[m * nb + b] = sum;
      }
    p.xs.bsum = p.sbuf.data();
  }
}

// P (<= 3) projections of one weight dtype over prepared x, in one parallel region.
inline void run_projections(DType wt, const XView &xs, int64_t M, const Proj *ps, int P) {
  switch (wt) {
    case F32: project_impl<F32>(xs, M, ps, P); break;
    case F16: project_impl<F16>(xs, M, ps, P); break;
    case BF16: project_impl<BF16>(xs, M, ps, P); break;
    case I8: project_impl<I8>(xs, M, ps, P); break;
    case U4: project_impl<U4>(xs, M, ps, P); break;
    default: break;
  }
}

// A weight input [N, K] (int4: uint8 [N, K / 2]) and, for int8/int4 weights, its fp32 scale input ([N] or
// [N, G], K / G a multiple of 32); si < 0 means no scale. Fills pr (output left unset) and returns 0, or 2 for a
// dtype and 3 for a shape that does not fit.
inline int parse_proj(int wi, int si, int64_t K, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      Proj &pr) {
  const DType wt = dtype_of(dtypes[wi]);
  if (wt == UNSUPPORTED) return 2;
  const bool quant = wt == I8 || wt == U4;
  if (quant != (si >= 0)) return 2;
  const int64_t packed = wt == U4 ? 2 : 1;
  if (ndims[wi] != 2 || shapes[wi][1] * packed != K || K % (wt == U4 ? 32 : 1) != 0) return 3;
  const int64_t N = shapes[wi][0];
  pr.w = params[wi];
  pr.N = N;
  pr.ep = Epilogue{nullptr, 1, nullptr, F32, nullptr, F32, N};
  if (quant) {
    if (dtype_of(dtypes[si]) != F32) return 2;
    if (ndims[si] == 2) {
      if (shapes[si][0] != N || shapes[si][1] < 1) return 3;
      pr.ep.groups = shapes[si][1];
      if (pr.ep.groups > 1 && (K % pr.ep.groups != 0 || (K / pr.ep.groups) % 32 != 0)) return 3;
    } else if (ndims[si] != 1 || shapes[si][0] != N) {
      return 3;
    }
    pr.ep.scale = static_cast<const float *>(params[si]);
  }
  return 0;
}

}  // namespace lin
}  // namespace qk
