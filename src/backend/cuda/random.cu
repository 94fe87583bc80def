// Random weights generated on the device (benchmark models without a checkpoint): a counter
// hash per element, so any tensor size fills at memory speed and the result is reproducible.
#include <cuda_fp8.h>

#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float unit(uint64_t seed, int64_t i) {  // [-1, 1)
  return float(mix64(seed * 0x9e3779b97f4a7c15ull + uint64_t(i)) >> 40) * (2.f / 16777216.f) - 1.f;
}

__global__ void f32_kernel(float* x, int64_t n, int kind, float a, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = kind == 0 ? a * unit(seed, i) : a;
}
__global__ void bf16_kernel(uint16_t* x, int64_t n, int kind, float a, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = kind == 0 ? a * unit(seed, i) : a;
    x[i] = uint16_t(__float_as_uint(v) >> 16);
  }
}
__global__ void bytes_kernel(uint8_t* x, int64_t n, int fmt, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (fmt == 0) {
      x[i] = __nv_cvt_float_to_fp8(2.f * unit(seed, i), __NV_SATFINITE, __NV_E4M3);
    } else {
      const uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ull + uint64_t(i));
      x[i] = uint8_t(h & 0x77);  // two e2m1 codes of magnitude <= 6 (sign bits clear: 0x77; add signs)
      x[i] |= uint8_t((h >> 8) & 0x88);
    }
  }
}
__global__ void u8_kernel(uint8_t* x, int64_t n, uint8_t v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}
__global__ void ids_kernel(void* x, int64_t n, bool i64, int64_t below, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = int64_t(mix64(seed * 0x9e3779b97f4a7c15ull + uint64_t(i)) % uint64_t(below));
    if (i64) static_cast<int64_t*>(x)[i] = v;
    else static_cast<int32_t*>(x)[i] = int32_t(v);
  }
}

}  // namespace

void random_fill_f32(float* x, int64_t n, int kind, float a, uint64_t seed, cudaStream_t s) {
  if (n > 0) f32_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, kind, a, seed);
  DSV4_LAUNCH_CHECK();
}
void random_fill_bf16(uint16_t* x, int64_t n, int kind, float a, uint64_t seed, cudaStream_t s) {
  if (n > 0) bf16_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, kind, a, seed);
  DSV4_LAUNCH_CHECK();
}
void random_fill_bytes(uint8_t* x, int64_t n, int fmt, uint64_t seed, cudaStream_t s) {
  if (n > 0) bytes_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, fmt, seed);
  DSV4_LAUNCH_CHECK();
}
void fill_u8(uint8_t* x, int64_t n, uint8_t v, cudaStream_t s) {
  if (n > 0) u8_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, v);
  DSV4_LAUNCH_CHECK();
}
void random_ids(void* x, int64_t n, bool i64, int64_t below, uint64_t seed, cudaStream_t s) {
  if (n > 0) ids_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, i64, below, seed);
  DSV4_LAUNCH_CHECK();
}

namespace {
__global__ void spin_kernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}
}  // namespace

void spin(int64_t cycles, cudaStream_t s) {
  spin_kernel<<<1, 32, 0, s>>>(cycles);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
