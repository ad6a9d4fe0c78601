// Grouped-query attention in one kernel: scores, boolean mask, fp32 softmax and the weighted sum of values.
//
// Decoding runs ~12 small MindSpore ops per layer for attention; one kernel call replaces them. The
// semantics are those of the reference: masked scores become -1e30 (so a fully masked row averages
// every key uniformly instead of producing NaN), probabilities are rounded to the query dtype before
// they weight the values.
#include <algorithm>

#include "attention.h"

using namespace qk;

namespace {
#if QK_SIMD
// Many query tokens (prefill): blocks of QB query rows of one head against K stored transposed, so the
// scores of 8 keys for QB rows come from broadcast-FMAs without horizontal sums, and each V row serves
// all QB rows. Key blocks masked for every row of the block (the causal future) are skipped.
constexpr int QB = 4;

void attention_blocked(const void *qp, DType qt, const float *kf, const float *vf, const bool *mask, int64_t MB,
                       float scale, void *out, DType ot, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S,
                       int64_t D) {
  const int64_t group = Hq / Hkv, Sp = (S + 7) / 8 * 8;
  // K^T per (batch, kv head): [D, Sp], zero-padded to whole blocks of 8 keys.
  std::vector<float> kt(static_cast<size_t>(B * Hkv * D * Sp), 0.f);
  for (int64_t bh = 0; bh < B * Hkv; ++bh)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) kt[(bh * D + d) * Sp + s] = kf[(bh * S + s) * D + d];
  const int64_t qblocks = (T + QB - 1) / QB, units = B * Hq * qblocks;
  parallel_for(units, 1, true, [&](int64_t u0, int64_t u1) {
    std::vector<float> q(static_cast<size_t>(QB * D)), p(static_cast<size_t>(QB * Sp)), acc(static_cast<size_t>(D));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t tb = u % qblocks, h = (u / qblocks) % Hq, b = u / (qblocks * Hq);
      const int64_t t0 = tb * QB, nq = std::min<int64_t>(QB, T - t0), kvh = h / group;
      const float *ktb = kt.data() + (b * Hkv + kvh) * D * Sp, *vb = vf + (b * Hkv + kvh) * S * D;
      const bool *mb = mask + (MB == 1 ? 0 : b) * T * S;
      for (int i = 0; i < QB; ++i)
        for (int64_t d = 0; d < D; ++d)
          q[i * D + d] = i < nq ? load(qp, qt, ((b * Hq + h) * T + t0 + i) * D + d) : 0.f;
      for (int64_t s0 = 0; s0 < Sp; s0 += 8) {
        bool any = false;
        for (int i = 0; i < nq && !any; ++i)
          for (int64_t s = s0; s < std::min<int64_t>(s0 + 8, S); ++s) any |= mb[(t0 + i) * S + s];
        if (!any) {
          for (int i = 0; i < QB; ++i)
            for (int j = 0; j < 8; ++j) p[i * Sp + s0 + j] = kMaskValue;
          continue;
        }
        __m256 a[QB];
        for (int i = 0; i < QB; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
          const __m256 kv = _mm256_loadu_ps(ktb + d * Sp + s0);
          for (int i = 0; i < QB; ++i) a[i] = _mm256_fmadd_ps(_mm256_set1_ps(q[i * D + d]), kv, a[i]);
        }
        for (int i = 0; i < QB; ++i) {
          if (qt == F32 && i < nq && s0 + 8 <= S) {
            uint64_t m8;
            std::memcpy(&m8, mb + (t0 + i) * S + s0, 8);
            if (m8 == 0x0101010101010101ull) {  // all eight keys visible: no rounding, no mask
              _mm256_storeu_ps(p.data() + i * Sp + s0, _mm256_mul_ps(a[i], _mm256_set1_ps(scale)));
              continue;
            }
          }
          alignas(32) float v[8];
          _mm256_store_ps(v, a[i]);
          for (int j = 0; j < 8; ++j) {
            const int64_t s = s0 + j;
            // The reference multiplies in the query dtype before the fp32 softmax.
            p[i * Sp + s] = (i < nq && s < S && mb[(t0 + i) * S + s]) ? round_to(qt, round_to(qt, v[j]) * scale)
                                                                        : kMaskValue;
          }
        }
      }
      for (int i = 0; i < nq; ++i) {
        float *pr = p.data() + i * Sp;
        // Keys after the row's last visible one get probability 0: the softmax runs over the rest only
        // (a fully masked row keeps the reference's uniform average over all S keys).
        const bool *mrow = mb + (t0 + i) * S;
        int64_t e = S;
        while (e > 0 && !mrow[e - 1]) --e;
        if (e == 0) e = S;
        const float inv = softmax_row(pr, e);
        int64_t s = 0;
        if (qt == F32)
          for (const __m256 vi = _mm256_set1_ps(inv); s + 8 <= e; s += 8)
            _mm256_storeu_ps(pr + s, _mm256_mul_ps(_mm256_loadu_ps(pr + s), vi));
        for (; s < e; ++s) pr[s] = round_to(qt, pr[s] * inv);
        for (s = e; s < S; ++s) pr[s] = 0.f;
      }
      // Weighted values: 16 columns at a time for all QB rows in registers, each V load serving QB rows.
      int64_t send = 0;  // keys past the last nonzero weight of the block add nothing
      for (int i = 0; i < nq; ++i)
        for (int64_t s = S; s > send; --s)
          if (p[i * Sp + s - 1] != 0.f) {
            send = s;
            break;
          }
      for (int i = nq; i < QB; ++i)
        for (int64_t s = 0; s < S; ++s) p[i * Sp + s] = 0.f;
      int64_t d0 = 0;
      for (; d0 + 16 <= D; d0 += 16) {
        __m256 o[QB][2];
        for (int i = 0; i < QB; ++i) o[i][0] = o[i][1] = _mm256_setzero_ps();
        for (int64_t s = 0; s < send; ++s) {
          const __m256 v0 = _mm256_loadu_ps(vb + s * D + d0), v1 = _mm256_loadu_ps(vb + s * D + d0 + 8);
          for (int i = 0; i < QB; ++i) {
            const __m256 w = _mm256_set1_ps(p[i * Sp + s]);
            o[i][0] = _mm256_fmadd_ps(w, v0, o[i][0]);
            o[i][1] = _mm256_fmadd_ps(w, v1, o[i][1]);
          }
        }
        for (int i = 0; i < nq; ++i) {
          alignas(32) float v[16];
          _mm256_store_ps(v, o[i][0]);
          _mm256_store_ps(v + 8, o[i][1]);
          for (int j = 0; j < 16; ++j) store(out, ot, ((b * Hq + h) * T + t0 + i) * D + d0 + j, v[j]);
        }
      }
      for (int i = 0; i < nq && d0 < D; ++i) {  // head sizes that are not a multiple of 16
        for (int64_t d = d0; d < D; ++d) acc[d] = 0.f;
        for (int64_t s = 0; s < send; ++s)
          for (int64_t d = d0; d < D; ++d) acc[d] += p[i * Sp + s] * vb[s * D + d];
        for (int64_t d = d0; d < D; ++d) store(out, ot, ((b * Hq + h) * T + t0 + i) * D + d, acc[d]);
      }
    }
  });
}
#endif
}  // namespace

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
  // K and V converted to fp32 once (they are read by every query head of their group).
  std::vector<float> kbuf, vbuf;
  const float *kf = as_f32(params[1], kt, B * Hkv * S * D, kbuf);
  const float *vf = as_f32(params[2], vt, B * Hkv * S * D, vbuf);
#if QK_SIMD
  if (T > 16) {
    attention_blocked(params[0], qt, kf, vf, mask, MB, scale, params[5], ot, B, Hq, Hkv, T, S, D);
    return 0;
  }
#endif
  attend_rows(params[0], qt, kf, vf, mask, MB, scale, params[5], ot, B, Hq, Hkv, T, S, D);
  return 0;
}
