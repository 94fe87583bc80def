#pragma once
// The GEMMs dsv4 hands to cuBLASLt (FP32 accumulation, FP32 output; plans cached per shape; a run
// returns false when cuBLASLt offers no algorithm):
//  - FP8 with DeepSeek-style block scaling (Hopper: wgmma kernels, cuBLAS >= 12.9): y [M, N] =
//    (xq [M, K] E4M3, 1x128 FP32 scales) x (W [N, K] E4M3, 128x128 FP32 scales)^T. Used on sm_90
//    for FP8 weights; the portable tensor-core kernel (gemm_fp8.cu) covers the rest.
//  - BF16, `batch` problems at fixed strides (from 128 rows: the grouped wo_a, batch 8, and the
//    BF16-weight linears, batch 1): y_b [M, N] (+)= x_b [M, K] x W_b [N, K]^T. BF16 products are
//    exact in FP32.
#include <cstdint>
#include <map>
#include <tuple>

#include <cublasLt.h>
#include <cuda_runtime.h>

namespace dsv4::cuda {

class CublasLtGemm {
 public:
  CublasLtGemm() = default;
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // w_scales: [ceil(N/128)][ceil(ceil(K/128), 4)] f32 (see padded_block_scales), x_scales:
  // [ceil(K/128)][M] f32 (act_quant's layout).
  bool run_fp8(const uint8_t* xq, int64_t ldq, const float* x_scales, const uint8_t* w, const float* w_scales,
               float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t stream);
  // x_b = x + b * x_stride (rows ldx apart), W_b = w + b * N * K (dense), y_b = y + b * y_stride
  // (rows ldy apart); x and w hold BF16 bit patterns; accumulate: y += instead of y =. False also
  // where a pointer, leading dimension or stride is not 16-byte aligned.
  bool run_bf16(const uint16_t* x, int64_t ldx, int64_t x_stride, const uint16_t* w, float* y, int64_t ldy,
                int64_t y_stride, int64_t M, int64_t N, int64_t K, int64_t batch, bool accumulate,
                cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;
  };
  // (bf16, M, N, K, ldx, ldy, x_stride, y_stride, batch)
  using Key = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  Plan& plan(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, Plan> plans_;
};

// Columns of the padded weight-scale layout cuBLASLt's 128x128 mode reads.
inline int64_t padded_scale_cols(int64_t K) { return ((K + 127) / 128 + 3) / 4 * 4; }
// Converts a checkpoint FP8 weight's scales [ceil(N/128), ceil(K/128)] (ue8m0 bytes or f32) to
// that layout (padding zero).
void padded_block_scales(const uint8_t* s, bool scale_f32, int64_t N, int64_t K, float* out, cudaStream_t stream);

}  // namespace dsv4::cuda
