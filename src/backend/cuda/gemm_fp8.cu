// FP8-activation GEMMs, the official kernels' numerics (docs/MODEL.md §2.9):
//  - act_quant: activations to E4M3 in 1x128 blocks with FP32 (or power-of-two) scales;
//  - a tensor-core kernel (mma.sync m16n8k32 E4M3, sm_89 and newer: portable across Ada, Hopper
//    and Blackwell) for FP8 weights (128x128 block scales) and FP4 experts (E2M1 converted to
//    E4M3 exactly while staging, 1x32 scales). Partial sums are promoted to FP32 with their scales
//    once per scale block: every 128 of K for FP8 weights, every 32 for FP4.
// Products of E4M3/E2M1 values are exact in FP32, so the CPU twin (the FP32 GEMM on round-tripped
// activations) differs only in summation order.
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cublaslt_fp8.h"
#include "backend/cuda/gemm_problem.cuh"
#include "tensor/quant.h"

namespace dsv4::cuda {

namespace {

// ---- activation quantisation: one warp per (row, 128-block) ----------------------------------
__global__ void act_quant_kernel(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q,
                                 int64_t ldq, float* scales, float* rt) {
  const int lane = threadIdx.x & 31;
  const int64_t nkb = (K + 127) / 128;
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (w >= M * nkb) return;
  const int64_t m = w / nkb, kb = w % nkb;
  const float* xr = x + m * ldx;
  float v[4], amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * 128 + j * 32 + lane;
    v[j] = k < K ? xr[k] : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = warp_max(amax);
  amax = fmaxf(amax, kFp8AmaxFloor);
  const float s = pow2 ? __uint_as_float(uint32_t(pow2_scale_code(amax)) << 23) : amax * (1.f / 448.f);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * 128 + j * 32 + lane;
    if (k >= K) continue;
    const uint8_t e = __nv_cvt_float_to_fp8(fminf(fmaxf(v[j] / s, -448.f), 448.f), __NV_SATFINITE, __NV_E4M3);
    if (q) q[m * ldq + k] = e;
    if (rt) rt[m * K + k] = e4m3_to_float(e) * s;
  }
  if (lane == 0 && scales) scales[kb * M + m] = s;
}

// ---- tensor-core GEMM --------------------------------------------------------------------------
constexpr int kTM = 64, kTN = 128, kTK = 128;  // tile; kTK = one activation scale block
constexpr int kRowBytes = kTK + 16;            // padded shared rows: conflict-free fragment loads

struct Smem {
  uint8_t x[2][kTM][kRowBytes];
  uint8_t w[2][kTN][kRowBytes];
  float wscale[2][kTN][kTK / 32];  // FP4 group scales of the staged tile
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_e4m3(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host never launches this kernel below sm_89
#endif
}

// A warp's accumulators: 2 m16 x 4 n8 tiles of the mma C fragment (rows g, g+8; columns 2t, 2t+1).
using Frag = float[2][4][4];
__device__ __forceinline__ void zero(Frag& f) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f[i][j][e] = 0.f;
}
// Promotion of n8 tile nt: acc += part * (row scale x column scale), then part = 0.
// sx[mt][h]: activation scales of rows g + 8h; s0, s1: weight scales of columns 2t, 2t + 1.
__device__ __forceinline__ void promote(Frag& acc, Frag& part, int nt, const float (&sx)[2][2], float s0, float s1) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    acc[mt][nt][0] = fmaf(part[mt][nt][0], sx[mt][0] * s0, acc[mt][nt][0]);
    acc[mt][nt][1] = fmaf(part[mt][nt][1], sx[mt][0] * s1, acc[mt][nt][1]);
    acc[mt][nt][2] = fmaf(part[mt][nt][2], sx[mt][1] * s0, acc[mt][nt][2]);
    acc[mt][nt][3] = fmaf(part[mt][nt][3], sx[mt][1] * s1, acc[mt][nt][3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) part[mt][nt][e] = 0.f;
  }
}

