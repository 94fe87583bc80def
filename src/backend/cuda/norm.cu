// Elementwise family: fill, embedding, RMSNorm, RoPE/YaRN, mHC (pre with Sinkhorn, post, head),
// row gathers and stream broadcast.
#include <algorithm>
#include <type_traits>

#include <cuda_fp8.h>

#include "backend/cuda/common.cuh"
#include "backend/cuda/mma.cuh"

namespace dsv4::cuda {

namespace {

__global__ void fill_kernel(float* x, int64_t n, float v) {
  pdl_prologue();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}

__global__ void embed_kernel(Vec table, int64_t d, const int32_t* ids, float* out) {
  pdl_prologue();
  const int64_t t = blockIdx.x, row = ids[t];
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) out[t * d + i] = vec_at(table, row * d + i);
}

// Block of kNormThreads per row. kPer > 0: thread t holds values t, t + 256, ... of the row in
// registers (d <= kPer * 256), so every load of the block is in flight at once and the row is
// read once; kPer == 0: any d, two passes over global memory. Both sum the squares in the same
// order (per-thread FMA chain, then block_sum): the results are bitwise equal. (FP8 KV rows are
// quantised right after this norm, so a changed summation order moves values across E4M3
// rounding boundaries; the mixed-batch FP8 test against the CPU notices.)
constexpr int kNormThreads = 256;
template <int kPer>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const float* x, Vec w, float eps, int64_t d, float* out) {
  pdl_prologue();
  __shared__ float red[33];
  const int64_t r = blockIdx.x;
  const float* xi = x + r * d;
  float ss = 0.f;
  if constexpr (kPer > 0) {
    float v[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = threadIdx.x + int64_t(j) * kNormThreads;
      v[j] = i < d ? xi[i] : 0.f;
      if (i < d) ss = fmaf(v[j], v[j], ss);
    }
    ss = block_sum(ss, red);
    const float rs = 1.f / sqrtf(ss / float(d) + eps);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t i = threadIdx.x + int64_t(j) * kNormThreads;
      if (i < d) out[r * d + i] = v[j] * rs * (w.p ? vec_at(w, i) : 1.f);
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += kNormThreads) ss = fmaf(xi[i], xi[i], ss);
    ss = block_sum(ss, red);
    const float rs = 1.f / sqrtf(ss / float(d) + eps);
    for (int64_t i = threadIdx.x; i < d; i += kNormThreads) out[r * d + i] = xi[i] * rs * (w.p ? vec_at(w, i) : 1.f);
  }
}

__global__ void rope_kernel(float* x, const int32_t* pos, const float* inv_freq, int64_t T, int64_t heads,
                            int64_t dim, int64_t half, bool inverse) {
  pdl_prologue();
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


// mHC pre/head in two launches so that a decode step (T = 1) spreads over the chip instead of
// one block streaming the whole (2+m)m x m*D mixing matrix (1.5 MB for m = 4, D = 4096):
//  1. hc_mix_partial_kernel: grid (chunks of kHcChunk values, T); each block writes the partial
//     sum of squares and the MIX partial dot products fn_j . x over its chunk (prefill:
//     hc_mix_mma_kernel, the same partials on tensor cores);
//  2. hc_finish_kernel: grid (D / (256 PER), T); each block reduces the partials of its token (in
//     chunk order: deterministic), recomputes the small mixing (sigmoids, Sinkhorn on M x M
//     threads) and writes its slice of u; block 0 also writes post and comb.
// One value per thread in the mixing: every load of a block is in flight at once (25 for m = 4),
// and a decode step spreads over m*D/256 blocks (64 for m = 4, D = 4096). Its finish takes one
// channel a thread (16 blocks for D = 4096); prefill takes PER = 16, one block a token, so the
// partials are reduced once per token instead of once per 256 channels.
constexpr int kHcThreads = 256, kHcChunk = kHcThreads;

int64_t hc_chunks(int64_t n, int64_t per = 1) { return (n + kHcChunk * per - 1) / (kHcChunk * per); }

template <int MIX>
__global__ void __launch_bounds__(kHcThreads) hc_mix_partial_kernel(const float* X, int64_t n, const float* fn,
                                                                      float* part) {
  pdl_prologue();
  __shared__ float red[MIX + 1][kHcThreads / 32];
  const int64_t t = blockIdx.y, c0 = int64_t(blockIdx.x) * kHcChunk;
  const float* x = X + t * n;
  float acc[MIX + 1];
#pragma unroll
  for (int j = 0; j <= MIX; ++j) acc[j] = 0.f;
  const int64_t i = c0 + threadIdx.x;  // coalesced; MIX independent loads in flight
  if (i < n) {
    const float v = x[i];
    acc[MIX] = fmaf(v, v, acc[MIX]);
#pragma unroll
    for (int j = 0; j < MIX; ++j) acc[j] = fmaf(__ldg(fn + j * n + i), v, acc[j]);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j <= MIX; ++j) {
    const float s = warp_sum(acc[j]);
    if (lane == 0) red[j][warp] = s;
  }
  __syncthreads();
  for (int j = threadIdx.x; j <= MIX; j += kHcThreads) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kHcThreads / 32; ++w) s += red[j][w];
    part[(t * gridDim.x + blockIdx.x) * (MIX + 1) + j] = s;
  }
}

