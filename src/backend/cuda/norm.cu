// Elementwise family: fill, embedding, RMSNorm, RoPE/YaRN, mHC (pre with Sinkhorn, post, head),
// row gathers and stream broadcast.
#include <cuda_fp8.h>

#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

__global__ void fill_kernel(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}

__global__ void embed_kernel(Vec table, int64_t d, const int32_t* ids, float* out) {
  const int64_t t = blockIdx.x, row = ids[t];
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = vec_at(table, row * d + i);
}

__global__ void rms_norm_kernel(const float* x, Vec w, float eps, int64_t d, float* out) {
  __shared__ float red[33];
  const int64_t r = blockIdx.x;
  const float* xi = x + r * d;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(xi[i], xi[i], ss);
  ss = block_sum(ss, red);
  const float rs = 1.f / sqrtf(ss / float(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = xi[i] * rs * (w.p ? vec_at(w, i) : 1.f);
}

__global__ void rope_kernel(float* x, const int32_t* pos, const float* inv_freq, int64_t T, int64_t heads,
                            int64_t dim, int64_t half, bool inverse) {
  const int64_t n = T * heads * half;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = g % half, th = g / half, t = th / heads;
    const float theta = float(pos[t]) * inv_freq[i];
    float s, c;
    sincosf(theta, &s, &c);
    if (inverse) s = -s;
    float* v = x + th * dim + (dim - 2 * half) + 2 * i;
    const float a = v[0], b = v[1];
    v[0] = a * c - b * s;
    v[1] = a * s + b * c;
  }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }


// mu[j] = rsqrt(mean(x^2) + eps) * (fn_j . x) over the flattened streams of one token.
template <int MIX>
__device__ void hc_mix(const float* x, int64_t n, const float* fn, float norm_eps, float* mu /* smem */,
                       float* red) {
  float part[MIX];
#pragma unroll
  for (int j = 0; j < MIX; ++j) part[j] = 0.f;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = x[i];
    ss = fmaf(v, v, ss);
#pragma unroll
    for (int j = 0; j < MIX; ++j) part[j] = fmaf(fn[j * n + i], v, part[j]);
  }
  ss = block_sum(ss, red);
  const float rs = 1.f / sqrtf(ss / float(n) + norm_eps);
#pragma unroll
  for (int j = 0; j < MIX; ++j) {
    const float s = block_sum(part[j], red);
    if (threadIdx.x == 0) mu[j] = s * rs;
  }
  __syncthreads();
}

template <int M>
__global__ void hc_pre_kernel(const float* X, int64_t D, const float* fn, const float* base, const float* scale,
                              int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb) {
  constexpr int MIX = (2 + M) * M;
  __shared__ float red[33], mu[MIX], pre[M];
  const int64_t t = blockIdx.x;
  const float* x = X + t * M * D;
  hc_mix<MIX>(x, M * D, fn, norm_eps, mu, red);
  if (threadIdx.x == 0) {
    float C[M * M];
    for (int k = 0; k < M; ++k) {
      pre[k] = sigmoidf_(scale[0] * mu[k] + base[k]) + hc_eps;
      post[t * M + k] = 2.f * sigmoidf_(scale[1] * mu[M + k] + base[M + k]);
    }
    for (int i = 0; i < M * M; ++i) C[i] = scale[2] * mu[2 * M + i] + base[2 * M + i];
    for (int j = 0; j < M; ++j) {
      float mx = -INFINITY, s = 0.f;
      for (int k = 0; k < M; ++k) mx = fmaxf(mx, C[j * M + k]);
      for (int k = 0; k < M; ++k) s += (C[j * M + k] = expf(C[j * M + k] - mx));
      for (int k = 0; k < M; ++k) C[j * M + k] = C[j * M + k] / s + hc_eps;
    }
    for (int64_t it = 0; it < iters; ++it) {
      if (it > 0)
        for (int j = 0; j < M; ++j) {
          float s = 0.f;
          for (int k = 0; k < M; ++k) s += C[j * M + k];
          for (int k = 0; k < M; ++k) C[j * M + k] /= s + hc_eps;
        }
      for (int k = 0; k < M; ++k) {
        float s = 0.f;
        for (int j = 0; j < M; ++j) s += C[j * M + k];
        for (int j = 0; j < M; ++j) C[j * M + k] /= s + hc_eps;
      }
    }
    for (int i = 0; i < M * M; ++i) comb[t * M * M + i] = C[i];
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < M; ++k) s += pre[k] * x[k * D + d];
    u[t * D + d] = s;
  }
}

