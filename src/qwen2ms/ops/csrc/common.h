// Shared helpers for qwen2ms CPU kernels: dtype tags, scalar and 8-wide conversions, the AOT signature.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QK_SIMD 1
#else
#define QK_SIMD 0
#endif

#include "pool.h"

#include <atomic>
#include <chrono>
#include <cstdlib>

namespace qk {
// Kernel time accounting, on when $QWEN2MS_KERNEL_PROFILE=1 (or switched by QkProfileEnable): calls and wall
// time per exported kernel, read through QkProfileRead. Lets a profile split a decode step into time inside our
// kernels and everything else (MindSpore's graph launch, its own ops, Python). Off, it costs one predictable
// branch per call.
struct ProfileSlot {
  const char *name;
  std::atomic<int64_t> calls, ns;
};
constexpr int kProfileSlots = 64;
inline ProfileSlot *profile_table() {
  static ProfileSlot table[kProfileSlots];
  return table;
}
inline std::atomic<int> &profile_count() {
  static std::atomic<int> n{0};
  return n;
}
// Starts as $QWEN2MS_KERNEL_PROFILE says; QkProfileEnable switches it at run time.
inline std::atomic<bool> &profile_flag() {
  static std::atomic<bool> on{[] {
    const char *v = std::getenv("QWEN2MS_KERNEL_PROFILE");
    return v && v[0] == '1';
  }()};
  return on;
}
inline bool profile_on() { return profile_flag().load(std::memory_order_relaxed); }
inline int profile_slot(const char *name) {
  const int i = profile_count().fetch_add(1);
  if (i >= kProfileSlots) return -1;
  profile_table()[i].name = name;
  return i;
}
struct ProfileScope {
  int slot;
  std::chrono::steady_clock::time_point t0;
  explicit ProfileScope(int s) : slot(s), t0(std::chrono::steady_clock::now()) {}
  ~ProfileScope() {
    if (slot < 0) return;
    const auto dt = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
    profile_table()[slot].calls.fetch_add(1, std::memory_order_relaxed);
    profile_table()[slot].ns.fetch_add(dt.count(), std::memory_order_relaxed);
  }
};
}  // namespace qk

// MindSpore calls every AOT kernel with this signature; inputs come first in params, then outputs. The exported
// function times the body (name##Body) when profiling is on.
#define QK_KERNEL(name)                                                                                    \
  static int name##Body(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,       \
                        void *stream, void *extra);                                                        \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,        \
                      void *stream, void *extra) {                                                         \
    if (!qk::profile_on()) return name##Body(nparam, params, ndims, shapes, dtypes, stream, extra);        \
    static const int slot = qk::profile_slot(#name);                                                       \
    qk::ProfileScope scope(slot);                                                                          \
    return name##Body(nparam, params, ndims, shapes, dtypes, stream, extra);                               \
  }                                                                                                        \
  static int name##Body(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,       \
                        void *stream, void *extra)

namespace qk {

// U4: int4 weights -8..7 packed two per byte (uint8 tensors [N, K / 2]); within each block of 32 inputs, byte
// j holds input j in its low nibble and input j + 16 in its high nibble, each stored as value + 8 (GGUF Q4_0's
// layout, so Q4_0 blocks load as they are).
enum DType { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, U4 = 4, UNSUPPORTED = 9 };

inline DType dtype_of(const char *s) {
  if (std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0) return F32;
  if (std::strcmp(s, "float16") == 0) return F16;
  if (std::strcmp(s, "bfloat16") == 0) return BF16;
  if (std::strcmp(s, "int8") == 0) return I8;
  if (std::strcmp(s, "uint8") == 0) return U4;
  return UNSUPPORTED;
}

inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, keeping NaN a (quiet) NaN: the same rounding MindSpore's Cast uses.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
#if QK_SIMD
  return _cvtsh_ss(h);
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline uint16_t f32_to_f16(float f) {
#if QK_SIMD
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xffu) - 127 + 15;
  uint32_t man = u & 0x7fffffu;
  if (((u >> 23) & 0xffu) == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0u));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = 1u << (shift - 1);
    uint32_t r = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