template <int FMT, bool SF32>
__global__ void __launch_bounds__(256) mma_kernel(GemmArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const Problem p = problem(a);
  const int64_t r0 = int64_t(blockIdx.y) * kTM, n0 = int64_t(blockIdx.x) * kTN, K = a.K, N = a.N;
  if (r0 >= p.rows) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
  const int64_t nkb = (K + kTK - 1) / kTK;
  auto act_row = [&](int64_t r) -> int64_t { return a.x_rows ? int64_t(a.x_rows[p.base + r]) : p.base + r; };

  // Staging: X 64 rows x 128 B (2 chunks of 16 B per thread), W 128 rows x 128 B (4 chunks) for
  // FP8 via cp.async; FP4 W 128 rows x 64 packed B (2 chunks) through registers, converted.
  int64_t xrow[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = r0 + ((tid + i * 256) >> 3);
    xrow[i] = r < p.rows ? act_row(r) : -1;
  }
  auto stage_x = [&](int st, int64_t kb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, row = c >> 3, kc = (c & 7) * 16;
      const int64_t k = kb * kTK + kc;
      const bool ok = xrow[i] >= 0 && k < K;
      cp_async16(&sm.x[st][row][kc], ok ? a.xq + xrow[i] * a.ldxq + k : a.xq, ok);
    }
  };
  auto stage_w_fp8 = [&](int st, int64_t kb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = tid + i * 256, row = c >> 3, kc = (c & 7) * 16;
      const int64_t n = n0 + row, k = kb * kTK + kc;
      const bool ok = n < N && k < K;
      cp_async16(&sm.w[st][row][kc], ok ? p.w.w + (p.wrow0 + n) * K + k : p.w.w, ok);
    }
  };
  uint4 w4[2];
  float w4s[2];
  auto fetch_w_fp4 = [&](int64_t kb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, row = c >> 2, grp = c & 3;
      const int64_t n = n0 + row, k = kb * kTK + grp * 32;
      if (n < N && k < K) {
        w4[i] = *reinterpret_cast<const uint4*>(p.w.w + ((p.wrow0 + n) * K + k) / 2);
        w4s[i] = scale_at<SF32>(p.w.s, (p.wrow0 + n) * (K / 32) + k / 32);
      } else {
        w4[i] = make_uint4(0, 0, 0, 0);
        w4s[i] = 0.f;
      }
    }
  };
  auto store_w_fp4 = [&](int st) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, row = c >> 2, grp = c & 3;
      const uint32_t u[4] = {w4[i].x, w4[i].y, w4[i].z, w4[i].w};
      uint4 lo, hi;
      lo.x = e2m1x4_to_e4m3x4(u[0]);
      lo.y = e2m1x4_to_e4m3x4(u[0] >> 16);
      lo.z = e2m1x4_to_e4m3x4(u[1]);
      lo.w = e2m1x4_to_e4m3x4(u[1] >> 16);
      hi.x = e2m1x4_to_e4m3x4(u[2]);
      hi.y = e2m1x4_to_e4m3x4(u[2] >> 16);
      hi.z = e2m1x4_to_e4m3x4(u[3]);
      hi.w = e2m1x4_to_e4m3x4(u[3] >> 16);
      *reinterpret_cast<uint4*>(&sm.w[st][row][grp * 32]) = lo;
      *reinterpret_cast<uint4*>(&sm.w[st][row][grp * 32 + 16]) = hi;
      sm.wscale[st][row][grp] = w4s[i];
    }
  };

  Frag acc, part;  // promoted FP32 sums; the current scale block's tensor-core partial sums
  zero(acc);
  zero(part);

  stage_x(0, 0);
  if constexpr (FMT == kFP8) stage_w_fp8(0, 0);
  cp_async_commit();
  if constexpr (FMT == kFP4) {
    fetch_w_fp4(0);
    store_w_fp4(0);
  }

  const int64_t nkw = (p.w.in + kTK - 1) / kTK;  // FP8 weight scale columns
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int st = int(kb & 1);
    const bool more = kb + 1 < nkb;
    if (more) {
      stage_x(st ^ 1, kb + 1);
      if constexpr (FMT == kFP8) stage_w_fp8(st ^ 1, kb + 1);
      cp_async_commit();
      if constexpr (FMT == kFP4) fetch_w_fp4(kb + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float sx[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + wm * 32 + mt * 16 + g + 8 * h;
        sx[mt][h] = r < p.rows ? a.xs[kb * a.xs_ld + act_row(r)] : 0.f;
      }
#pragma unroll
    for (int ks = 0; ks < kTK / 32; ++ks) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int rb = wm * 32 + mt * 16 + g, kc = ks * 32 + t4 * 4;
        af[mt][0] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb][kc]);
        af[mt][1] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb + 8][kc]);
        af[mt][2] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb][kc + 16]);
        af[mt][3] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb + 8][kc + 16]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int cb = wn * 32 + nt * 8 + g, kc = ks * 32 + t4 * 4;
        bf[nt][0] = *reinterpret_cast<const uint32_t*>(&sm.w[st][cb][kc]);
        bf[nt][1] = *reinterpret_cast<const uint32_t*>(&sm.w[st][cb][kc + 16]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_e4m3(part[mt][nt], af[mt], bf[nt]);
      if constexpr (FMT == kFP4) {  // promote per 32-group: weight scale per column
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int cl = wn * 32 + nt * 8 + t4 * 2;
          promote(acc, part, nt, sx, sm.wscale[st][cl][ks], sm.wscale[st][cl + 1][ks]);
        }
      }
    }
    if constexpr (FMT == kFP8) {  // promote per 128-block: weight scale per 128 columns
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        float s[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t n = n0 + wn * 32 + nt * 8 + t4 * 2 + j;
          s[j] = n < N ? scale_at<SF32>(p.w.s, ((p.wrow0 + n) / kTK) * nkw + kb) : 0.f;
        }
        promote(acc, part, nt, sx, s[0], s[1]);
      }
    }
    if constexpr (FMT == kFP4) {
      if (more) store_w_fp4(st ^ 1);
    }
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + wm * 32 + mt * 16 + g + 8 * h;
      if (r >= p.rows) continue;
      float* yr = p.y + (p.base + r) * a.ldy;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t n = n0 + wn * 32 + nt * 8 + t4 * 2 + j;
          if (n < N) yr[n] = acc[mt][nt][2 * h + j];
        }
    }
}