// Prefill variant of hc_mix_partial_kernel on tensor cores (the same partials per chunk of
// kHcChunk values, another summation order): the mixes are the product [T x n] x [n x MIX].
// Block (chunk, tile of kHcMmaTokens tokens), warp w the tile's tokens 16w .. 16w + 15 (mma.sync
// m16n8k16 BF16, fragments loaded straight from global memory as FP32 pairs). x and fn are split
// into three BF16 parts each (split_bf16x3) and the six part products down to 2^-16 of the whole
// are summed (x1 f1, x1 f2, x2 f1, x1 f3, x2 f2, x3 f1); the three left out are below 2^-24, so
// the sums carry FP32-level error like the CPU's FP32 ones. The sums of squares run in FP32
// alongside. (The SIMT kernel before it took ~1 ms a call at 8K tokens on the H200, against ~0.13
// ms of bytes.)
constexpr int kHcMmaTokens = 64, kHcMmaThreads = kHcMmaTokens / 16 * 32;
template <int MIX>
__global__ void __launch_bounds__(kHcMmaThreads) hc_mix_mma_kernel(const float* X, int64_t T, int64_t n,
                                                                    const float* fn, float* part) {
  constexpr int NT = (MIX + 7) / 8;  // n8 tiles of mixes
  pdl_prologue();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t c0 = int64_t(blockIdx.x) * kHcChunk;
  const int64_t k_end = n - c0 < kHcChunk ? n - c0 : kHcChunk;  // n % 16 == 0
  int64_t row[2];  // this thread's tokens: fragment rows g and g + 8
  bool live[2];
  const float* xr[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = int64_t(blockIdx.y) * kHcMmaTokens + warp * 16 + g + 8 * h;
    live[h] = row[h] < T;
    xr[h] = X + (live[h] ? row[h] : 0) * n + c0 + 2 * t4;
  }
  const float* fr[NT];  // this thread's mix of each n8 tile: fragment column g
  bool mix_live[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mix_live[nt] = nt * 8 + g < MIX;
    fr[nt] = fn + (mix_live[nt] ? nt * 8 + g : 0) * n + c0 + 2 * t4;
  }
  // The high parts' products and the five smaller ones in separate sums: two independent MMA
  // chains, and the small terms do not meet the large sum in every step.
  float acc[NT][4] = {}, low[NT][4] = {};
  float sq[2] = {0.f, 0.f};
#pragma unroll 2
  for (int64_t k = 0; k < k_end; k += 16) {
    uint32_t a[3][4];  // the parts of the A fragment: (g, k lo), (g + 8, k lo), (g, k hi), (g + 8, k hi)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 v = live[h] ? *reinterpret_cast<const float2*>(xr[h] + k + 8 * c) : make_float2(0.f, 0.f);
        sq[h] = fmaf(v.y, v.y, fmaf(v.x, v.x, sq[h]));
        uint32_t parts[3];
        split_bf16x3(v, parts);
#pragma unroll
        for (int q = 0; q < 3; ++q) a[q][h + 2 * c] = parts[q];
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b[3][2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float2 f = mix_live[nt] ? __ldg(reinterpret_cast<const float2*>(fr[nt] + k + 8 * c)) : make_float2(0.f, 0.f);
        uint32_t parts[3];
        split_bf16x3(f, parts);
#pragma unroll
        for (int q = 0; q < 3; ++q) b[q][c] = parts[q];
      }
      mma_bf16(acc[nt], a[0], b[0]);
      mma_bf16(low[nt], a[0], b[1]);
      mma_bf16(low[nt], a[1], b[0]);
      mma_bf16(low[nt], a[0], b[2]);
      mma_bf16(low[nt], a[1], b[1]);
      mma_bf16(low[nt], a[2], b[0]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] += low[nt][e];
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // a row's 16 values of a step lie in the four lanes of its quad
    sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], 1);
    sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], 2);
  }
  // C fragment element e: row g + 8 (e / 2), mix 8 nt + 2 t4 + e % 2.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!live[h]) continue;
    float* out = part + (row[h] * gridDim.x + blockIdx.x) * (MIX + 1);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int mix = nt * 8 + 2 * t4 + e;
        if (mix < MIX) out[mix] = acc[nt][2 * h + e];
      }
    if (t4 == 0) out[MIX] = sq[h];
  }
}
// Tokens from which hc_pre/hc_head take the prefill kernels (the tensor-core mixing where n % 16
// == 0, the finish one block a token).
constexpr int64_t kHcPrefillMinTokens = 32;

