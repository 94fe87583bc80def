// Every code point of every narrow format, checked against brute-force references that share
// no code with the encoders: nearest representable value, ties to the even code.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "tensor/numeric.h"
#include "util/random.h"

using namespace dsv4;

namespace {

// Independent decoders written from the format definitions.
double ref_e4m3(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  double mag = e == 0 ? m * std::pow(2.0, -9) : (1 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}
double ref_e2m1(uint8_t v) {
  int s = (v >> 3) & 1, e = (v >> 1) & 3, m = v & 1;
  double mag = e == 0 ? m * 0.5 : (1 + m / 2.0) * std::pow(2.0, e - 1);
  return s ? -mag : mag;
}

// Brute force: nearest finite code by value; ties to the code with even mantissa LSB;
// saturating at the largest finite magnitude. `codes` lists the finite non-negative codes.
template <class Decode>
uint32_t brute_nearest(double x, const std::vector<uint32_t>& codes, Decode dec) {
  double ax = std::fabs(x);
  uint32_t best = codes[0];
  double bd = std::fabs(dec(best) - ax);
  for (uint32_t c : codes) {
    double d = std::fabs(dec(c) - ax);
    if (d < bd || (d == bd && (c & 1) == 0 && (best & 1) == 1)) best = c, bd = d;
  }
  return best;
}

}  // namespace

TEST(Numeric, E4M3DecodesEveryCode) {
  for (int v = 0; v < 256; ++v) {
    float f = e4m3_to_f32(uint8_t(v));
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(f)) << v;
      continue;
    }
    EXPECT_EQ(double(f), ref_e4m3(uint8_t(v))) << v;
    EXPECT_EQ(f32_to_e4m3(f), uint8_t(v)) << "round trip of code " << v;
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.f);
}

TEST(Numeric, E4M3RoundsToNearestEvenAndSaturates) {
  std::vector<uint32_t> codes;
  for (uint32_t c = 0; c < 0x7f; ++c) codes.push_back(c);
  auto dec = [](uint32_t c) { return ref_e4m3(uint8_t(c)); };
  // Every midpoint between neighbouring codes (the ties), plus points either side of them.
  for (uint32_t c = 0; c + 1 < 0x7f; ++c) {
    const float mid = float((dec(c) + dec(c + 1)) / 2);  // exact in float
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      uint8_t want = uint8_t(brute_nearest(x, codes, dec));
      EXPECT_EQ(f32_to_e4m3(x), want) << x;
      EXPECT_EQ(f32_to_e4m3(-x), want | 0x80) << -x;
    }
  }
  Rng rng(7);
  for (int i = 0; i < 20000; ++i) {
    float x = float(std::ldexp(rng.uniform(), int(rng.below(24)) - 14));
    EXPECT_EQ(f32_to_e4m3(x), brute_nearest(x, codes, dec)) << x;
  }
  EXPECT_EQ(f32_to_e4m3(1e9f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-1e9f), 0xfe);
  EXPECT_EQ(f32_to_e4m3(INFINITY), 0x7e);
  EXPECT_EQ(f32_to_e4m3(464.f), 0x7e);  // above max: saturates, never NaN
  EXPECT_TRUE(std::isnan(e4m3_to_f32(f32_to_e4m3(NAN))));
}

TEST(Numeric, E2M1EveryCodeAndTies) {
  for (int v = 0; v < 16; ++v) {
    EXPECT_EQ(double(e2m1_to_f32(uint8_t(v))), ref_e2m1(uint8_t(v))) << v;
    if (v != 8) {  // -0 encodes as 8 too
      EXPECT_EQ(f32_to_e2m1(e2m1_to_f32(uint8_t(v))), v) << v;
    }
  }
  EXPECT_EQ(f32_to_e2m1(-0.f), 8);
  std::vector<uint32_t> codes = {0, 1, 2, 3, 4, 5, 6, 7};
  auto dec = [](uint32_t c) { return ref_e2m1(uint8_t(c)); };
  for (uint32_t c = 0; c + 1 < 8; ++c) {
    const float mid = float((dec(c) + dec(c + 1)) / 2);  // exact in float
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e9f)}) {
      EXPECT_EQ(f32_to_e2m1(x), brute_nearest(x, codes, dec)) << x;
      EXPECT_EQ(f32_to_e2m1(-x), brute_nearest(x, codes, dec) | 8) << -x;
    }
  }
  EXPECT_EQ(f32_to_e2m1(0.25f), 0);  // tie -> even (0)
  EXPECT_EQ(f32_to_e2m1(0.75f), 2);  // tie -> 1.0
  EXPECT_EQ(f32_to_e2m1(5.f), 6);    // tie -> 4.0
  EXPECT_EQ(f32_to_e2m1(100.f), 7);  // saturates at 6
}

