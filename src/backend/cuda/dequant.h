#pragma once
// Whole-tensor dequantisation on the device (weight upload paths and op tests).
#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

// FP8 e4m3 [rows, cols] with ue8m0 scales [ceil(rows/128), ceil(cols/128)] -> f32 [rows, cols].
void dequant_fp8_blocks(const uint8_t* w, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream);
// Packed FP4 e2m1 [rows, cols/2] (low nibble first) with ue8m0 scales [rows, cols/32] -> f32.
void dequant_fp4_groups(const uint8_t* packed, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream);

}  // namespace dsv4::cuda
