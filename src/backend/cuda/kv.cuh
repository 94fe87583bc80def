#pragma once
// Device codecs of the production KV row (layout: tensor/kv_format.h), shared by the KV kernels
// (kv.cu: pack, unpack, quantize_kv, store_rows) and the attention kernel (attention.cu, which
// decodes packed rows on the fly). Each codec is the twin of the CPU reference in
// tensor/kv_format.cpp (same scale from the bit pattern, same RNE casts, BF16 NaN handling of
// f32_to_bf16).
#include <cuda_fp8.h>

#include "backend/cuda/common.cuh"
#include "tensor/kv_format.h"
#include "tensor/quant.h"

namespace dsv4::cuda {

__device__ __forceinline__ uint8_t kv_e4m3(float v, float scale) {
  const float q = fminf(fmaxf(v / scale, -448.f), 448.f);
  return uint8_t(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3));
}

// f32 -> bf16 bits, RNE, quiet NaN with the sign kept (twin of f32_to_bf16).
__device__ __forceinline__ uint16_t kv_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// The scale code of the 64-value block [b, e) of row v (whole warp; every lane gets it).
__device__ __forceinline__ uint8_t kv_block_code(const float* v, int64_t b, int64_t e, int lane) {
  float amax = kFp8AmaxFloor;
  for (int64_t i = b + lane; i < e; i += 32) amax = fmaxf(amax, fabsf(v[i]));
  return pow2_scale_code(warp_max(amax));
}

// Value c of the packed row `row` (c < L.dim).
__device__ __forceinline__ float kv_decode(const uint8_t* row, const KvRowLayout& L, int64_t c) {
  if (c < L.nope) return e4m3_to_float(row[c]) * e8m0_to_float(row[L.scale_offset + c / kKvScaleBlock]);
  const int64_t j = L.rope_offset + 2 * (c - L.nope);
  return bf16_bits_to_float(uint16_t(row[j] | (uint16_t(row[j + 1]) << 8)));
}

// Encodes the F32 row v into the packed row `row` (whole block, blockDim.x a multiple of 32):
// warp w handles the 64-value blocks w, w + nw, ...; padding written as zeros.
__device__ __forceinline__ void kv_encode_row(const float* v, const KvRowLayout& L, uint8_t* row) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t b = int64_t(warp) * kKvScaleBlock; b < L.nope; b += int64_t(nw) * kKvScaleBlock) {
    const int64_t e = b + kKvScaleBlock < L.nope ? b + kKvScaleBlock : L.nope;
    const uint8_t code = kv_block_code(v, b, e, lane);
    const float scale = e8m0_to_float(code);
    for (int64_t i = b + lane; i < e; i += 32) row[i] = kv_e4m3(v[i], scale);
    if (lane == 0) row[L.scale_offset + b / kKvScaleBlock] = code;
  }
  for (int64_t i = threadIdx.x; i < L.rope; i += blockDim.x) {
    const uint16_t h = kv_bf16(v[L.nope + i]);
    row[L.rope_offset + 2 * i] = uint8_t(h & 0xff);
    row[L.rope_offset + 2 * i + 1] = uint8_t(h >> 8);
  }
  for (int64_t i = L.scale_offset + L.scales + threadIdx.x; i < L.bytes; i += blockDim.x) row[i] = 0;
}

}  // namespace dsv4::cuda
