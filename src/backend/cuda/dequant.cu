#include "backend/cuda/dequant.cuh"
#include "backend/cuda/dequant.h"

namespace dsv4::cuda {

namespace {

__global__ void dequant_fp8_kernel(const uint8_t* __restrict__ w, const uint8_t* __restrict__ scales, int64_t rows,
                                   int64_t cols, float* __restrict__ out) {
  const int64_t scale_cols = (cols + 127) / 128;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = e4m3_to_float(w[i]) * e8m0_to_float(scales[(r / 128) * scale_cols + c / 128]);
  }
}

__global__ void dequant_fp4_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ scales,
                                   int64_t rows, int64_t cols, float* __restrict__ out) {
  const int64_t half = rows * cols / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < half; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = (2 * i) / cols, c = (2 * i) % cols;
    const float s = e8m0_to_float(scales[r * (cols / 32) + c / 32]);
    const uint8_t b = packed[i];
    out[2 * i] = e2m1_to_float(b & 0xf) * s;
    out[2 * i + 1] = e2m1_to_float(b >> 4) * s;
  }
}

int grid_for(int64_t n) { return int((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535); }

}  // namespace

void dequant_fp8_blocks(const uint8_t* w, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream) {
  if (rows * cols == 0) return;
  dequant_fp8_kernel<<<grid_for(rows * cols), 256, 0, stream>>>(w, scales, rows, cols, out);
}

void dequant_fp4_groups(const uint8_t* packed, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream) {
  if (rows * cols == 0) return;
  dequant_fp4_kernel<<<grid_for(rows * cols / 2), 256, 0, stream>>>(packed, scales, rows, cols, out);
}

}  // namespace dsv4::cuda
