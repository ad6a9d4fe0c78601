// Fused rotary position embedding (rotate-half convention) for q and k in one call, and its adjoint.
#include "common.h"

using namespace qk;

namespace {

int rope_qk(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int seq_axis,
            bool adjoint) {
  if (nparam != 6) return 1;
  if (ndims[0] != 4 || ndims[1] != 4) return 3;
  DType qt = dtype_of(dtypes[0]), kt = dtype_of(dtypes[1]), ct = dtype_of(dtypes[2]);
  if (!is_float(qt) || !is_float(kt) || !is_float(ct) || dtype_of(dtypes[3]) != ct) return 2;
  const int64_t D = shapes[0][3];
  if (D % 2 != 0 || shapes[1][3] != D || shapes[2][ndims[2] - 1] != D) return 3;
  const int64_t S = seq_axis == 2 ? shapes[0][2] : shapes[0][1];
  const int64_t cn = numel(ndims[2], shapes[2]);
  if (S == 0 || D == 0) return 0;
  const int64_t bc = cn / (S * D);
  if (bc * S * D != cn || (bc != 1 && bc != shapes[0][0]) || (bc != 1 && bc != shapes[1][0])) return 3;
  rope_one(params[0], qt, shapes[0], params[2], params[3], ct, bc, seq_axis, adjoint, params[4]);
  rope_one(params[1], kt, shapes[1], params[2], params[3], ct, bc, seq_axis, adjoint, params[5]);
  return 0;
}

}  // namespace

// inputs: q, k, cos, sin; outputs: q_rot, k_rot. Layout [B, N, S, D].
QK_KERNEL(RopeBNSD) { return rope_qk(nparam, params, ndims, shapes, dtypes, 2, false); }
// Layout [B, S, N, D].
QK_KERNEL(RopeBSND) { return rope_qk(nparam, params, ndims, shapes, dtypes, 1, false); }
// inputs: dq_rot, dk_rot, cos, sin; outputs: dq, dk.
QK_KERNEL(RopeBNSDGrad) { return rope_qk(nparam, params, ndims, shapes, dtypes, 2, true); }
QK_KERNEL(RopeBSNDGrad) { return rope_qk(nparam, params, ndims, shapes, dtypes, 1, true); }
