#pragma once
// One GEMM problem of a GemmArgs launch (blockIdx.z), shared by the FP32 kernels (linear.cu) and
// the FP8 tensor-core kernel (gemm_fp8.cu).
#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

struct Problem {
  WeightDesc w, w3;  // w3: the gemm_swiglu twin (descs3 / wd3), read only by kernels that fuse it
  const float* x;
  float* y;
  int64_t rows, base, wrow0;
};

__device__ __forceinline__ Problem problem(const GemmArgs& a) {
  Problem p;
  int z = blockIdx.z;
  if (a.zmap) {
    z = a.zmap[z];
    if (z < 0) {  // no expert for this slice
      p.w = a.wd;
      p.w3 = a.wd3;
      p.x = a.x;
      p.y = a.y;
      p.rows = 0;
      p.base = 0;
      p.wrow0 = 0;
      return p;
    }
  }
  p.w = a.descs ? a.descs[z] : a.wd;
  p.w3 = a.descs3 ? a.descs3[z] : a.wd3;
  p.x = a.x + z * a.x_z_off;
  p.y = a.y + z * a.y_z_off;
  p.rows = a.counts ? a.counts[z] : a.M;
  p.base = a.offsets ? a.offsets[z] : 0;
  p.wrow0 = z * a.w_z_row_off;
  return p;
}

// Whether problem(a) reads nothing an earlier kernel wrote (no expert map or counts): such a
// kernel may read its problem and stream its (constant) weights before pdl_wait().
__device__ __forceinline__ bool problem_known_before_wait(const GemmArgs& a) { return !a.zmap && !a.counts; }

// The activation row of the problem's row r: gathered through x_rows (MoE) or consecutive from base.
__device__ __forceinline__ int64_t activation_row(const GemmArgs& a, const Problem& p, int64_t r) {
  return a.x_rows ? int64_t(a.x_rows[p.base + r]) : p.base + r;
}

__device__ __forceinline__ const float* x_row(const GemmArgs& a, const Problem& p, int64_t r) {
  return p.x + activation_row(a, p, r) * a.ldx;
}

// The FP8-activation GEMM (a.xq set): tensor cores, FP8 or FP4 weights (gemm_fp8.cu).
void gemm_fp8_tensor_core(const GemmArgs& a, cudaStream_t stream);
// gemm_swiglu on the sm_90a warpgroup kernel (both products and the SwiGLU in one launch) where
// gemm() would take that kernel for W1; false (nothing launched) otherwise.
bool gemm_swiglu_warpgroup(const GemmArgs& a, cudaStream_t stream);
// The weight-streaming tensor-core kernel for few rows per problem, with the SwiGLU of
// gemm_swiglu when swiglu is set: FP8 activations (xq) with FP8/FP4 weights (max_rows <=
// kGemvMaxRows or force_gemv), or FP32 activations with BF16 weights (2 to kSkinnyBf16MaxRows
// rows; DSV4_CUDA_SKINNY_BF16=0 turns that off); K a multiple of skinny_stage_k.
// False (nothing launched) when the arguments do not fit.
bool gemm_skinny(const GemmArgs& a, bool swiglu, cudaStream_t stream);
// BF16 weights: up to this many rows take the skinny kernel (16 rows a weight pass; more rows
// stream the weights again, still cheaper than the FP32 tiled kernel below a few hundred rows).
constexpr int64_t kSkinnyBf16MaxRows = 64;

}  // namespace dsv4::cuda
