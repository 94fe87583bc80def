#include "tensor/numeric.h"

namespace dsv4 {

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float mag;
  if (exp == 0) mag = std::ldexp(float(man), -24);
  else if (exp == 31) mag = man ? std::nanf("") : INFINITY;
  else mag = std::ldexp(float(man | 0x400), int(exp) - 25);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | sign);
}

// Generic RNE encoder for small float formats with `man_bits` mantissa bits and exponent
// bias `bias`, whose largest finite magnitude is `max_val`. Returns the magnitude code;
// the caller handles sign, NaN and saturation policy.
static uint32_t encode_small_float(float a, int man_bits, int bias, float max_val, uint32_t max_code) {
  if (!(a < max_val)) return max_code;  // a >= max (caller handled NaN)
  if (a == 0) return 0;
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  int exp_unbiased = e - 1;
  int min_normal_exp = 1 - bias;
  if (exp_unbiased < min_normal_exp) exp_unbiased = min_normal_exp;  // subnormal range
  // quantum of the representable grid at this exponent
  float q = std::ldexp(1.f, exp_unbiased - man_bits);
  float n = a / q;  // exact: division by a power of two
  float r = std::nearbyint(n);  // default rounding mode: ties to even
  uint32_t steps = uint32_t(r);
  // steps counts quanta; rebuild code: for normal numbers steps in [2^m, 2^(m+1)] (the upper
  // end rolls into the next exponent, which is exactly the next code), subnormal below.
  uint32_t code;
  if (exp_unbiased == min_normal_exp && steps < (1u << man_bits)) code = steps;  // subnormal / zero
  else code = (uint32_t(exp_unbiased + bias) << man_bits) + (steps - (1u << man_bits));
  return code > max_code ? max_code : code;
}

uint16_t f32_to_f16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00;
  if (a >= 65520.f) return sign | 0x7c00;  // rounds to inf (65504 is max; half-way is 65520)
  return sign | uint16_t(encode_small_float(a, 10, 15, 65504.f, 0x7bff));
}

float e4m3_to_f32(uint8_t v) {
  uint32_t exp = (v >> 3) & 0xf, man = v & 7;
  float mag;
  if (exp == 0xf && man == 7) mag = std::nanf("");
  else if (exp == 0) mag = std::ldexp(float(man), -9);
  else mag = std::ldexp(float(man | 8), int(exp) - 10);
  return (v & 0x80) ? -mag : mag;
}

uint8_t f32_to_e4m3(float f) {
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return sign | 0x7f;
  return sign | uint8_t(encode_small_float(std::fabs(f), 3, 7, kE4M3Max, 0x7e));
}

uint8_t f32_to_e2m1(float f) {
  uint8_t sign = std::signbit(f) ? 8 : 0;
  if (std::isnan(f)) return 7;
  return sign | uint8_t(encode_small_float(std::fabs(f), 1, 1, kE2M1Max, 7));
}

uint8_t f32_to_e8m0(float f) {
  if (std::isnan(f)) return 0xff;
  if (!(f > 0)) return 0;
  int e;
  float m = std::frexp(f, &e);  // f = m * 2^e, m in [0.5,1) -> f in [2^(e-1), 2^e)
  int k = e - 1;                // lower power; upper is k+1
  float rel = m * 2.f;          // in [1,2)
  if (rel > 1.5f || (rel == 1.5f && ((k + 127) & 1))) ++k;  // tie -> even code
  k += 127;
  return uint8_t(k < 0 ? 0 : (k > 254 ? 254 : k));
}

uint8_t f32_to_e8m0_ceil(float f) {
  if (std::isnan(f)) return 0xff;
  if (!(f > 0)) return 0;
  int e;
  float m = std::frexp(f, &e);
  int k = (m == 0.5f) ? e - 1 : e;
  k += 127;
  return uint8_t(k < 0 ? 0 : (k > 254 ? 254 : k));
}

}  // namespace dsv4
