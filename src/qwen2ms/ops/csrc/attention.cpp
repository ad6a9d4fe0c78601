// Grouped-query attention in one kernel: scores, boolean mask, fp32 softmax and the weighted sum of values.
//
// Decoding runs ~12 small MindSpore ops per layer for attention; one kernel call replaces them. The
// semantics are those of the reference: masked scores become -1e30 (so a fully masked row averages
// every key uniformly instead of producing NaN), probabilities are rounded to the query dtype before
// they weight the values.
#include "common.h"

using namespace qk;

namespace {
constexpr float kMaskValue = -1.0e30f;
}

// inputs: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, D], mask bool [B or 1, 1, T, S], scale [1] fp32
// output: [B, Hq, T, D] in the dtype of q. Query head h reads kv head h / (Hq / Hkv).
QK_KERNEL(Attention) {
  if (nparam != 6) return 1;
  DType qt = dtype_of(dtypes[0]), kt = dtype_of(dtypes[1]), vt = dtype_of(dtypes[2]), ot = dtype_of(dtypes[5]);
  if (!is_float(qt) || !is_float(kt) || !is_float(vt) || !is_float(ot)) return 2;
  if (std::strcmp(dtypes[3], "bool") != 0 || dtype_of(dtypes[4]) != F32) return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 4) return 3;
  const int64_t B = shapes[0][0], Hq = shapes[0][1], T = shapes[0][2], D = shapes[0][3];
  const int64_t Hkv = shapes[1][1], S = shapes[1][2];
  const int64_t MB = shapes[3][0];
  if (shapes[1][0] != B || shapes[1][3] != D || Hkv == 0 || Hq % Hkv != 0) return 3;
  if ((MB != 1 && MB != B) || shapes[3][1] != 1 || shapes[3][2] != T || shapes[3][3] != S) return 3;
  const float scale = *static_cast<const float *>(params[4]);
  const bool *mask = static_cast<const bool *>(params[3]);
  const int64_t group = Hq / Hkv, rows = B * Hq * T;
  // K and V converted to fp32 once (they are read by every query head of their group).
  std::vector<float> kbuf, vbuf;
  const float *kf = as_f32(params[1], kt, B * Hkv * S * D, kbuf);
  const float *vf = as_f32(params[2], vt, B * Hkv * S * D, vbuf);
  parallel_for(rows, 4, worth_threads(rows * S * D), [&](int64_t r0, int64_t r1) {
    std::vector<float> q(static_cast<size_t>(D)), p(static_cast<size_t>(S)), acc(static_cast<size_t>(D));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, h = (r / T) % Hq, b = r / (T * Hq);
      const int64_t kvh = h / group;
      const float *kb = kf + (b * Hkv + kvh) * S * D, *vb = vf + (b * Hkv + kvh) * S * D;
      const bool *mrow = mask + ((MB == 1 ? 0 : b) * T + t) * S;
      for (int64_t d = 0; d < D; ++d) q[d] = load(params[0], qt, r * D + d);
      float mx = kMaskValue;
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
        mx = p[s] > mx ? p[s] : mx;
      }
      double sum = 0.0;
      int64_t s = 0;
#if QK_SIMD
      // exp8 below its clamp would give ~1e-38 where std::exp underflows towards 0: those entries
      // (masked slots among them) are set to exactly 0, as the reference's softmax gives them.
      const __m256 vmx = _mm256_set1_ps(mx), floor = _mm256_set1_ps(-87.3f);
      for (; s + 8 <= S; s += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p.data() + s), vmx);
        const __m256 e = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, floor, _CMP_GE_OQ));
        _mm256_storeu_ps(p.data() + s, e);
        for (int j = 0; j < 8; ++j) sum += p[s + j];
      }
#endif
      for (; s < S; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float w = round_to(qt, p[s] * inv);
        if (w == 0.f) continue;
        const float *vr = vb + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
      }
      for (int64_t d = 0; d < D; ++d) store(params[5], ot, r * D + d, acc[d]);
    }
  });
  return 0;
}
