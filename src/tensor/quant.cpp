#include "tensor/quant.h"

#include <algorithm>
#include <cmath>
#include <array>
#include <bit>
#include <cstring>

#include "tensor/numeric.h"
#include "util/error.h"

namespace dsv4 {

float load_scale(DType scale_dtype, const void* scales, int64_t idx) {
  switch (scale_dtype) {
    case DType::F8_E8M0: return e8m0_to_f32(static_cast<const uint8_t*>(scales)[idx]);
    case DType::F32: return static_cast<const float*>(scales)[idx];
    default: fail("unsupported scale dtype {}", dtype_name(scale_dtype));
  }
}

void dequant_fp8_rows(const uint8_t* w, DType sd, const void* scales, int64_t /*rows*/, int64_t cols, int64_t r0,
                      int64_t r1, float* out) {
  static const auto lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_to_f32(uint8_t(i));
    return t;
  }();
  const int64_t sc = ceil_div(cols, kFp8Block);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = w + r * cols;
    float* dst = out + (r - r0) * cols;
    for (int64_t cb = 0; cb < sc; ++cb) {
      float s = load_scale(sd, scales, (r / kFp8Block) * sc + cb);
      int64_t c1 = std::min(cols, (cb + 1) * kFp8Block);
      for (int64_t c = cb * kFp8Block; c < c1; ++c) dst[c] = lut[src[c]] * s;
    }
  }
}

void dequant_fp8_blocks(const uint8_t* w, DType sd, const void* scales, int64_t rows, int64_t cols, float* out) {
  dequant_fp8_rows(w, sd, scales, rows, cols, 0, rows, out);
}

void dequant_fp4_rows(const uint8_t* packed, DType sd, const void* scales, int64_t cols, int64_t r0, int64_t r1,
                      float* out) {
  DSV4_CHECK(cols % kFp4Group == 0);
  const int64_t groups = cols / kFp4Group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = packed + r * (cols / 2);
    float* dst = out + (r - r0) * cols;
    for (int64_t g = 0; g < groups; ++g) {
      float s = load_scale(sd, scales, r * groups + g);
      for (int64_t i = 0; i < kFp4Group / 2; ++i) {
        uint8_t b = src[g * kFp4Group / 2 + i];
        dst[g * kFp4Group + 2 * i] = e2m1_to_f32(b & 0xf) * s;
        dst[g * kFp4Group + 2 * i + 1] = e2m1_to_f32(b >> 4) * s;
      }
    }
  }
}

void dequant_fp4_groups(const uint8_t* packed, DType sd, const void* scales, int64_t rows, int64_t cols, float* out) {
  dequant_fp4_rows(packed, sd, scales, cols, 0, rows, out);
}

uint8_t fp8_pow2_scale_code(float amax) {
  const uint32_t b = std::bit_cast<uint32_t>(amax * (1.f / kE4M3Max));
  return uint8_t(((b >> 23) & 0xff) + ((b & 0x7fffff) ? 1 : 0));
}

float fp8_dynamic_scale(float amax, bool pow2) {
  amax = std::max(amax, kFp8AmaxFloor);
  return pow2 ? e8m0_to_f32(fp8_pow2_scale_code(amax)) : amax * (1.f / kE4M3Max);
}

float fp8_dynamic_quant_block(const float* x, int64_t n, bool pow2, uint8_t* q, float* roundtrip) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = fp8_dynamic_scale(amax, pow2);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t e = f32_to_e4m3(std::clamp(x[i] / scale, -kE4M3Max, kE4M3Max));
    if (q) q[i] = e;
    if (roundtrip) roundtrip[i] = e4m3_to_f32(e) * scale;
  }
  return scale;
}

void fp8_dynamic_quant(const float* x, int64_t n, int64_t block, bool pow2, uint8_t* q, float* scales,
                       float* roundtrip) {
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += block, ++bi) {
    const int64_t len = std::min(n - b0, block);
    const float scale = fp8_dynamic_quant_block(x + b0, len, pow2, q ? q + b0 : nullptr, roundtrip ? roundtrip + b0 : nullptr);
    if (scales) scales[bi] = scale;
  }
}

void quant_fp8_blocks(const float* x, int64_t rows, int64_t cols, uint8_t* w, uint8_t* scales) {
  const int64_t sr = ceil_div(rows, kFp8Block), sc = ceil_div(cols, kFp8Block);
  for (int64_t br = 0; br < sr; ++br)
    for (int64_t bc = 0; bc < sc; ++bc) {
      int64_t r1 = std::min(rows, (br + 1) * kFp8Block), c1 = std::min(cols, (bc + 1) * kFp8Block);
      float amax = 0;
      for (int64_t r = br * kFp8Block; r < r1; ++r)
        for (int64_t c = bc * kFp8Block; c < c1; ++c) amax = std::max(amax, std::fabs(x[r * cols + c]));
      uint8_t e = f32_to_e8m0_ceil(amax > 0 ? amax / kE4M3Max : 1.f);
      float inv = 1.f / e8m0_to_f32(e);
      scales[br * sc + bc] = e;
      for (int64_t r = br * kFp8Block; r < r1; ++r)
        for (int64_t c = bc * kFp8Block; c < c1; ++c) w[r * cols + c] = f32_to_e4m3(x[r * cols + c] * inv);
    }
}

void quant_fp4_groups(const float* x, int64_t rows, int64_t cols, uint8_t* packed, uint8_t* scales) {
  DSV4_CHECK(cols % kFp4Group == 0);
  const int64_t groups = cols / kFp4Group;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = x + r * cols + g * kFp4Group;
      float amax = 0;
      for (int i = 0; i < kFp4Group; ++i) amax = std::max(amax, std::fabs(src[i]));
      uint8_t e = f32_to_e8m0_ceil(amax > 0 ? amax / kE2M1Max : 1.f);
      float inv = 1.f / e8m0_to_f32(e);
      scales[r * groups + g] = e;
      uint8_t* dst = packed + r * (cols / 2) + g * kFp4Group / 2;
      for (int i = 0; i < kFp4Group / 2; ++i)
        dst[i] = uint8_t(f32_to_e2m1(src[2 * i] * inv) | (f32_to_e2m1(src[2 * i + 1] * inv) << 4));
    }
}

}  // namespace dsv4
