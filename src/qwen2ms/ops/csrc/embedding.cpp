// Embedding lookup that reads only the requested rows of a fp32/fp16/bf16/int8 table and returns fp32.
//
// The CPU Gather kernel has no bf16 version, so without this a bf16 table would be cast whole (every
// row) on each decode step.
#include "common.h"

using namespace qk;

namespace {
// inputs: ids [...] int32/int64, table [V, H], (scale fp32 when the table is int8: [V] per row, or [V, G] per
// group of H / G columns, as GGUF's Q8_0 blocks of 32); output [..., H] fp32. Returns 4 when an id is outside [0, V).
int embedding(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 3 && nparam != 4) return 1;
  const bool i64 = std::strcmp(dtypes[0], "int64") == 0;
  if (!i64 && std::strcmp(dtypes[0], "int32") != 0) return 2;
  DType tt = dtype_of(dtypes[1]);
  if (tt == UNSUPPORTED || tt == U4 || dtype_of(dtypes[nparam - 1]) != F32) return 2;
  const bool quant = tt == I8;
  if (quant != (nparam == 4)) return 1;
  if (ndims[1] != 2) return 3;
  const int64_t V = shapes[1][0], H = shapes[1][1];
  const int64_t n = numel(ndims[0], shapes[0]);
  const float *scale = quant ? static_cast<const float *>(params[2]) : nullptr;
  int64_t G = 1;  // scale groups per row
  if (quant) {
    if (ndims[2] == 2) {
      G = shapes[2][1];
      if (shapes[2][0] != V || G < 1 || H % G != 0) return 3;
    } else if (ndims[2] != 1 || shapes[2][0] != V) {
      return 3;
    }
  }
  const int64_t gw = H / G;  // columns per group
  float *out = static_cast<float *>(params[nparam - 1]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = i64 ? static_cast<const int64_t *>(params[0])[i] : static_cast<const int32_t *>(params[0])[i];
    if (id < 0 || id >= V) return 4;
    if (!scale) {
      for (int64_t j = 0; j < H; ++j) out[i * H + j] = load(params[1], tt, id * H + j);
      continue;
    }
    for (int64_t j = 0; j < H; ++j) out[i * H + j] = load(params[1], tt, id * H + j) * scale[id * G + j / gw];
  }
  return 0;
}
}  // namespace

// Separate names for the two input signatures (see linear.cpp).
QK_KERNEL(Embedding) { return nparam == 3 ? embedding(nparam, params, ndims, shapes, dtypes) : 1; }
QK_KERNEL(EmbeddingInt8) { return nparam == 4 ? embedding(nparam, params, ndims, shapes, dtypes) : 1; }
