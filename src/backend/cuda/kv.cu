// Production KV rows (layout: tensor/kv_format.h): pack F32 rows into the packed format, gather
// and decode packed rows, and the in-place round trip (quantize_kv). One set of device codecs
// below serves all three, so quantize_kv(x) == unpack(pack(x)) bit for bit on the GPU, and each
// codec is the twin of the CPU reference in tensor/kv_format.cpp (same scale from the bit
// pattern, same RNE casts, BF16 NaN handling of f32_to_bf16).
#include <cuda_fp8.h>

#include "backend/cuda/common.cuh"
#include "tensor/kv_format.h"
#include "tensor/quant.h"

namespace dsv4::cuda {

namespace {


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

// The scale code of the 64-value block starting at b of row v (whole warp; every lane gets it).
__device__ __forceinline__ uint8_t kv_block_code(const float* v, int64_t b, int64_t e, int lane) {
  float amax = kFp8AmaxFloor;
  for (int64_t i = b + lane; i < e; i += 32) amax = fmaxf(amax, fabsf(v[i]));
  return pow2_scale_code(warp_max(amax));
}

// One block of 256 threads per row; warp w handles the 64-value blocks w, w + 8, ...
__global__ void pack_kv_kernel(const float* x, KvRowLayout L, uint8_t* packed) {
  const float* v = x + int64_t(blockIdx.x) * L.dim;
  uint8_t* row = packed + int64_t(blockIdx.x) * L.bytes;
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

// One block per output row: out[i] = decode(packed[rows ? rows[i] : i]); NaN for rows outside [0, N).
__global__ void unpack_kv_kernel(const uint8_t* packed, int64_t N, const int32_t* rows, KvRowLayout L, float* out) {
  const int64_t i = blockIdx.x, r = rows ? int64_t(rows[i]) : i;
  float* o = out + i * L.dim;
  if (r < 0 || r >= N) {
    for (int64_t c = threadIdx.x; c < L.dim; c += blockDim.x) o[c] = __int_as_float(0x7fc00000);
    return;
  }
  const uint8_t* row = packed + r * L.bytes;
  for (int64_t c = threadIdx.x; c < L.dim; c += blockDim.x) {
    if (c < L.nope) {
      o[c] = e4m3_to_float(row[c]) * e8m0_to_float(row[L.scale_offset + c / kKvScaleBlock]);
    } else {
      const int64_t j = L.rope_offset + 2 * (c - L.nope);
      o[c] = bf16_bits_to_float(uint16_t(row[j] | (uint16_t(row[j + 1]) << 8)));
    }
  }
}

// In place: each value becomes decode(encode(value)), with the same codecs as above.
__global__ void quantize_kv_kernel(float* x, KvRowLayout L) {
  float* v = x + int64_t(blockIdx.x) * L.dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t b = int64_t(warp) * kKvScaleBlock; b < L.nope; b += int64_t(nw) * kKvScaleBlock) {
    const int64_t e = b + kKvScaleBlock < L.nope ? b + kKvScaleBlock : L.nope;
    const float scale = e8m0_to_float(kv_block_code(v, b, e, lane));
    for (int64_t i = b + lane; i < e; i += 32) v[i] = e4m3_to_float(kv_e4m3(v[i], scale)) * scale;
  }
  for (int64_t i = L.nope + threadIdx.x; i < L.dim; i += blockDim.x) v[i] = bf16_bits_to_float(kv_bf16(v[i]));
}

}  // namespace

void quantize_kv(float* x, int64_t rows, int64_t d, int64_t nope, cudaStream_t s) {
  if (rows <= 0) return;
  quantize_kv_kernel<<<unsigned(rows), 256, 0, s>>>(x, kv_row_layout(d, nope));
  DSV4_LAUNCH_CHECK();
}

void pack_kv(const float* x, int64_t rows, int64_t d, int64_t nope, uint8_t* packed, cudaStream_t s) {
  if (rows <= 0) return;
  pack_kv_kernel<<<unsigned(rows), 256, 0, s>>>(x, kv_row_layout(d, nope), packed);
  DSV4_LAUNCH_CHECK();
}

void unpack_kv(const uint8_t* packed, int64_t N, const int32_t* rows, int64_t n, int64_t d, int64_t nope, float* out,
               cudaStream_t s) {
  if (n <= 0 || d <= 0) return;
  unpack_kv_kernel<<<unsigned(n), 128, 0, s>>>(packed, N, rows, kv_row_layout(d, nope), out);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
