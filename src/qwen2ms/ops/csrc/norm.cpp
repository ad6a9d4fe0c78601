// Fused RMSNorm kernels (optionally with the residual add) and their backward pass.
#include "common.h"

using namespace qk;

// inputs: x [..., H], weight [H], eps [1] fp32; output: y [..., H] (dtype of x)
QK_KERNEL(RmsNorm) {
  if (nparam != 4) return 1;
  DType xt = dtype_of(dtypes[0]), wt = dtype_of(dtypes[1]), yt = dtype_of(dtypes[3]);
  if (!is_float(xt) || !is_float(wt) || !is_float(yt) || dtype_of(dtypes[2]) != F32) return 2;
  int64_t h = shapes[0][ndims[0] - 1];
  int64_t rows = h ? numel(ndims[0], shapes[0]) / h : 0;
  float eps = *static_cast<const float *>(params[2]);
  rms_rows(params[0], xt, params[1], wt, eps, params[3], yt, rows, h);
  return 0;
}

// inputs: x [..., H], residual [..., H], weight [H], eps [1]; outputs: y = rms_norm(s), s = x + residual
QK_KERNEL(AddRmsNorm) {
  if (nparam != 6) return 1;
  DType xt = dtype_of(dtypes[0]), rt = dtype_of(dtypes[1]), wt = dtype_of(dtypes[2]);
  DType yt = dtype_of(dtypes[4]), st = dtype_of(dtypes[5]);
  if (!is_float(xt) || !is_float(rt) || !is_float(wt) || dtype_of(dtypes[3]) != F32) return 2;
  int64_t h = shapes[0][ndims[0] - 1];
  int64_t n = numel(ndims[0], shapes[0]);
  int64_t rows = h ? n / h : 0;
  float eps = *static_cast<const float *>(params[3]);
  const void *x = params[0], *res = params[1];
  void *s = params[5];
  parallel_for(n, 1 << 14, worth_threads(n), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) store(s, st, i, load(x, xt, i) + load(res, rt, i));
  });
  rms_rows(s, st, params[2], wt, eps, params[4], yt, rows, h);
  return 0;
}

// inputs: dy [..., H], x [..., H], weight [H], eps [1]; outputs: dx [..., H], dweight [H]
// With r = (mean(x^2)+eps)^-1/2 and g = dy*w: dx = r*g - x * r^3 * mean(g*x); dw = sum_rows dy*x*r.
QK_KERNEL(RmsNormGrad) {
  if (nparam != 6) return 1;
  DType gt = dtype_of(dtypes[0]), xt = dtype_of(dtypes[1]), wt = dtype_of(dtypes[2]);
  DType dxt = dtype_of(dtypes[4]), dwt = dtype_of(dtypes[5]);
  if (!is_float(gt) || !is_float(xt) || !is_float(wt) || dtype_of(dtypes[3]) != F32) return 2;
  int64_t h = shapes[1][ndims[1] - 1];
  int64_t rows = h ? numel(ndims[1], shapes[1]) / h : 0;
  float eps = *static_cast<const float *>(params[3]);
  const void *dy = params[0], *x = params[1];
  std::vector<float> wf(static_cast<size_t>(h));
  for (int64_t j = 0; j < h; ++j) wf[j] = load(params[2], wt, j);
  // Pass 1 (rows in parallel): dx and each row's 1/rms. Pass 2 (columns in parallel): dweight, so no
  // thread-local partial sums have to be merged.
  std::vector<double> inv_rms(static_cast<size_t>(rows));
  parallel_for(rows, 8, worth_threads(rows * h), [&](int64_t r0, int64_t r1) {
    std::vector<float> xr(static_cast<size_t>(h)), gr(static_cast<size_t>(h));
    for (int64_t r = r0; r < r1; ++r) {
      double ss = 0.0, gx = 0.0;
      for (int64_t j = 0; j < h; ++j) {
        xr[j] = load(x, xt, r * h + j);
        gr[j] = load(dy, gt, r * h + j);
        ss += static_cast<double>(xr[j]) * xr[j];
        gx += static_cast<double>(gr[j]) * wf[j] * xr[j];
      }
      double inv = 1.0 / std::sqrt(ss / static_cast<double>(h) + eps);
      double coef = inv * inv * inv * gx / static_cast<double>(h);
      inv_rms[r] = inv;
      for (int64_t j = 0; j < h; ++j)
        store(params[4], dxt, r * h + j, static_cast<float>(inv * gr[j] * wf[j] - coef * xr[j]));
    }
  });
  std::vector<double> dw_total(static_cast<size_t>(h), 0.0);
  parallel_for(h, 64, worth_threads(rows * h), [&](int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = j0; j < j1; ++j)
        dw_total[j] += static_cast<double>(load(dy, gt, r * h + j)) * load(x, xt, r * h + j) * inv_rms[r];
  });
  for (int64_t j = 0; j < h; ++j) store(params[5], dwt, j, static_cast<float>(dw_total[j]));
  return 0;
}
