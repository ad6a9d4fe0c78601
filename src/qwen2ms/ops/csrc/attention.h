// Attention pieces shared by the attention kernel and the fused decode layer: the fp32 softmax row and the
// per-query loop for a few query tokens (decoding).
#pragma once

#include "common.h"

namespace qk {

constexpr float kMaskValue = -1.0e30f;

// Softmax of one row of scores in place (masked entries hold kMaskValue); returns 1 / sum.
inline float softmax_row(float *p, int64_t S) {
  float mx = kMaskValue;
  int64_t s = 0;
#if QK_SIMD
  __m256 vm = _mm256_set1_ps(kMaskValue);
  for (; s + 8 <= S; s += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(p + s));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vm);
  for (int j = 0; j < 8; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
#endif
  for (; s < S; ++s) mx = p[s] > mx ? p[s] : mx;
  double sum = 0.0;
  s = 0;
#if QK_SIMD
  // exp8 below its clamp would give ~1e-38 where std::exp underflows towards 0: those entries
  // (masked slots among them) are set to exactly 0, as the reference's softmax gives them.
  const __m256 vmx = _mm256_set1_ps(mx), floor = _mm256_set1_ps(-87.3f);
  __m256 vsum = _mm256_setzero_ps();
  for (; s + 8 <= S; s += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + s), vmx);
    const __m256 e = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, floor, _CMP_GE_OQ));
    _mm256_storeu_ps(p + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_store_ps(lanes, vsum);
  for (int j = 0; j < 8; ++j) sum += lanes[j];
#endif
  for (; s < S; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  return static_cast<float>(1.0 / sum);
}

// Few query tokens (decoding): one query row of one head at a time against every key of its kv head; masked
// slots (e.g. the cache's unwritten tail) cost no dot product. q [B, Hq, T, D] (dtype qt), K/V fp32
// [B, Hkv, S, D], mask [MB, 1, T, S] (MB in {1, B}); out [B, Hq, T, D] (dtype ot).
inline void attend_rows(const void *qp, DType qt, const float *kf, const float *vf, const bool *mask, int64_t MB,
                        float scale, void *out, DType ot, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S,
                        int64_t D) {
  const int64_t group = Hq / Hkv, rows = B * Hq * T;
  parallel_for(rows, 4, worth_threads(rows * S * D), [&](int64_t r0, int64_t r1) {
    std::vector<float> q(static_cast<size_t>(D)), p(static_cast<size_t>(S)), acc(static_cast<size_t>(D));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, h = (r / T) % Hq, b = r / (T * Hq);
      const int64_t kvh = h / group;
      const float *kb = kf + (b * Hkv + kvh) * S * D, *vb = vf + (b * Hkv + kvh) * S * D;
      const bool *mrow = mask + ((MB == 1 ? 0 : b) * T + t) * S;
      for (int64_t d = 0; d < D; ++d) q[d] = load(qp, qt, r * D + d);
      for (int64_t s = 0; s < S; ++s) {
        if (!mrow[s]) {  // masked slots (e.g. the cache's unwritten tail) cost no dot product
          p[s] = kMaskValue;
          continue;
        }
        float dot = 0.f;
        const float *kr = kb + s * D;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[d] * kr[d];
        // The reference multiplies in the query dtype before the fp32 softmax.
        p[s] = round_to(qt, round_to(qt, dot) * scale);
      }
      const float inv = softmax_row(p.data(), S);
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float w = round_to(qt, p[s] * inv);
        if (w == 0.f) continue;
        const float *vr = vb + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
      }
      for (int64_t d = 0; d < D; ++d) store(out, ot, r * D + d, acc[d]);
    }
  });
}

}  // namespace qk
