#pragma once
// Exact scalar conversions between float32 and the narrow formats of the checkpoint.
// Encoding rounds to nearest, ties to even; formats without inf saturate.
// Decoding is exact (every narrow value is representable in float32).
#include <bit>
#include <cstdint>
#include <cmath>

namespace dsv4 {

// ---- BF16 ----
inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN, keep sign
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// ---- F16 (IEEE half) ----
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// ---- F8 E4M3 (fn: bias 7, no inf, 0x7f/0xff = NaN, max 448) ----
float e4m3_to_f32(uint8_t v);
uint8_t f32_to_e4m3(float f);  // saturates to +-448; NaN -> 0x7f (sign kept)

// ---- E8M0 (unsigned power of two: 2^(e-127); 0xff = NaN) ----
inline float e8m0_to_f32(uint8_t e) {
  if (e == 0xff) return std::nanf("");
  if (e == 0) return std::bit_cast<float>(0x00400000u);  // 2^-127 is subnormal in f32
  return std::bit_cast<float>(uint32_t(e) << 23);
}
// Nearest power of two (ties, i.e. exactly 1.5*2^k, to the even exponent code);
// saturates to [2^-127, 2^127]; NaN, negative and zero inputs are not scales: NaN -> 0xff, <=0 -> 0.
uint8_t f32_to_e8m0(float f);
// Smallest power of two >= f (what block quantisation needs: amax/scale never exceeds the format max).
uint8_t f32_to_e8m0_ceil(float f);

// ---- FP4 E2M1 (values 0, .5, 1, 1.5, 2, 3, 4, 6; sign bit 3; no inf/NaN) ----
inline float e2m1_to_f32(uint8_t nibble) {
  static constexpr float kMag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  float m = kMag[nibble & 7];
  return (nibble & 8) ? -m : m;
}
uint8_t f32_to_e2m1(float f);  // saturates to +-6; NaN -> 0x7 (no NaN code exists)

inline constexpr float kE4M3Max = 448.f;
inline constexpr float kE2M1Max = 6.f;

}  // namespace dsv4
