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
  // Quantised activations (int8/int4 weights; see quantize_x): per row, x as int8 codes in blocks of 32 inputs
  // (`qld` = 32 * qnb codes, a partial last block zero-padded), each block's scale xd ([M, qnb]) and, for int4,
  // xc = 8 * sum(codes) * scale per block. Null xq means fp32 activations.
  const int8_t *xq = nullptr;
  const float *xd = nullptr, *xc = nullptr;
  int64_t qnb = 0, qld = 0;
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

// ---- Quantised activations (int8/int4 weights) ----------------------------------------------------------------
// llama.cpp's Q8_0 x Q4_0/Q8_0 scheme: each row of x is rounded once per call to int8 codes per block of 32
// inputs (scale max|x| / 127, round to nearest even), and every block's dot product is an integer one, scaled
// once per block by (x scale) * (weight scale). Widening weights to fp32 cost ~28 (int4) / ~16 (int8)
// instructions per 32 weights against ~7 here, and decode with int4 weights was bound by that, not by memory.

// A block whose max |x| is below this counts as zero (scale 0): 127 / max|x| would come close to overflowing fp32,
// and such a block adds less than 2e-36 per unit weight.
constexpr float kQ8MinAmax = 127.f * 1.17549435e-38f;

// Scale and codes of one block of n <= 32 inputs (codes past n are 0). A non-finite input gives scale NaN, so
// the outputs it reaches are NaN (as in fp32), never a made-up number.
inline float quantize_block(const float *x, int n, int8_t *q) {
  float amax = 0.f;
  bool finite = true;
#if QK_SIMD
  if (n == 32) {
    // inf - inf and NaN - NaN are NaN: one unordered compare per vector finds any non-finite input.
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int j = 0; j < 32; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
      const __m256 z = _mm256_sub_ps(v, v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    amax = _mm_cvtss_f32(h);
    finite = _mm256_movemask_ps(bad) == 0;
  } else
#endif
  {
    for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
    for (int j = 0; j < n; ++j) finite = finite && std::isfinite(x[j]);
  }
  if (!finite || !(amax >= kQ8MinAmax)) {
    std::memset(q, 0, 32);
    return finite ? 0.f : std::nanf("");
  }
  const float d = amax / 127.f, id = 127.f / amax;  // ggml's quantize_row_q8_0 (AVX2) rounds with 127 / max|x| too
#if QK_SIMD
  if (n == 32) {
    const __m256 vid = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vid));  // MXCSR: round to nearest even
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), vid));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), vid));
    // The packs interleave 128-bit lanes: the final permute puts the 32 codes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(q),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return d;
  }
#endif
  for (int j = 0; j < 32; ++j) q[j] = j < n ? static_cast<int8_t>(std::nearbyint(x[j] * id)) : 0;
  return d;
}

// Codes, scales and (int4) block corrections of rows x [M, K] into p's buffers, and p.xs pointing at them.
struct Q8Buf {
  std::vector<int8_t> q;
  std::vector<float> d, c;
};
inline void quantize_x(const float *x, int64_t M, int64_t K, DType wt, Q8Buf &buf, XView &xs) {
  const int64_t qnb = (K + 31) / 32;
  buf.q.resize(static_cast<size_t>(M * qnb * 32));
  buf.d.resize(static_cast<size_t>(M * qnb));
  if (wt == U4) buf.c.resize(static_cast<size_t>(M * qnb));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < qnb; ++b) {
      int8_t *q = &buf.q[(m * qnb + b) * 32];
      const float d = quantize_block(x + m * K + b * 32, static_cast<int>(std::min<int64_t>(32, K - b * 32)), q);
      buf.d[m * qnb + b] = d;
      if (wt == U4) {
        int s = 0;
        for (int j = 0; j < 32; ++j) s += q[j];
        buf.c[m * qnb + b] = static_cast<float>(8 * s) * d;
      }
    }
  xs.xq = buf.q.data();
  xs.xd = buf.d.data();
  xs.xc = wt == U4 ? buf.c.data() : nullptr;
  xs.qnb = qnb;
  xs.qld = qnb * 32;
}

#if QK_SIMD
inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
// Eight int32 partial sums of u[i] * s[i] over 32 bytes (u unsigned, s signed). Never saturates here: |u| <= 128
// and |s| <= 127 keep each int16 pair sum of maddubs below 2^15, so VNNI's dpbusd gives the same values.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// The 32 weights of block b of a row as bytes an unsigned x signed product takes: int8 as |w| (signs moved onto
// x by sign_x), int4 as the stored nibbles 0..15 in input order (byte j's low nibble is input j, high j + 16).
template <int WT>
inline __m256i wblock(const void *row, int64_t b) {
  if constexpr (WT == I8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const int8_t *>(row) + b * 32));
  } else {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint8_t *>(row) + b * 16));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(15));
  }
}
#endif

