// cuBLASLt reference timings for the benchmark's per-op table: the same GEMM shapes as our
// kernels, BF16 inputs (weights already dequantised), FP32 accumulation and FP32 output.
#include <algorithm>
#include <chrono>
#include <vector>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#include "util/error.h"

namespace dsv4 {

namespace {
void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in {}: {}", what, cudaGetErrorString(e));
}
void ck(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error {} in {}", int(s), what);
}
}  // namespace

double cublaslt_bf16_gemm_ms(int64_t M, int64_t N, int64_t K, int reps) {
  cublasLtHandle_t h;
  ck(cublasLtCreate(&h), "create");
  void *x, *w, *y, *ws;
  const size_t ws_bytes = 64 << 20;
  ck(cudaMalloc(&x, size_t(M * K) * 2), "malloc");
  ck(cudaMalloc(&w, size_t(N * K) * 2), "malloc");
  ck(cudaMalloc(&y, size_t(M * N) * 4), "malloc");
  ck(cudaMalloc(&ws, ws_bytes), "malloc");
  cudaMemset(x, 0x3c, size_t(M * K) * 2);
  cudaMemset(w, 0x3c, size_t(N * K) * 2);
  // Column-major view: Y^T [N, M] = W [N, K] (row-major = K x N col-major, transposed) * X^T.
  cublasLtMatmulDesc_t op;
  ck(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  ck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "attr");
  ck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "attr");
  cublasLtMatrixLayout_t la, lb, lc;
  ck(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, K), "layout");
  ck(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K), "layout");
  ck(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, N), "layout");
  cublasLtMatmulPreference_t pref;
  ck(cublasLtMatmulPreferenceCreate(&pref), "pref");
  size_t wsb = ws_bytes;
  ck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)), "pref");
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  ck(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &res, &found), "heuristic");
  if (!found) fail("cuBLASLt found no algorithm for {}x{}x{}", M, N, K);
  const float alpha = 1.f, beta = 0.f;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> ms;
  for (int r = 0; r < reps + 2; ++r) {
    cudaEventRecord(e0);
    ck(cublasLtMatmul(h, op, &alpha, w, la, x, lb, &beta, y, lc, y, lc, &res.algo, ws, ws_bytes, 0), "matmul");
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    if (r >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(op);
  cudaFree(x);
  cudaFree(w);
  cudaFree(y);
  cudaFree(ws);
  cublasLtDestroy(h);
  return ms[ms.size() / 2];
}

}  // namespace dsv4