#endif
}

inline float load(const void *p, DType t, int64_t i) {
  switch (t) {
    case F32: return static_cast<const float *>(p)[i];
    case F16: return f16_to_f32(static_cast<const uint16_t *>(p)[i]);
    case BF16: return bf16_to_f32(static_cast<const uint16_t *>(p)[i]);
    case I8: return static_cast<float>(static_cast<const int8_t *>(p)[i]);
    case U4: {  // element i of a packed [N, K] int4 matrix (K a multiple of 32, so rows hold whole blocks)
      const uint8_t b = static_cast<const uint8_t *>(p)[(i >> 5) * 16 + (i & 15)];
      return static_cast<float>(((i & 16) ? (b >> 4) : (b & 15)) - 8);
    }
    default: return 0.f;
  }
}

inline void store(void *p, DType t, int64_t i, float v) {
  switch (t) {
    case F32: static_cast<float *>(p)[i] = v; break;
    case F16: static_cast<uint16_t *>(p)[i] = f32_to_f16(v); break;
    case BF16: static_cast<uint16_t *>(p)[i] = f32_to_bf16(v); break;
    default: break;
  }
}

// The value v would have after a round trip through dtype t (models the reference's intermediate casts).
inline float round_to(DType t, float v) {
  switch (t) {
    case F16: return f16_to_f32(f32_to_f16(v));
    case BF16: return bf16_to_f32(f32_to_bf16(v));
    default: return v;
  }
}

// Rows of `len` elements converted to fp32 into a caller-owned buffer (no copy for fp32 input).
inline const float *as_f32(const void *p, DType t, int64_t n, std::vector<float> &buf) {
  if (t == F32) return static_cast<const float *>(p);
  buf.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) buf[i] = load(p, t, i);
  return buf.data();
}

inline bool is_float(DType t) { return t == F32 || t == F16 || t == BF16; }

// Threads only pay off above a few tens of thousands of elements (a parallel region costs ~1-2 us).
inline bool worth_threads(int64_t work) { return work >= (1 << 15); }

#if QK_SIMD
// exp of 8 floats: range reduction x = n ln2 + r (ln2 split in two constants for exactness) and a
// degree-6 polynomial for e^r (the Cephes expf coefficients); relative error ~2e-7 against std::exp.
// Inputs are clamped to [-87.3, 88.7], so overflow gives ~1.7e38 rather than inf, and large
// negative inputs give ~1e-38 rather than 0: callers divide by (1 + e^-x) and see no difference.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// y[i] = silu(g[i]) * u[i] for i in [b, e). fp32 inputs use the vectorised exp; otherwise silu(g) is
// rounded to g's dtype before the product, as the reference's cast does.
inline void swiglu_span(const void *g, DType gt, const void *u, DType ut, void *y, DType yt, int64_t b, int64_t e) {
  if (gt == F32 && ut == F32 && yt == F32) {
    const float *gf = static_cast<const float *>(g), *uf = static_cast<const float *>(u);
    float *yf = static_cast<float *>(y);
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
    return;
  }
  int64_t i = b;
#if QK_SIMD
  // Eight at a time through the vectorised exp (a decode step's 4864 scalar exps took tens of us).
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  alignas(32) float v[8];
  for (; i + 8 <= e; i += 8) {
    for (int j = 0; j < 8; ++j) v[j] = load(g, gt, i + j);
    const __m256 a = _mm256_load_ps(v);
    _mm256_store_ps(v, _mm256_div_ps(a, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, a)))));
    for (int j = 0; j < 8; ++j) store(y, yt, i + j, round_to(gt, v[j]) * load(u, ut, i + j));
  }
#endif
  for (; i < e; ++i) {
    const float a = load(g, gt, i);
    store(y, yt, i, round_to(gt, a / (1.0f + std::exp(-a))) * load(u, ut, i));
  }
}

