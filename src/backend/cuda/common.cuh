#pragma once
// Device helpers shared by the kernel families: weight element loaders per format, reductions.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "backend/cuda/dequant.cuh"
#include "tensor/quant.h"
#include "backend/cuda/kernels.h"
#include "util/env.h"

namespace dsv4::cuda {

#define DSV4_LAUNCH_CHECK()                                                                              \
  do {                                                                                                   \
    cudaError_t e_ = cudaGetLastError();                                                                 \
    if (e_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "CUDA launch error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::abort();                                                                                      \
    }                                                                                                    \
  } while (0)

// Programmatic dependent launch (sm_90 and newer): a kernel launched with launch_pdl may begin
// while the previous kernel of its stream drains, so its launch and block scheduling overlap that
// kernel's tail; a decode step is ~1,500 short kernels, each paying a few microseconds there.
// Every such kernel calls pdl_wait() before it reads anything an earlier kernel wrote (or writes
// anything an earlier kernel reads), then pdl_trigger() to let the next kernel launch in turn;
// pdl_prologue() is both at once. Reads of constant data (weights) may come before pdl_wait():
// the weight-streaming kernels start their first copies there. No effect on older GPUs. On by
// default; DSV4_CUDA_PDL=0 turns it off (H200, 30 layers: B=1 10.67 -> 10.33 ms, docs/PERF.md).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Only a grid of at most two blocks per SM lets its successor launch early: the successor's blocks
// would otherwise take the slots of this grid's later waves while they wait (H200, 64-sequence
// step with an early trigger everywhere: 85.9 -> 88.8 ms; prefill 1K 587 -> 602 ms). A grid that
// does not trigger still lets the successor launch when it completes.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t sms;
  asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
  if (gridDim.x * gridDim.y * gridDim.z <= 2 * sms) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_prologue() {
  pdl_wait();
  pdl_trigger();
}
// Attribute A of the current device, read once per device (GPUs may differ, and rank threads
// ask concurrently); 0 when there is no current device.
template <cudaDeviceAttr A>
int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // 0 = not read yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 0;
  int v = known[dev].load(std::memory_order_relaxed);
  if (!v) {
    if (cudaDeviceGetAttribute(&v, A, dev) != cudaSuccess) return 0;
    known[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}
// Raises a kernel's dynamic shared memory limit to `bytes` on the current device. The limit is an
// attribute per device and rank threads drive one device each, so the caller keeps one bit per
// device in `raised` (a static of its own) rather than raising the limit once per process.
template <class... P>
void allow_dynamic_smem(std::atomic<uint64_t>& raised, void (*kernel)(P...), size_t bytes) {
  int dev = 0;
  const uint64_t bit = cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64 ? uint64_t(1) << dev : 0;
  if (bit && (raised.load(std::memory_order_relaxed) & bit)) return;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  raised.fetch_or(bit, std::memory_order_relaxed);
}
// Streaming multiprocessors of the current device: launch shapes aim at whole waves of them.
inline int sm_count() { return std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>()); }
// Whether the current device runs the BF16/E4M3 mma.sync kernels (sm_80 and newer).
inline bool mma_sync_available() { return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8; }
// Whether launch_pdl uses PDL: not DSV4_CUDA_PDL=0, and a current device of sm_90 or newer.
inline bool pdl_enabled() {
  static const bool on = env_flag_default_on("DSV4_CUDA_PDL");
  return on && device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9;
}
template <class... P, class... A>
void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA launch error %s (launch_pdl)\n", cudaGetErrorString(e));
    std::abort();
  }
}

inline int blocks_for(int64_t n, int threads = 256) {
  const int64_t b = (n + threads - 1) / threads;
  return int(b < 1 ? 1 : (b > 1048576 ? 1048576 : b));
}

// Row-wise elementwise launches over [T, D] with V adjacent channels a thread: V = 4 (float4)
// where D % 4 == 0 and every row pointer is 16-byte aligned, else 1 (ChannelVec<V>); blocks of
// 256 threads over a row's channels (blockIdx.x) and the rows (blockIdx.y, a row loop beyond
// 65,535). A thread per element instead divides its index into row and channel: 64-bit divisions
// that cost more than the element's bytes (hc_post, the MoE combine; docs/PERF.md).
struct ChannelLaunch {
  bool by4;
  dim3 grid;
};
inline ChannelLaunch channel_launch(int64_t T, int64_t D, std::initializer_list<const void*> rows) {
  uintptr_t bits = 0;
  for (const void* p : rows) bits |= reinterpret_cast<uintptr_t>(p);
  const bool by4 = D % 4 == 0 && (bits & 15) == 0;
  const int64_t per_row = by4 ? D / 4 : D;
  return {by4, dim3(unsigned((per_row + 255) / 256), unsigned(std::min<int64_t>(T, 65535)))};
}
template <int V>
using ChannelVec = std::conditional_t<V == 4, float4, float>;

__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
// Two E4M3 codes (the low 16 bits, the first in the low byte) as FP32, through the hardware F16
// path (exact: E4M3 values are F16 values).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(pair & 0xffffu), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// A 16-byte chunk of weight elements (16 FP8, 32 FP4, 8 BF16 or 4 F32), unscaled (exact: E4M3 and E2M1 values are F16 values).
template <int FMT>
__device__ __forceinline__ void decode_chunk(const uint4& q, float* v) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  auto fp8x2 = [](uint32_t pair, float* out) {
    const float2 f = e4m3x2_to_float2(pair);
    out[0] = f.x;
    out[1] = f.y;
  };
  if constexpr (FMT == kFP8) {
#pragma unroll
    for (int i = 0; i < 8; ++i) fp8x2(words[i / 2] >> (16 * (i % 2)), v + 2 * i);
  } else if constexpr (FMT == kFP4) {  // E2M1 -> E4M3 by byte permutation, then the hardware F16 path
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t e4 = e2m1x4_to_e4m3x4(words[i / 2] >> (16 * (i % 2)));
      fp8x2(e4, v + 4 * i);
      fp8x2(e4 >> 16, v + 4 * i + 2);
    }
  } else if constexpr (FMT == kBF16) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = bf16_bits_to_float(uint16_t(words[i / 2] >> (16 * (i % 2))));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(words[i]);
  }
}

