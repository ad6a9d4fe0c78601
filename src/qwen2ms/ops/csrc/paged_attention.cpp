// Paged KV cache kernels: the write of this step's keys/values at a slot per token, and attention that reads K/V
// through per-sequence block tables in place (no gathered copy of each sequence's cache per layer and step).
//
// Pool layout [num_blocks, block_size, Hkv, D] (Ascend ReshapeAndCache's); slot = block * block_size + offset.
// Attention has the reference's semantics (qwen2ms.ops.reference.paged_attention = attention over the gathered
// keys): masked scores are -1e30 (a fully masked row averages every key uniformly), scores are rounded to the
// query dtype before the fp32 softmax and probabilities before they weight the values.
#include <algorithm>

#include "attention.h"

using namespace qk;

namespace {
// One cache row (D values of one kv head at one slot) as fp32: the pool's own memory when it is fp32.
inline const float *row_f32(const void *pool, DType t, int64_t index, int64_t D, float *buf) {
  if (t == F32) return static_cast<const float *>(pool) + index * D;
  for (int64_t d = 0; d < D; ++d) buf[d] = load(pool, t, index * D + d);
  return buf;
}
}  // namespace

// inputs: key_pool, value_pool [N, bs, H, D] (one float dtype), key, value [B, H, T, D] (float, converted to the
// pool's), slot_mapping int32 [B * T] (row-major over (b, t)); output: int32 [1]. Slots outside [0, N * bs) are
// skipped. Runs as a memory side effect on the pools (the primitive carries side_effect_mem).
QK_KERNEL(PagedCacheWrite) {
  if (nparam != 6) return 1;
  const DType ct = dtype_of(dtypes[0]), nt = dtype_of(dtypes[2]);
  if (!is_float(ct) || dtype_of(dtypes[1]) != ct || !is_float(nt) || dtype_of(dtypes[3]) != nt) return 2;
  if (std::strcmp(dtypes[4], "int32") != 0) return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 4 || ndims[4] != 1) return 3;
  const int64_t N = shapes[0][0], bs = shapes[0][1], H = shapes[0][2], D = shapes[0][3];
  const int64_t B = shapes[2][0], T = shapes[2][2];
  for (int i = 1; i < 2; ++i)
    if (shapes[i][0] != N || shapes[i][1] != bs || shapes[i][2] != H || shapes[i][3] != D) return 3;
  for (int i = 2; i < 4; ++i)
    if (shapes[i][0] != B || shapes[i][1] != H || shapes[i][2] != T || shapes[i][3] != D) return 3;
  if (shapes[4][0] != B * T) return 3;
  const int32_t *slots = static_cast<const int32_t *>(params[4]);
  const int64_t esize = ct == F32 ? 4 : 2;
  for (int which = 0; which < 2; ++which) {
    char *pool = static_cast<char *>(params[which]);
    const void *src = params[2 + which];
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t slot = slots[b * T + t];
        if (slot < 0 || slot >= N * bs) continue;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t dst = (slot * H + h) * D, from = ((b * H + h) * T + t) * D;
          if (nt == ct) {
            std::memcpy(pool + dst * esize, static_cast<const char *>(src) + from * esize, D * esize);
          } else {
            for (int64_t d = 0; d < D; ++d) store(pool, ct, dst + d, load(src, nt, from + d));
          }
        }
      }
  }
  *static_cast<int32_t *>(params[5]) = 0;
  return 0;
}