// y = round(round(x * r) * w) with r = 1/sqrt(mean(x^2) + eps): the reference computes the norm in
// fp32, casts back to the input dtype, then multiplies by the weight in that dtype.
inline void rms_rows(const void *x, DType xt, const void *w, DType wt, float eps, void *y, DType yt,
                     int64_t rows, int64_t h) {
  std::vector<float> wf(static_cast<size_t>(h));
  for (int64_t j = 0; j < h; ++j) wf[j] = load(w, wt, j);
  parallel_for(rows, 8, worth_threads(rows * h), [&](int64_t r0, int64_t r1) {
  std::vector<float> buf;
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr;
    if (xt == F32) {
      xr = static_cast<const float *>(x) + r * h;
    } else {
      buf.resize(static_cast<size_t>(h));
      for (int64_t j = 0; j < h; ++j) buf[j] = load(x, xt, r * h + j);
      xr = buf.data();
    }
    double ss = 0.0;  // double: hidden sizes up to 8192 summed without order effects
    for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(h)) + eps);
    for (int64_t j = 0; j < h; ++j) store(y, yt, r * h + j, round_to(xt, xr[j] * inv) * wf[j]);
  }
  });
}

// x: [B, A, C, D]; the position axis is C when seq_axis == 2 ("BNSD") or A when seq_axis == 1 ("BSND").
// cos/sin: [Bc, S, D] flattened, Bc in {1, B}. adjoint=true applies the transpose of the rotation,
// which is the backward pass (and the inverse when cos/sin halves are equal, as in Qwen2).
inline void rope_one(const void *x, DType xt, const int64_t *shape, const void *cosp, const void *sinp,
                     DType ct, int64_t bc, int seq_axis, bool adjoint, void *y) {
  const int64_t B = shape[0], A = shape[1], C = shape[2], D = shape[3], half = D / 2;
  const int64_t S = seq_axis == 2 ? C : A;
  const int64_t rows = B * A * C;
  parallel_for(rows, 16, worth_threads(rows * D), [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C, a = (r / C) % A, b = r / (A * C);
    const int64_t s = seq_axis == 2 ? c : a;
    const int64_t cbase = ((bc == 1 ? 0 : b) * S + s) * D, base = r * D;
    for (int64_t i = 0; i < half; ++i) {
      float x1 = load(x, xt, base + i), x2 = load(x, xt, base + i + half);
      float c1 = load(cosp, ct, cbase + i), c2 = load(cosp, ct, cbase + i + half);
      float s1 = load(sinp, ct, cbase + i), s2 = load(sinp, ct, cbase + i + half);
      float o1, o2;
      if (!adjoint) {
        o1 = x1 * c1 - x2 * s1;
        o2 = x2 * c2 + x1 * s2;
      } else {
        o1 = x1 * c1 + x2 * s2;
        o2 = x2 * c2 - x1 * s1;
      }
      store(y, xt, base + i, o1);
      store(y, xt, base + i + half, o2);
    }
  }
  });
}

// Rows t of new keys/values [B, H, T, D] (dtype nt) into cache slots start + t of [B, H, L, D] caches (dtype ct);
// slots outside [0, L) are skipped, as the reference's select skips them.
inline void kv_write(void *k_cache, void *v_cache, DType ct, const void *k_new, const void *v_new, DType nt,
                     int64_t B, int64_t H, int64_t L, int64_t D, int64_t T, int64_t start) {
  const int64_t esize = ct == F32 ? 4 : 2;
  for (int which = 0; which < 2; ++which) {
    char *cache = static_cast<char *>(which == 0 ? k_cache : v_cache);
    const void *src = which == 0 ? k_new : v_new;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t slot = start + t;
        if (slot < 0 || slot >= L) continue;
        const int64_t dst = (bh * L + slot) * D, from = (bh * T + t) * D;
        if (nt == ct) {
          std::memcpy(cache + dst * esize, static_cast<const char *>(src) + from * esize, D * esize);
        } else {
          for (int64_t d = 0; d < D; ++d) store(cache, ct, dst + d, load(src, nt, from + d));
        }
      }
    }
  }
}

}  // namespace qk
