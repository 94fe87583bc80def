#pragma once
// FP8 GEMM with DeepSeek-style block scaling through cuBLASLt (Hopper: wgmma kernels, cuBLAS >=
// 12.9): y [M, N] f32 = (xq [M, K] E4M3, 1x128 FP32 scales) x (W [N, K] E4M3, 128x128 FP32
// scales)^T. Used on sm_90 for FP8 weights; the portable tensor-core kernel (gemm_fp8.cu) covers
// the rest. Plans are cached per shape; run() returns false when cuBLASLt offers no algorithm.
#include <cstdint>
#include <map>
#include <tuple>

#include <cublasLt.h>
#include <cuda_runtime.h>

namespace dsv4::cuda {

class CublasLtFp8 {
 public:
  CublasLtFp8() = default;
  ~CublasLtFp8();
  CublasLtFp8(const CublasLtFp8&) = delete;
  CublasLtFp8& operator=(const CublasLtFp8&) = delete;

  // w_scales: [ceil(N/128)][ceil(ceil(K/128), 4)] f32 (see padded_block_scales), x_scales:
  // [ceil(K/128)][M] f32 (act_quant's layout).
  bool run(const uint8_t* xq, int64_t ldq, const float* x_scales, const uint8_t* w, const float* w_scales, float* y,
           int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;
  };
  Plan& plan(int64_t M, int64_t N, int64_t K, int64_t ldq, int64_t ldy);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>, Plan> plans_;
};

// Columns of the padded weight-scale layout cuBLASLt's 128x128 mode reads.
inline int64_t padded_scale_cols(int64_t K) { return ((K + 127) / 128 + 3) / 4 * 4; }
// Converts a checkpoint FP8 weight's scales [ceil(N/128), ceil(K/128)] (ue8m0 bytes or f32) to
// that layout (padding zero).
void padded_block_scales(const uint8_t* s, bool scale_f32, int64_t N, int64_t K, float* out, cudaStream_t stream);

}  // namespace dsv4::cuda