// acc[r][m] = dot(W[n + r], x[m]) over quantised x (dot_block's contract; group scales applied, per-channel
// scales left to the epilogue).
template <int WT, int R, int MB>
inline void dot_block_q8(const void *w, int64_t n, const XView &xs, const Epilogue &ep, float acc[R][MB]) {
  const int64_t K = xs.K, nb = K / 32, gn = ep.groups > 1 ? ep.groups : 1, bpg = gn > 1 ? nb / gn : nb + 1;
  const int64_t row_bytes = WT == U4 ? K / 2 : K;
  const char *wr[R];
  for (int r = 0; r < R; ++r) wr[r] = static_cast<const char *>(w) + (n + r) * row_bytes;
  auto wscale = [&](int r, int64_t b) { return gn > 1 ? ep.scale[(n + r) * gn + b / bpg] : 1.f; };
#if QK_SIMD
  __m256 a[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) a[r][m] = _mm256_setzero_ps();
  constexpr int64_t BPL = WT == U4 ? 4 : 2;  // blocks per 64-byte cache line of a weight row
  // Group by group, so each weight scale is loaded once per group (per channel: one group of all blocks).
  for (int64_t g = 0, b = 0; g < gn; ++g) {
    __m256 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm256_set1_ps(gn > 1 ? ep.scale[(n + r) * gn + g] : 1.f);
    for (const int64_t bend = gn > 1 ? b + bpg : nb; b < bend; ++b) {
      if (b % BPL == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(wr[r] + b * (WT == U4 ? 16 : 32) + kPrefetchBytes, _MM_HINT_T0);
      __m256i xv[MB];
      __m256 xd[MB];
      for (int m = 0; m < MB; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xs.xq + m * xs.qld + b * 32));
        xd[m] = _mm256_broadcast_ss(xs.xd + m * xs.qnb + b);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i wv = wblock<WT>(wr[r], b);
        const __m256i u = WT == I8 ? _mm256_sign_epi8(wv, wv) : wv;
        for (int m = 0; m < MB; ++m) {
          const __m256i p = dot_u8s8(u, WT == I8 ? _mm256_sign_epi8(xv[m], wv) : xv[m]);
          a[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), gn > 1 ? _mm256_mul_ps(xd[m], s[r]) : xd[m], a[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = hsum256(a[r][m]);
#else
  // The same sums without SIMD: an exact integer dot per block, then the block's float scale.
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float t = 0.f;
      const int8_t *q = xs.xq + m * xs.qld;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) {
          const int64_t k = b * 32 + j;
          const int wv = WT == I8 ? static_cast<const int8_t *>(static_cast<const void *>(wr[r]))[k]
                                  : ((static_cast<const uint8_t *>(static_cast<const void *>(wr[r]))[b * 16 + (j & 15)] >>
                                      ((j & 16) ? 4 : 0)) & 15);
          s += wv * q[k];
        }
        t += static_cast<float>(s) * (xs.xd[m * xs.qnb + b] * wscale(r, b));
      }
      acc[r][m] = t;
    }
#endif
  if constexpr (WT == U4) {
    // The stored nibbles are value + 8: take 8 * sum(codes) * x scale * weight scale of every block off.
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        const float *c = xs.xc + m * xs.qnb;
        float corr = 0.f;
        if (gn > 1 && gn == nb) {  // int4 groups of 32: one scale per block
          const float *s = ep.scale + (n + r) * gn;
          for (int64_t b = 0; b < nb; ++b) corr += c[b] * s[b];
        } else {
          for (int64_t g = 0; g < gn; ++g) {
            float sx = 0.f;
            const int64_t b0 = gn > 1 ? g * bpg : 0, b1 = gn > 1 ? b0 + bpg : nb;
            for (int64_t b = b0; b < b1; ++b) sx += c[b];
            corr += sx * wscale(r, b0);
          }
        }
        acc[r][m] -= corr;
      }
  } else if (K % 32) {
    // int8 per channel with K not a multiple of 32: the partial last block (its codes past K are 0).
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        int32_t s = 0;
        for (int64_t k = nb * 32; k < K; ++k) s += static_cast<const int8_t *>(static_cast<const void *>(wr[r]))[k] * xs.xq[m * xs.qld + k];
        acc[r][m] += static_cast<float>(s) * xs.xd[m * xs.qnb + nb];
      }
  }
}

template <int WT, int R, int MB>
inline void rows_block(const void *w, int64_t n, int64_t m0, const XView &xs, const Epilogue &ep) {
  XView sub{xs.x + m0 * xs.K, xs.xv + m0 * xs.ld, xs.K, xs.Kv, xs.ld,
            xs.bsum ? xs.bsum + m0 * (xs.K / 32) : nullptr};
  float acc[R][MB];
  if constexpr (WT == I8 || WT == U4) {
    if (xs.xq) {
      sub.xq = xs.xq + m0 * xs.qld;
      sub.xd = xs.xd + m0 * xs.qnb;
      sub.xc = xs.xc ? xs.xc + m0 * xs.qnb : nullptr;
      sub.qnb = xs.qnb;
      sub.qld = xs.qld;
      dot_block_q8<WT, R, MB>(w, n, sub, ep, acc);
    } else {
      dot_block<WT, R, MB>(w, n, sub, ep, acc);
    }
  } else {
    dot_block<WT, R, MB>(w, n, sub, ep, acc);
  }
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

// x prepared for the projections of one weight dtype: its vector-loop layout and (int4) block sums, or its
// int8 codes (quantised activations).
struct XPrep {
  std::vector<float> vbuf, sbuf;
  Q8Buf q8;
  XView xs{};
};

// Fills p.xs for fp32 rows x [M, K] read against weights of dtype wt (x must outlive p.xs); with q8 and int8/int4
// weights, x is quantised to int8 codes per block of 32 (quantize_x) and the integer dot products run.
inline void prepare_x(const float *x, int64_t M, int64_t K, DType wt, XPrep &p, bool q8 = false) {
  if (q8 && (wt == I8 || wt == U4)) {
    p.xs = XView{x, x, K, 0, K};
    quantize_x(x, M, K, wt, p.q8, p.xs);
    return;
  }
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