__device__ __forceinline__ float vec_at(Vec v, int64_t i) {
  return v.bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(v.p)[i]) : static_cast<const float*>(v.p)[i];
}

// Biased exponent of 2^ceil(log2(amax / 448)): the power-of-two FP8 scale of the official kernels
// (twin of fp8_pow2_scale_code in tensor/quant.h).
__device__ __forceinline__ uint8_t pow2_scale_code(float amax) {
  const uint32_t bits = __float_as_uint(amax * (1.f / 448.f));
  return uint8_t(((bits >> 23) & 0xff) + ((bits & 0x7fffff) ? 1 : 0));
}
// The FP8 activation quantiser of one 1x128 block (act_quant; docs/MODEL.md §2.9): its scale from
// the block's amax (power of two or amax / 448), each value as E4M3 and back.
__device__ __forceinline__ float fp8_block_scale(float amax, bool pow2) {
  amax = fmaxf(amax, kFp8AmaxFloor);
  return pow2 ? __uint_as_float(uint32_t(pow2_scale_code(amax)) << 23) : amax * (1.f / 448.f);
}
__device__ __forceinline__ uint8_t fp8_quantise(float v, float scale) {
  return __nv_cvt_float_to_fp8(fminf(fmaxf(v / scale, -448.f), 448.f), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ float fp8_roundtrip(float v, float scale) { return e4m3_to_float(fp8_quantise(v, scale)) * scale; }

template <bool F32>
__device__ __forceinline__ float scale_at(const uint8_t* s, int64_t i) {
  if constexpr (F32) return reinterpret_cast<const float*>(s)[i];
  else return e8m0_to_float(s[i]);
}

// One weight element W[r, c].
template <int FMT, bool SF32>
__device__ __forceinline__ float wload1(const WeightDesc& w, int64_t r, int64_t c) {
  if constexpr (FMT == kFP8) {
    const int64_t sc = (w.in + 127) / 128;
    return e4m3_to_float(w.w[r * w.in + c]) * scale_at<SF32>(w.s, (r / 128) * sc + c / 128);
  } else if constexpr (FMT == kFP4) {
    const int64_t i = r * w.in + c;
    const uint8_t b = w.w[i >> 1];
    return e2m1_to_float((i & 1) ? (b >> 4) : (b & 0xf)) * scale_at<SF32>(w.s, r * (w.in / 32) + c / 32);
  } else if constexpr (FMT == kBF16) {
    return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(w.w)[r * w.in + c]);
  } else {
    return reinterpret_cast<const float*>(w.w)[r * w.in + c];
  }
}

// Sixteen consecutive elements W[r, c0 .. c0+16), c0 % 16 == 0, in % 16 == 0 (vector loads).
template <int FMT, bool SF32>
__device__ __forceinline__ void wload16(const WeightDesc& w, int64_t r, int64_t c0, float* v) {
  if constexpr (FMT == kFP8) {
    const int64_t sc = (w.in + 127) / 128;
    const float s = scale_at<SF32>(w.s, (r / 128) * sc + c0 / 128);
    decode_chunk<kFP8>(*reinterpret_cast<const uint4*>(w.w + r * w.in + c0), v);
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] *= s;
  } else if constexpr (FMT == kFP4) {
    const float s = scale_at<SF32>(w.s, r * (w.in / 32) + c0 / 32);
    const uint2 q = *reinterpret_cast<const uint2*>(w.w + (r * w.in + c0) / 2);
    const uint32_t words[2] = {q.x, q.y};
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = e2m1_to_float(uint8_t(words[i / 8] >> (4 * (i % 8))) & 0xf) * s;
  } else if constexpr (FMT == kBF16) {
    const uint4* p = reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(w.w) + r * w.in + c0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 q = p[h];
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) v[h * 8 + i] = bf16_bits_to_float(uint16_t(words[i / 2] >> (16 * (i % 2))));
    }
  } else {
    const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(w.w) + r * w.in + c0);
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const float4 q = p[h];
      v[4 * h] = q.x;
      v[4 * h + 1] = q.y;
      v[4 * h + 2] = q.z;
      v[4 * h + 3] = q.w;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The clamped SwiGLU of one element: silu(min(g, L)) * clamp(u, -L, L), no clamp when L <= 0
