#include "backend/cuda/cublaslt_gemm.h"

#include <cstdint>

#include "util/error.h"

namespace dsv4::cuda {

namespace {
constexpr size_t kWorkspace = 32 << 20;

void ck(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error {} in {}", int(s), what);
}
template <class T>
void set(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const T& v) {
  ck(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)), "cublasLtMatmulDescSetAttribute");
}
void batched(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  const int32_t count = int32_t(batch);
  ck(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), "batch count");
  ck(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
     "batch stride");
}
}  // namespace

CublasLtGemm::~CublasLtGemm() {
  for (auto& [key, p] : plans_) {
    if (p.a) cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) cublasLtMatrixLayoutDestroy(p.c);
    if (p.op) cublasLtMatmulDescDestroy(p.op);
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

CublasLtGemm::Plan& CublasLtGemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan& p = plans_[key];
  const auto [bf16, M, N, K, ldx, ldy, x_stride, y_stride, batch] = key;
  if (!handle_) {
    ck(cublasLtCreate(&handle_), "cublasLtCreate");
    if (cudaMalloc(&workspace_, kWorkspace) != cudaSuccess) fail("cuBLASLt: cannot allocate its workspace");
  }
  // Column-major view: y^T [N, M] = W [K x N col-major]^T * x^T [K x M col-major].
  ck(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  set(p.op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(p.op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  const cudaDataType_t in = bf16 ? CUDA_R_16BF : CUDA_R_8F_E4M3;
  ck(cublasLtMatrixLayoutCreate(&p.a, in, K, N, K), "layout A");
  ck(cublasLtMatrixLayoutCreate(&p.b, in, K, M, ldx), "layout B");
  ck(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, N, M, ldy), "layout C");
  if (batch > 1) {
    batched(p.a, batch, N * K);
    batched(p.b, batch, x_stride);
    batched(p.c, batch, y_stride);
  }
  if (!bf16) {
    set(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, int32_t(CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F));
    set(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, int32_t(CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F));
    // Scale pointers are set per call; some cuBLASLt versions want non-null ones for the heuristic.
    set(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(workspace_));
    set(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(workspace_));
  }
  cublasLtMatmulPreference_t pref;
  ck(cublasLtMatmulPreferenceCreate(&pref), "preference");
  const size_t ws = kWorkspace;
  ck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
     "preference");
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  p.ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (p.ok) p.algo = res.algo;
  return p;
}

bool CublasLtGemm::run_fp8(const uint8_t* xq, int64_t ldq, const float* x_scales, const uint8_t* w,
                           const float* w_scales, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                           cudaStream_t stream) {
  Plan& p = plan({false, M, N, K, ldq, ldy, 0, 0, 1});
  if (!p.ok) return false;
  set(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(w_scales));
  set(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(x_scales));
  const float alpha = 1.f, beta = 0.f;
  ck(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, xq, p.b, &beta, y, p.c, y, p.c, &p.algo, workspace_, kWorkspace,
                    stream),
     "cublasLtMatmul (FP8 block-scaled)");
  return true;
}

bool CublasLtGemm::run_bf16(const uint16_t* x, int64_t ldx, int64_t x_stride, const uint16_t* w, float* y,
                            int64_t ldy, int64_t y_stride, int64_t M, int64_t N, int64_t K, int64_t batch,
                            bool accumulate, cudaStream_t stream) {
  // cuBLASLt's heuristic assumes 16-byte aligned operands (in elements: 8 BF16, 4 FP32).
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) |
                         reinterpret_cast<uintptr_t>(y)) & 15) == 0 &&
                       (ldx | x_stride | K) % 8 == 0 && (ldy | y_stride) % 4 == 0;
  if (!aligned) return false;
  Plan& p = plan({true, M, N, K, ldx, ldy, x_stride, y_stride, batch});
  if (!p.ok) return false;
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  ck(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, workspace_, kWorkspace,
                    stream),
     "cublasLtMatmul (BF16)");
  return true;
}

}  // namespace dsv4::cuda