TEST(Numeric, E8M0EveryCode) {
  for (int e = 0; e < 255; ++e) {
    float f = e8m0_to_f32(uint8_t(e));
    EXPECT_EQ(double(f), std::ldexp(1.0, e - 127)) << e;
    EXPECT_EQ(f32_to_e8m0(f), e) << e;
    EXPECT_EQ(f32_to_e8m0_ceil(f), e) << e;
  }
  EXPECT_TRUE(std::isnan(e8m0_to_f32(0xff)));
  EXPECT_EQ(f32_to_e8m0(NAN), 0xff);
  // Between 2^k and 2^(k+1) the midpoint is 1.5 * 2^k: below goes down, above goes up,
  // exactly on it goes to the even code.
  for (int k = -100; k < 100; ++k) {
    float lo = std::ldexp(1.f, k), mid = 1.5f * lo;
    uint8_t code_lo = uint8_t(k + 127);
    EXPECT_EQ(f32_to_e8m0(std::nextafter(mid, 0.f)), code_lo);
    EXPECT_EQ(f32_to_e8m0(std::nextafter(mid, 1e30f)), code_lo + 1);
    EXPECT_EQ(f32_to_e8m0(mid), (code_lo % 2 == 0) ? code_lo : code_lo + 1);
    EXPECT_EQ(f32_to_e8m0_ceil(std::nextafter(lo, 1e30f)), code_lo + 1);
    EXPECT_EQ(f32_to_e8m0_ceil(std::nextafter(2 * lo, 0.f)), code_lo + 1);
  }
  EXPECT_EQ(f32_to_e8m0(1e-45f), 0);      // saturates low
  EXPECT_EQ(f32_to_e8m0(3e38f), 254);     // saturates high
}

TEST(Numeric, BF16EveryCodeAndRounding) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = bf16_to_f32(uint16_t(h));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), h << 16);
    if (!std::isnan(f)) EXPECT_EQ(f32_to_bf16(f), h) << h;
    else EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
  }
  Rng rng(3);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = uint32_t(rng.next_u64());
    float f = std::bit_cast<float>(u);
    if (std::isnan(f) || std::isinf(f)) continue;
    // Reference: choose the nearer of the two bf16 neighbours by exact double arithmetic.
    uint32_t lo = u & 0xffff0000u;
    double dlo = std::bit_cast<float>(lo), dhi;
    uint32_t hi = lo + 0x10000u;
    float fhi = std::bit_cast<float>(hi);
    dhi = fhi;
    double ax = f;
    uint16_t want;
    double a = std::fabs(ax - dlo), b = std::fabs(dhi - ax);
    if (std::isinf(fhi)) b = std::fabs(std::copysign(std::ldexp(1.0, 128), ax) - ax);  // overflow boundary acts as 2^128
    if (a < b) want = uint16_t(lo >> 16);
    else if (b < a) want = uint16_t(hi >> 16);
    else want = ((lo >> 16) & 1) ? uint16_t(hi >> 16) : uint16_t(lo >> 16);
    ASSERT_EQ(f32_to_bf16(f), want) << u;
  }
}

TEST(Numeric, F16EveryCodeAndRounding) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(uint16_t(h));
    int e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) {
      EXPECT_EQ(std::isnan(f), m != 0);
      continue;
    }
    double ref = (e == 0 ? m * std::pow(2.0, -24) : (1 + m / 1024.0) * std::pow(2.0, e - 15)) * ((h & 0x8000) ? -1 : 1);
    EXPECT_EQ(double(f), ref) << h;
    EXPECT_EQ(f32_to_f16(f), h) << h;
  }
  // Midpoints between consecutive finite halves round to the even code.
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    double mid = (double(f16_to_f32(uint16_t(h))) + double(f16_to_f32(uint16_t(h + 1)))) / 2;
    uint16_t even = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
    ASSERT_EQ(f32_to_f16(float(mid)), even) << h;
  }
  EXPECT_EQ(f32_to_f16(65519.f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.f), 0x7c00);  // rounds to inf (IEEE)
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
}
