#pragma once
// Block-scaled formats of the official checkpoint:
//  - FP8 weights: e4m3 [rows, cols] with one ue8m0 (or f32) scale per 128x128 block,
//    scale tensor [ceil(rows/128), ceil(cols/128)].
//  - FP4 experts: e2m1 packed [rows, cols/2] with one ue8m0 scale per 1x32 group,
//    scale tensor [rows, cols/32].
// value = decoded_element * scale.
#include <cstdint>
#include <span>

#include "tensor/dtype.h"

namespace dsv4 {

inline constexpr int kFp8Block = 128;
inline constexpr int kFp4Group = 32;

// Reads one scale stored as F8_E8M0 or F32.
float load_scale(DType scale_dtype, const void* scales, int64_t idx);

void dequant_fp8_blocks(const uint8_t* w, DType scale_dtype, const void* scales, int64_t rows, int64_t cols,
                        float* out);
void dequant_fp4_groups(const uint8_t* packed, DType scale_dtype, const void* scales, int64_t rows, int64_t cols,
                        float* out);
// Dequantises rows [r0, r1) only (the CPU backend works row-block by row-block).
void dequant_fp8_rows(const uint8_t* w, DType scale_dtype, const void* scales, int64_t rows, int64_t cols,
                      int64_t r0, int64_t r1, float* out);
void dequant_fp4_rows(const uint8_t* packed, DType scale_dtype, const void* scales, int64_t cols, int64_t r0,
                      int64_t r1, float* out);

// Quantisers (used by make-tiny and tests): scale = smallest power of two with amax/scale <= fmt max.
void quant_fp8_blocks(const float* x, int64_t rows, int64_t cols, uint8_t* w, uint8_t* scales_e8m0);
void quant_fp4_groups(const float* x, int64_t rows, int64_t cols, uint8_t* packed, uint8_t* scales_e8m0);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dynamic FP8 quantisation of activations, as the official act_quant (docs/MODEL.md §2.9): per block,
// amax = max(|v|, 1e-4), scale = amax / 448, rounded up to a power of two when pow2 (ue8m0 scales),
// q = E4M3_RNE(clamp(v / scale, -448, 448)).
// The packed KV rows (tensor/kv_format.h) use the same quantiser with pow2 on blocks of 64.
inline constexpr int kActBlock = 128;
inline constexpr float kFp8AmaxFloor = 1e-4f;  // smallest amax a dynamic scale is derived from
// The ue8m0 code of 2^ceil(log2(amax / 448)) (amax already floored), taken from the bit pattern as
// the official fast_round_scale does.
uint8_t fp8_pow2_scale_code(float amax);
float fp8_dynamic_scale(float amax, bool pow2);
// One block of n values: q (may be null) and the round trip q * scale (may be null; may alias x);
// returns the scale.
float fp8_dynamic_quant_block(const float* x, int64_t n, bool pow2, uint8_t* q, float* roundtrip);
// Quantises n values in blocks of `block` to q (may be null) and their scales (one per block),
// and writes the round trip q * scale to roundtrip (may be null; may alias x).
void fp8_dynamic_quant(const float* x, int64_t n, int64_t block, bool pow2, uint8_t* q, float* scales,
                       float* roundtrip);

}  // namespace dsv4