// inputs: q [B, Hq, T, D], key_pool, value_pool [N, bs, Hkv, D] (one float dtype), block_tables int32 [B, M],
// mask bool [B, 1, T, M * bs] (key s of row b = position s of that sequence), scale [1] fp32;
// output [B, Hq, T, D] in the dtype of q. Query head h reads kv head h / (Hq / Hkv).
// Work unit: one (sequence, kv head, query token) with all query heads of its group, so each cached K/V row is
// loaded once for the whole group; keys after the row's last visible one are never read.
QK_KERNEL(PagedAttention) {
  if (nparam != 7) return 1;
  const DType qt = dtype_of(dtypes[0]), ct = dtype_of(dtypes[1]), ot = dtype_of(dtypes[6]);
  if (!is_float(qt) || !is_float(ct) || dtype_of(dtypes[2]) != ct || !is_float(ot)) return 2;
  if (std::strcmp(dtypes[3], "int32") != 0 || std::strcmp(dtypes[4], "bool") != 0 || dtype_of(dtypes[5]) != F32)
    return 2;
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 2 || ndims[4] != 4) return 3;
  const int64_t B = shapes[0][0], Hq = shapes[0][1], T = shapes[0][2], D = shapes[0][3];
  const int64_t N = shapes[1][0], bs = shapes[1][1], Hkv = shapes[1][2], M = shapes[3][1], S = M * bs;
  for (int i = 0; i < 4; ++i)
    if (shapes[2][i] != shapes[1][i]) return 3;
  if (shapes[1][3] != D || Hkv == 0 || Hq % Hkv != 0 || shapes[3][0] != B) return 3;
  if (shapes[4][0] != B || shapes[4][1] != 1 || shapes[4][2] != T || shapes[4][3] != S) return 3;
  const int32_t *tables = static_cast<const int32_t *>(params[3]);
  for (int64_t i = 0; i < B * M; ++i)
    if (tables[i] < 0 || tables[i] >= N) return 4;  // a block id outside the pool: refuse, never read past it
  const bool *mask = static_cast<const bool *>(params[4]);
  const float scale = *static_cast<const float *>(params[5]);
  const void *kp = params[1], *vp = params[2];
  void *out = params[6];
  const int64_t G = Hq / Hkv, units = B * Hkv * T;
  parallel_for(units, 1, worth_threads(units * G * S * D), [&](int64_t u0, int64_t u1) {
    std::vector<float> q(static_cast<size_t>(G * D)), p(static_cast<size_t>(G * S)), acc(static_cast<size_t>(G * D));
    std::vector<float> kbuf(static_cast<size_t>(D)), vbuf(static_cast<size_t>(D));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t = u % T, kvh = (u / T) % Hkv, b = u / (T * Hkv);
      const bool *mrow = mask + (b * T + t) * S;
      const int32_t *table = tables + b * M;
      // Keys past the last visible one get probability 0 (a fully masked row keeps all S). The table spans
      // max_model_len, so the invisible tail is skipped eight mask bytes at a time.
      int64_t e = S;
      for (uint64_t w = 0; e >= 8; e -= 8) {
        std::memcpy(&w, mrow + e - 8, 8);
        if (w) break;
      }
      while (e > 0 && !mrow[e - 1]) --e;
      if (e == 0) e = S;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) q[g * D + d] = load(params[0], qt, ((b * Hq + kvh * G + g) * T + t) * D + d);
      for (int64_t s = 0; s < e; ++s) {
        if (!mrow[s]) {
          for (int64_t g = 0; g < G; ++g) p[g * S + s] = kMaskValue;
          continue;
        }
        const int64_t slot = static_cast<int64_t>(table[s / bs]) * bs + s % bs;
        const float *kr = row_f32(kp, ct, slot * Hkv + kvh, D, kbuf.data());
        for (int64_t g = 0; g < G; ++g) {
          const float *qg = q.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
          // The reference multiplies in the query dtype before the fp32 softmax.
          p[g * S + s] = round_to(qt, round_to(qt, dot) * scale);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float *pg = p.data() + g * S;
        const float inv = softmax_row(pg, e);
        for (int64_t s = 0; s < e; ++s) pg[s] = round_to(qt, pg[s] * inv);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < e; ++s) {
        bool any = false;
        for (int64_t g = 0; g < G && !any; ++g) any = p[g * S + s] != 0.f;
        if (!any) continue;  // masked (or underflowed) for every head of the group: its V row is not read
        const int64_t slot = static_cast<int64_t>(table[s / bs]) * bs + s % bs;
        const float *vr = row_f32(vp, ct, slot * Hkv + kvh, D, vbuf.data());
        for (int64_t g = 0; g < G; ++g) {
          const float w = p[g * S + s];
          if (w == 0.f) continue;
          float *ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += w * vr[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) store(out, ot, ((b * Hq + kvh * G + g) * T + t) * D + d, acc[g * D + d]);
    }
  });
  return 0;
}