__global__ void padded_scales_kernel(const uint8_t* s, bool f32, int64_t rows, int64_t cols, int64_t ld, float* out) {
  const int64_t n = rows * ld;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ld, c = i % ld;
    out[i] = c < cols ? (f32 ? scale_at<true>(s, r * cols + c) : scale_at<false>(s, r * cols + c)) : 0.f;
  }
}

template <int FMT, bool SF32>
void launch_mma(const GemmArgs& a, cudaStream_t stream) {
  static bool configured = false;  // per instantiation: raise the dynamic shared memory limit once
  if (!configured) {
    cudaFuncSetAttribute(mma_kernel<FMT, SF32>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(Smem)));
    configured = true;
  }
  dim3 grid(unsigned((a.N + kTN - 1) / kTN), unsigned((a.max_rows + kTM - 1) / kTM), unsigned(a.Z));
  mma_kernel<FMT, SF32><<<grid, 256, sizeof(Smem), stream>>>(a);
}

}  // namespace

void act_quant(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q, int64_t ldq, float* scales,
               float* roundtrip, cudaStream_t stream) {
  const int64_t warps = M * ((K + 127) / 128);
  if (warps <= 0) return;
  act_quant_kernel<<<blocks_for(warps * 32), 256, 0, stream>>>(x, M, K, ldx, pow2, q, ldq, scales, roundtrip);
  DSV4_LAUNCH_CHECK();
}

void padded_block_scales(const uint8_t* s, bool scale_f32, int64_t N, int64_t K, float* out, cudaStream_t stream) {
  const int64_t rows = (N + 127) / 128, cols = (K + 127) / 128, ld = padded_scale_cols(K);
  padded_scales_kernel<<<blocks_for(rows * ld), 256, 0, stream>>>(s, scale_f32, rows, cols, ld, out);
  DSV4_LAUNCH_CHECK();
}

void gemm_fp8_tensor_core(const GemmArgs& a, cudaStream_t stream) {
  if (a.K % 32 || a.x_z_off || !a.xs)
    std::fprintf(stderr, "gemm_fp8_tensor_core: unsupported arguments (K %% 32, x_z_off, scales)\n"), std::abort();
  switch (a.wd.fmt) {
    case kFP8: a.wd.scale_f32 ? launch_mma<kFP8, true>(a, stream) : launch_mma<kFP8, false>(a, stream); break;
    case kFP4: a.wd.scale_f32 ? launch_mma<kFP4, true>(a, stream) : launch_mma<kFP4, false>(a, stream); break;
    default: std::fprintf(stderr, "gemm_fp8_tensor_core: weights are not FP8 or FP4\n"), std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
