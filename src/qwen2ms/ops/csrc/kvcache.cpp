// KV-cache write in place: the new keys/values of this step land in their cache slots, nothing else moves.
//
// The reference update rebuilds each layer's whole cache (gather + select + assign, a full copy per
// token and ~12 small ops per layer); here only the T new rows are written. MindSpore runs it as a
// memory side effect on the cache Parameters (the primitive carries `side_effect_mem`), and the
// Python side orders later reads after it with `ops.depend`.
#include <algorithm>
#include <string>

#include "common.h"

using namespace qk;

// inputs: k_cache [B, H, L, D], v_cache [B, H, L, D] (same dtype), k_new [B, H, T, D], v_new [B, H, T, D]
// (float dtypes, converted to the cache's), start slot int32 scalar; output: int32 [1] (the start slot).
// Slots outside [0, L) are skipped, as the reference's select skips them.
QK_KERNEL(KvCacheWrite) {
  if (nparam != 6) return 1;
  const DType ct = dtype_of(dtypes[0]), nt = dtype_of(dtypes[2]);
  if (!is_float(ct) || dtype_of(dtypes[1]) != ct || !is_float(nt) || dtype_of(dtypes[3]) != nt) return 2;
  if (std::strcmp(dtypes[4], "int32") != 0) return 2;
  for (int i = 0; i < 4; ++i)
    if (ndims[i] != 4) return 3;
  const int64_t B = shapes[0][0], H = shapes[0][1], L = shapes[0][2], D = shapes[0][3], T = shapes[2][2];
  for (int i = 1; i < 4; ++i)
    if (shapes[i][0] != B || shapes[i][1] != H || shapes[i][3] != D) return 3;
  if (shapes[1][2] != L || shapes[3][2] != T) return 3;
  const int64_t start = *static_cast<const int32_t *>(params[4]);
  kv_write(params[0], params[1], ct, params[2], params[3], nt, B, H, L, D, T, start);
  *static_cast<int32_t *>(params[5]) = static_cast<int32_t>(start);
  return 0;
}

// Profile counters (see QK_KERNEL in common.h): "name calls ns" lines into buf (NUL-terminated, truncated to len);
// returns the bytes needed. QkProfileReset zeroes them.
extern "C" int QkProfileRead(char *buf, int len) {
  std::string out;
  const int n = std::min(qk::profile_count().load(), qk::kProfileSlots);
  for (int i = 0; i < n; ++i) {
    const qk::ProfileSlot &s = qk::profile_table()[i];
    out += std::string(s.name) + " " + std::to_string(s.calls.load()) + " " + std::to_string(s.ns.load()) + "\n";
  }
  if (buf && len > 0) {
    const size_t k = std::min(out.size(), static_cast<size_t>(len - 1));
    std::memcpy(buf, out.data(), k);
    buf[k] = 0;
  }
  return static_cast<int>(out.size()) + 1;
}

extern "C" void QkProfileReset() {
  const int n = std::min(qk::profile_count().load(), qk::kProfileSlots);
  for (int i = 0; i < n; ++i) {
    qk::profile_table()[i].calls.store(0);
    qk::profile_table()[i].ns.store(0);
  }
}

// Switches the profile counters on (1) or off (0) from now on.
extern "C" void QkProfileEnable(int on) { qk::profile_flag().store(on != 0); }