template <int M>
__global__ void hc_head_kernel(const float* X, int64_t D, const float* fn, const float* base, const float* scale,
                               float hc_eps, float norm_eps, float* u) {
  __shared__ float red[33], mu[M];
  const int64_t t = blockIdx.x;
  const float* x = X + t * M * D;
  hc_mix<M>(x, M * D, fn, norm_eps, mu, red);
  float pre[M];
#pragma unroll
  for (int k = 0; k < M; ++k) pre[k] = sigmoidf_(scale[0] * mu[k] + base[k]) + hc_eps;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < M; ++k) s += pre[k] * x[k * D + d];
    u[t * D + d] = s;
  }
}

__global__ void hc_post_kernel(const float* y, const float* X, const float* post, const float* comb, int64_t T,
                               int64_t m, int64_t D, float* out) {
  const int64_t n = T * m * D;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = g % D, k = (g / D) % m, t = g / (m * D);
    float s = post[t * m + k] * y[t * D + d];
    for (int64_t j = 0; j < m; ++j) s += comb[(t * m + j) * m + k] * X[(t * m + j) * D + d];
    out[g] = s;
  }
}

__global__ void gather_kernel(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n,
                              float* out) {
  const int64_t total = n * d;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < total; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = g / d, r = rows[i];
    out[g] = (r >= 0 && r < src_rows) ? src[r * d + g % d] : __int_as_float(0x7fc00000);
  }
}

__global__ void broadcast_kernel(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool acc) {
  const int64_t n = T * m * D;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = g % D, t = g / (m * D);
    X[g] = (acc ? X[g] : 0.f) + v[t * D + d];
  }
}

}  // namespace

void fill(float* x, int64_t n, float v, cudaStream_t s) {
  if (n <= 0) return;
  fill_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, v);
  DSV4_LAUNCH_CHECK();
}

void embed(Vec table, int64_t d, const int32_t* ids, int64_t n, float* out, cudaStream_t s) {
  if (n <= 0) return;
  embed_kernel<<<unsigned(n), 256, 0, s>>>(table, d, ids, out);
  DSV4_LAUNCH_CHECK();
}

void rms_norm(const float* x, Vec w, float eps, int64_t rows, int64_t d, float* out, cudaStream_t s) {
  if (rows <= 0) return;
  rms_norm_kernel<<<unsigned(rows), 256, 0, s>>>(x, w, eps, d, out);
  DSV4_LAUNCH_CHECK();
}

void rope(float* x, const int32_t* pos, const float* inv_freq, int64_t T, int64_t heads, int64_t dim, int64_t rope_dim,
          bool inverse, cudaStream_t s) {
  const int64_t n = T * heads * (rope_dim / 2);
  if (n <= 0) return;
  rope_kernel<<<blocks_for(n), 256, 0, s>>>(x, pos, inv_freq, T, heads, dim, rope_dim / 2, inverse);
  DSV4_LAUNCH_CHECK();
}

#define DSV4_HC_M_CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(8)

void hc_pre(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
            int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb, cudaStream_t s) {
  if (T <= 0) return;
  switch (m) {
#define CASE(M)                                                                                                \
  case M:                                                                                                      \
    hc_pre_kernel<M><<<unsigned(T), 256, 0, s>>>(X, D, fn, base, scale, iters, hc_eps, norm_eps, u, post, comb); \
    break;
    DSV4_HC_M_CASES(CASE)
#undef CASE
    default: std::fprintf(stderr, "hc_pre: hc_mult %lld not compiled\n", (long long)m); std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

void hc_head(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
             float hc_eps, float norm_eps, float* u, cudaStream_t s) {
  if (T <= 0) return;
  switch (m) {
#define CASE(M)                                                                                       \
  case M: hc_head_kernel<M><<<unsigned(T), 256, 0, s>>>(X, D, fn, base, scale, hc_eps, norm_eps, u); break;
    DSV4_HC_M_CASES(CASE)
#undef CASE
    default: std::fprintf(stderr, "hc_head: hc_mult %lld not compiled\n", (long long)m); std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

void hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t m, int64_t D,
             float* out, cudaStream_t s) {
  if (T * m * D <= 0) return;
  hc_post_kernel<<<blocks_for(T * m * D), 256, 0, s>>>(y, X, post, comb, T, m, D, out);
  DSV4_LAUNCH_CHECK();
}

void gather_rows(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n, float* out,
                 cudaStream_t s) {
  if (n * d <= 0) return;
  gather_kernel<<<blocks_for(n * d), 256, 0, s>>>(src, src_rows, d, rows, n, out);
  DSV4_LAUNCH_CHECK();
}

void broadcast_streams(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool accumulate, cudaStream_t s) {
  if (T * m * D <= 0) return;
  broadcast_kernel<<<blocks_for(T * m * D), 256, 0, s>>>(v, X, T, m, D, accumulate);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