// SINKHORN: hc_pre (pre, post, comb from (2+M)M mixes); otherwise hc_head (pre from M mixes).
template <int M, bool SINKHORN, int PER>
__global__ void __launch_bounds__(kHcThreads) hc_finish_kernel(const float* X, int64_t D, const float* part,
                                                                 int64_t chunks, const float* base, const float* scale,
                                                                 int64_t iters, float hc_eps, float norm_eps, float* u,
                                                                 float* post, float* comb) {
  pdl_prologue();
  constexpr int MIX = SINKHORN ? (2 + M) * M : M;
  __shared__ float tot[MIX + 1], pre[M], C[M * M];
  const int64_t t = blockIdx.y;
  const int tid = threadIdx.x;
  for (int j = tid; j <= MIX; j += kHcThreads) {
    float s = 0.f;
#pragma unroll 16
    for (int64_t c = 0; c < chunks; ++c) s += part[(t * chunks + c) * (MIX + 1) + j];  // loads batched
    tot[j] = s;
  }
  __syncthreads();
  const float rs = 1.f / sqrtf(tot[MIX] / float(M * D) + norm_eps);
  const bool writer = blockIdx.x == 0;
  if (tid < M) {
    pre[tid] = sigmoidf_(scale[0] * (tot[tid] * rs) + base[tid]) + hc_eps;
    if (SINKHORN && writer) post[t * M + tid] = 2.f * sigmoidf_(scale[1] * (tot[M + tid] * rs) + base[M + tid]);
  }
  __syncthreads();
  const float* x = X + t * M * D;
  const int64_t d0 = int64_t(blockIdx.x) * kHcThreads * PER + tid;
  float xv[PER][M];  // all of the block's loads in flight before the first sum
#pragma unroll
  for (int e = 0; e < PER; ++e)
#pragma unroll
    for (int q = 0; q < M; ++q) xv[e][q] = d0 + e * kHcThreads < D ? x[q * D + d0 + e * kHcThreads] : 0.f;
#pragma unroll
  for (int e = 0; e < PER; ++e) {
    const int64_t d = d0 + e * kHcThreads;
    if (d >= D) continue;
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < M; ++q) s += pre[q] * xv[e][q];
    u[t * D + d] = s;
  }
  // Only block 0 writes comb: the others are done (u does not wait for the Sinkhorn passes).
  if constexpr (SINKHORN) {
    if (!writer) return;
    // Thread i = j*M + k owns C[j][k]; sums run in the CPU twin's order (k, resp. j ascending).
    // M*M <= 32: warp 0 alone, ordered by __syncwarp; larger M: the whole block.
    constexpr bool kOneWarp = M * M <= 32;
    const bool owner = tid < M * M;
    const int j = tid / M, k = tid % M;
    auto sync = [] {
      if constexpr (kOneWarp) __syncwarp();
      else __syncthreads();
    };
    if (!kOneWarp || tid < 32) {
      float c = 0.f;
      if (owner) C[tid] = scale[2] * (tot[2 * M + tid] * rs) + base[2 * M + tid];
      sync();
      if (owner) {  // row softmax + eps
        float mx = -INFINITY, s = 0.f;
        for (int q = 0; q < M; ++q) mx = fmaxf(mx, C[j * M + q]);
        for (int q = 0; q < M; ++q) s += expf(C[j * M + q] - mx);
        c = expf(C[tid] - mx) / s + hc_eps;
      }
      sync();
      if (owner) C[tid] = c;
      sync();
      for (int64_t it = 0; it < iters; ++it) {
        if (it > 0) {  // row normalise
          float s = 0.f;
          if (owner)
            for (int q = 0; q < M; ++q) s += C[j * M + q];
          sync();
          if (owner) C[tid] = c = c / (s + hc_eps);
          sync();
        }
        float s = 0.f;  // column normalise
        if (owner)
          for (int q = 0; q < M; ++q) s += C[q * M + k];
        sync();
        if (owner) C[tid] = c = c / (s + hc_eps);
        sync();
      }
      if (owner) comb[t * M * M + tid] = c;
    }
  }
}

