// Int4 weights to a float matrix in one pass, for the many-row (prefill, training) path's matmul.
#include "common.h"

using namespace qk;

// inputs: packed uint8 [N, K / 2] (GGUF Q4_0 layout: in each block of 32 inputs byte j holds input j in its low
// nibble and input j + 16 in its high nibble, each as value + 8), scale float32 [N, G] or [N];
// output: [N, K] float (fp32/fp16/bf16), (nibble - 8) * scale of the input's group, rounded as the reference
// rounds it: the scale first to the output dtype, then the (exact) product once.
// One output buffer and no temporaries: the graph's op-by-op version keeps ~7 weight-sized intermediates alive.
static int dequant_int4(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 3) return 1;
  if (ndims[0] != 2 || ndims[2] != 2 || (ndims[1] != 1 && ndims[1] != 2)) return 2;
  if (dtype_of(dtypes[1]) != DType::F32 || !is_float(dtype_of(dtypes[2]))) return 3;
  const int64_t n = shapes[0][0], k = 2 * shapes[0][1];
  const int64_t groups = ndims[1] == 2 ? shapes[1][1] : 1;
  if (shapes[1][0] != n || shapes[2][0] != n || shapes[2][1] != k || k % 32 != 0 || groups <= 0 || k % groups != 0)
    return 4;
  const int64_t group_len = k / groups;
  const uint8_t *packed = static_cast<const uint8_t *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  DType yt = dtype_of(dtypes[2]);
  parallel_for(n, 4, worth_threads(n * k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t *row = packed + r * (k / 2);
      for (int64_t blk = 0; blk < k / 32; ++blk) {
        float s = 0.0f;
        store(&s, yt, 0, scale[r * groups + (blk * 32) / group_len]);
        s = load(&s, yt, 0);
        const uint8_t *b = row + blk * 16;
        const int64_t base = r * k + blk * 32;
        for (int j = 0; j < 16; ++j) {
          store(params[2], yt, base + j, (float(b[j] & 15) - 8.0f) * s);
          store(params[2], yt, base + j + 16, (float(b[j] >> 4) - 8.0f) * s);
        }
      }
    }
  });
  return 0;
}

// One symbol per output dtype: MindSpore caches a custom op's inferred output by its name and inputs, so ops that
// differ only in their output dtype must not share a name.
QK_KERNEL(DequantInt4F32) { return dequant_int4(nparam, params, ndims, shapes, dtypes); }
QK_KERNEL(DequantInt4F16) { return dequant_int4(nparam, params, ndims, shapes, dtypes); }
QK_KERNEL(DequantInt4BF16) { return dequant_int4(nparam, params, ndims, shapes, dtypes); }
