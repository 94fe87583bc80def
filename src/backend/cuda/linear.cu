// GEMM family: y = x W^T for every weight format, weights dequantised in-kernel, FP32
// accumulation ("exact mode"). Two kernels, both templated on the format:
//  - gemv: one warp per output feature streams its weight row once and applies it to up to 8
//    activation rows at a time (decode; memory bound);
//  - tiled: 64x64 output tiles with the dequantised weight tile in shared memory (prefill).
// Both also serve grouped projections and the MoE's per-expert problems (blockIdx.z).
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/gemm_problem.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kRB = 8;  // activation rows per pass of the GEMV kernel

template <int FMT, bool SF32>
__global__ void __launch_bounds__(256) gemv_kernel(GemmArgs a, bool vec) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (n >= a.N) return;
  const Problem p = problem(a);
  const int64_t wr = p.wrow0 + n, K = a.K;
  for (int64_t r0 = int64_t(blockIdx.y) * kRB; r0 < p.rows; r0 += int64_t(gridDim.y) * kRB) {
    const int nb = int(p.rows - r0 < kRB ? p.rows - r0 : kRB);
    const float* xr[kRB];
#pragma unroll
    for (int b = 0; b < kRB; ++b) xr[b] = b < nb ? x_row(a, p, r0 + b) : nullptr;
    float acc[kRB];
#pragma unroll
    for (int b = 0; b < kRB; ++b) acc[b] = 0.f;
    if (vec) {
      for (int64_t k0 = int64_t(lane) * 16; k0 < K; k0 += 512) {
        float wv[16];
        wload16<FMT, SF32>(p.w, wr, k0, wv);
#pragma unroll
        for (int b = 0; b < kRB; ++b) {
          if (b < nb) {
            const float4* xp = reinterpret_cast<const float4*>(xr[b] + k0);
            float s = acc[b];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float4 xv = xp[q];
              s = fmaf(wv[4 * q], xv.x, s);
              s = fmaf(wv[4 * q + 1], xv.y, s);
              s = fmaf(wv[4 * q + 2], xv.z, s);
              s = fmaf(wv[4 * q + 3], xv.w, s);
            }
            acc[b] = s;
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float wv = wload1<FMT, SF32>(p.w, wr, k);
#pragma unroll
        for (int b = 0; b < kRB; ++b)
          if (b < nb) acc[b] = fmaf(wv, xr[b][k], acc[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kRB; ++b) {
      const float v = warp_sum(acc[b]);
      if (lane == 0 && b < nb) p.y[(p.base + r0 + b) * a.ldy + n] = v;
    }
  }
}

constexpr int kBM = 64, kBN = 64, kBK = 16;

template <int FMT, bool SF32>
__global__ void __launch_bounds__(256) tiled_kernel(GemmArgs a, bool vec) {
  __shared__ __align__(16) float xs[kBK][kBM + 4];
  __shared__ __align__(16) float ws[kBK][kBN + 4];
  const Problem p = problem(a);
  const int64_t r0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN, K = a.K, N = a.N;
  if (r0 >= p.rows) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int lr = tid / 4, lk = (tid % 4) * 4;
  const float* xrow = r0 + lr < p.rows ? x_row(a, p, r0 + lr) : nullptr;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + lk + j;
      xs[lk + j][lr] = (xrow && k < K) ? xrow[k] : 0.f;
    }
    if (vec) {
      if (tid < kBN) {
        float v[16];
        const int64_t n = n0 + tid;
        if (n < N) {
          wload16<FMT, SF32>(p.w, p.wrow0 + n, k0, v);
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < 16; ++j) ws[j][tid] = v[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = tid * 4 + j, nn = idx / kBK, kk = idx % kBK;
        const int64_t n = n0 + nn, k = k0 + kk;
        ws[kk][nn] = (n < N && k < K) ? wload1<FMT, SF32>(p.w, p.wrow0 + n, k) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 xa = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
      const float4 wb = *reinterpret_cast<const float4*>(&ws[kk][tx * 4]);
      const float xv[4] = {xa.x, xa.y, xa.z, xa.w}, wv[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= p.rows) continue;
    float* yr = p.y + (p.base + r) * a.ldy;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < N) yr[n] = acc[i][j];
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void gemm(const GemmArgs& a, cudaStream_t stream) {
  if (a.max_rows <= 0 || a.N <= 0 || a.Z <= 0) return;
  if (a.xq) {
    gemm_fp8_tensor_core(a, stream);
    return;
  }
  // Vector loads need 16-element rows and 16-byte aligned x rows; weights live in 256-byte
  // aligned arena blocks (MoE descriptors too), so only the single descriptor is checked.
  const bool vec = a.K % 16 == 0 && a.ldx % 4 == 0 && a.x_z_off % 4 == 0 && aligned16(a.x) &&
                   (a.descs || aligned16(a.wd.w));
  const WeightDesc& fmt_of = a.wd;  // descs share the format of wd (the caller sets both)
  dispatch_format(fmt_of, [&]<int F, bool S>() {
    if (a.max_rows <= kGemvMaxRows || a.force_gemv) {
      const int warps = 8;
      const int64_t gy = a.force_gemv ? 1 : (a.max_rows + kRB - 1) / kRB;
      dim3 grid(unsigned((a.N + warps - 1) / warps), unsigned(gy), unsigned(a.Z));
      gemv_kernel<F, S><<<grid, warps * 32, 0, stream>>>(a, vec);
    } else {
      dim3 grid(unsigned((a.N + kBN - 1) / kBN), unsigned((a.max_rows + kBM - 1) / kBM), unsigned(a.Z));
      tiled_kernel<F, S><<<grid, 256, 0, stream>>>(a, vec);
    }
  });
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