// Thread (V adjacent channels d, token blockIdx.y + gridDim.y i; channel_launch): y[t, d..] and
// the M streams X[t, :, d..] are read once and all M outputs written; each sum
// in the CPU twin's order: post * y, then the streams j ascending.
template <int M, int V>
__global__ void hc_post_kernel(const float* y, const float* X, const float* post, const float* comb, int64_t T,
                               int64_t D, float* out) {
  pdl_prologue();
  using Vec = ChannelVec<V>;
  const int64_t d = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (d >= D) return;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    float yv[V], xv[M][V];
    *reinterpret_cast<Vec*>(yv) = *reinterpret_cast<const Vec*>(y + t * D + d);
#pragma unroll
    for (int j = 0; j < M; ++j) *reinterpret_cast<Vec*>(xv[j]) = *reinterpret_cast<const Vec*>(X + (t * M + j) * D + d);
#pragma unroll
    for (int k = 0; k < M; ++k) {
      const float pk = post[t * M + k];
      float sum[V];
#pragma unroll
      for (int e = 0; e < V; ++e) sum[e] = pk * yv[e];
#pragma unroll
      for (int j = 0; j < M; ++j) {
        const float c = comb[(t * M + j) * M + k];
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += c * xv[j][e];
      }
      *reinterpret_cast<Vec*>(out + (t * M + k) * D + d) = *reinterpret_cast<const Vec*>(sum);
    }
  }
}

__global__ void gather_kernel(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n,
                              float* out) {
  pdl_prologue();
  const int64_t total = n * d;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < total; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = g / d, r = rows[i];
    out[g] = (r >= 0 && r < src_rows) ? src[r * d + g % d] : __int_as_float(0x7fc00000);
  }
}

__global__ void broadcast_kernel(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool acc) {
  pdl_prologue();
  const int64_t n = T * m * D;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = g % D, t = g / (m * D);
    X[g] = (acc ? X[g] : 0.f) + v[t * D + d];
  }
}

}  // namespace

void fill(float* x, int64_t n, float v, cudaStream_t s) {
  if (n <= 0) return;
  launch_pdl(fill_kernel, blocks_for(n), 256, 0, s, x, n, v);
  DSV4_LAUNCH_CHECK();
}

void embed(Vec table, int64_t d, const int32_t* ids, int64_t n, float* out, cudaStream_t s) {
  if (n <= 0) return;
  launch_pdl(embed_kernel, unsigned(n), 256, 0, s, table, d, ids, out);
  DSV4_LAUNCH_CHECK();
}

void rms_norm(const float* x, Vec w, float eps, int64_t rows, int64_t d, float* out, cudaStream_t s) {
  if (rows <= 0) return;
  const unsigned grid = unsigned(rows);
  if (d <= 1 * kNormThreads) launch_pdl(rms_norm_kernel<1>, grid, kNormThreads, 0, s, x, w, eps, d, out);
  else if (d <= 2 * kNormThreads) launch_pdl(rms_norm_kernel<2>, grid, kNormThreads, 0, s, x, w, eps, d, out);
  else if (d <= 4 * kNormThreads) launch_pdl(rms_norm_kernel<4>, grid, kNormThreads, 0, s, x, w, eps, d, out);
  else if (d <= 16 * kNormThreads) launch_pdl(rms_norm_kernel<16>, grid, kNormThreads, 0, s, x, w, eps, d, out);
  else launch_pdl(rms_norm_kernel<0>, grid, kNormThreads, 0, s, x, w, eps, d, out);
  DSV4_LAUNCH_CHECK();
}

void rope(float* x, const int32_t* pos, const float* inv_freq, int64_t T, int64_t heads, int64_t dim, int64_t rope_dim,
          bool inverse, cudaStream_t s) {
  const int64_t n = T * heads * (rope_dim / 2);
  if (n <= 0) return;
  launch_pdl(rope_kernel, blocks_for(n), 256, 0, s, x, pos, inv_freq, T, heads, dim, rope_dim / 2, inverse);
  DSV4_LAUNCH_CHECK();
}

#define DSV4_HC_M_CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(8)

int64_t hc_scratch_floats(int64_t T, int64_t m, int64_t D) {
  return std::max<int64_t>(T * hc_chunks(m * D) * ((2 + m) * m + 1), 1);
}