// (the MoE's SwiGLU kernel and the fused w1/w3 GEMV).
__device__ __forceinline__ float swiglu_value(float g, float u, float limit) {
  if (limit > 0) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
  }
  return g / (1.f + expf(-g)) * u;
}

// 16 bytes global -> shared without registers (L2 only); !valid fills zeros. Grouped by commit,
// awaited by wait<N> (at most N groups still in flight).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid = true) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");  // no shared read moves above it
}

// dst[0, n) = src[0, n) (global -> shared) by the whole block, kBatch independent loads per
// thread in flight before their stores (a plain strided loop waits for each load in turn: ~16
// round trips for 16 KB of queries per attention block). 16-byte vectors when both are aligned.
__device__ __forceinline__ void block_copy_to_smem(float* dst, const float* src, int64_t n) {
  constexpr int kBatch = 4;
  const int64_t step = blockDim.x;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0 && n % 4 == 0) {
    const int64_t n4 = n / 4;
    for (int64_t i0 = threadIdx.x; i0 < n4; i0 += step * kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (i0 + u * step < n4) v[u] = reinterpret_cast<const float4*>(src)[i0 + u * step];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (i0 + u * step < n4) reinterpret_cast<float4*>(dst)[i0 + u * step] = v[u];
    }
  } else {
    for (int64_t i0 = threadIdx.x; i0 < n; i0 += step * kBatch) {
      float v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (i0 + u * step < n) v[u] = src[i0 + u * step];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (i0 + u * step < n) dst[i0 + u * step] = v[u];
    }
  }
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red /* >= 33 floats */) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  return red[32];
}
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? red[lane] : -INFINITY;
    t = warp_max(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  return red[32];
}

// Calls f.template operator()<FMT, SF32>() for a runtime format.
template <class F>
void dispatch_format(const WeightDesc& w, F&& f) {
  const bool sf = w.scale_f32 != 0;
  switch (w.fmt) {
    case kFP8: sf ? f.template operator()<kFP8, true>() : f.template operator()<kFP8, false>(); break;
    case kFP4: sf ? f.template operator()<kFP4, true>() : f.template operator()<kFP4, false>(); break;
    case kBF16: f.template operator()<kBF16, false>(); break;
    default: f.template operator()<kF32, false>(); break;
  }
}

}  // namespace dsv4::cuda