namespace {
template <int M, bool SINKHORN>
void launch_hc(const float* X, int64_t T, int64_t D, const float* fn, const float* base, const float* scale,
               int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb, float* scratch,
               cudaStream_t s) {
  constexpr int MIX = SINKHORN ? (2 + M) * M : M;
  const int64_t n = M * D, chunks = hc_chunks(n);
  // The tensor-core mixing: mma.sync BF16 (sm_80 and newer), 8-byte aligned FP32 pair loads.
  // DSV4_CUDA_HC_MMA=0: the FP32 kernel always (A/B).
  static const bool mma_on = env_flag_default_on("DSV4_CUDA_HC_MMA");
  const bool mma = mma_on && T >= kHcPrefillMinTokens && n % 16 == 0 && ((reinterpret_cast<uintptr_t>(X) |
                   reinterpret_cast<uintptr_t>(fn)) & 7) == 0 && mma_sync_available();
  if (mma)
    launch_pdl(hc_mix_mma_kernel<MIX>, dim3(unsigned(chunks), unsigned((T + kHcMmaTokens - 1) / kHcMmaTokens)),
               kHcMmaThreads, 0, s, X, T, n, fn, scratch);
  else
    launch_pdl(hc_mix_partial_kernel<MIX>, dim3(unsigned(chunks), unsigned(T)), kHcThreads, 0, s, X, n, fn, scratch);
  DSV4_LAUNCH_CHECK();
  // Prefill: one block a token, 16 channels a thread; decode spreads a token over D / 256 blocks.
  const bool prefill = T >= kHcPrefillMinTokens;
  const auto finish = prefill ? hc_finish_kernel<M, SINKHORN, 16> : hc_finish_kernel<M, SINKHORN, 1>;
  launch_pdl(finish, dim3(unsigned(hc_chunks(D, prefill ? 16 : 1)), unsigned(T)), kHcThreads, 0, s, X, D, scratch,
             chunks, base, scale, iters, hc_eps, norm_eps, u, post, comb);
  DSV4_LAUNCH_CHECK();
}
}  // namespace

void hc_pre(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
            int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb, float* scratch,
            cudaStream_t s) {
  if (T <= 0) return;
  switch (m) {
#define CASE(M)                                                                                                 \
  case M: launch_hc<M, true>(X, T, D, fn, base, scale, iters, hc_eps, norm_eps, u, post, comb, scratch, s); break;
    DSV4_HC_M_CASES(CASE)
#undef CASE
    default: std::fprintf(stderr, "hc_pre: hc_mult %lld not compiled\n", (long long)m); std::abort();
  }
}

void hc_head(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
             float hc_eps, float norm_eps, float* u, float* scratch, cudaStream_t s) {
  if (T <= 0) return;
  switch (m) {
#define CASE(M)                                                                                                    \
  case M: launch_hc<M, false>(X, T, D, fn, base, scale, 0, hc_eps, norm_eps, u, nullptr, nullptr, scratch, s); break;
    DSV4_HC_M_CASES(CASE)
#undef CASE
    default: std::fprintf(stderr, "hc_head: hc_mult %lld not compiled\n", (long long)m); std::abort();
  }
}

void hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t m, int64_t D,
             float* out, cudaStream_t s) {
  if (T * m * D <= 0) return;
  const ChannelLaunch l = channel_launch(T, D, {y, X, out});
  switch (m) {
#define CASE(M)                                                                                         \
  case M:                                                                                               \
    l.by4 ? launch_pdl(hc_post_kernel<M, 4>, l.grid, 256, 0, s, y, X, post, comb, T, D, out)            \
          : launch_pdl(hc_post_kernel<M, 1>, l.grid, 256, 0, s, y, X, post, comb, T, D, out);           \
    break;
    DSV4_HC_M_CASES(CASE)
#undef CASE
    default: std::fprintf(stderr, "hc_post: hc_mult %lld not compiled\n", (long long)m); std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

void gather_rows(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n, float* out,
                 cudaStream_t s) {
  if (n * d <= 0) return;
  launch_pdl(gather_kernel, blocks_for(n * d), 256, 0, s, src, src_rows, d, rows, n, out);
  DSV4_LAUNCH_CHECK();
}

void broadcast_streams(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool accumulate, cudaStream_t s) {
  if (T * m * D <= 0) return;
  launch_pdl(broadcast_kernel, blocks_for(T * m * D), 256, 0, s, v, X, T, m, D, accumulate);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
