#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tensor/index_qat.h"
#include "tensor/numeric.h"
#include "tensor/quant.h"
#include "util/random.h"

using namespace dsv4;

namespace {
std::vector<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  Rng r(seed);
  std::vector<float> v(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) v[i] = r.normal() * std::ldexp(1.f, int(i / cols % 9) - 4);
  return v;
}
}  // namespace

TEST(Quant, Fp8BlocksRoundTripWithPartialBlocks) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {129, 300}, {256, 128}, {77, 513}}) {
    auto x = random_matrix(rows, cols, rows * 1000 + cols);
    std::vector<uint8_t> w(rows * cols), s(ceil_div(rows, 128) * ceil_div(cols, 128));
    quant_fp8_blocks(x.data(), rows, cols, w.data(), s.data());
    std::vector<float> y(rows * cols, NAN);
    dequant_fp8_blocks(w.data(), DType::F8_E8M0, s.data(), rows, cols, y.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        float scale = e8m0_to_f32(s[(r / 128) * ceil_div(cols, 128) + c / 128]);
        float q = x[r * cols + c] / scale;
        ASSERT_LE(std::fabs(q), 448.f);
        // y must be exactly the e4m3 value nearest to x/scale, times scale.
        ASSERT_EQ(y[r * cols + c], e4m3_to_f32(f32_to_e4m3(q)) * scale) << r << "," << c;
        // relative error of e4m3 is at most 2^-4 for normal values
        if (std::fabs(q) >= std::ldexp(1.f, -6)) {
          ASSERT_LE(std::fabs(y[r * cols + c] - x[r * cols + c]), std::fabs(x[r * cols + c]) / 16);
        }
      }
    // Scales are the smallest power of two that fits the block's amax.
    for (int64_t br = 0; br < ceil_div(rows, 128); ++br)
      for (int64_t bc = 0; bc < ceil_div(cols, 128); ++bc) {
        float amax = 0;
        for (int64_t r = br * 128; r < std::min(rows, br * 128 + 128); ++r)
          for (int64_t c = bc * 128; c < std::min(cols, bc * 128 + 128); ++c) amax = std::max(amax, std::fabs(x[r * cols + c]));
        float sc = e8m0_to_f32(s[br * ceil_div(cols, 128) + bc]);
        EXPECT_LE(amax / sc, 448.f);
        EXPECT_GT(amax / (sc / 2), 448.f);
      }
  }
}

TEST(Quant, Fp4GroupsPackLowNibbleFirst) {
  const int64_t rows = 3, cols = 64;
  auto x = random_matrix(rows, cols, 11);
  std::vector<uint8_t> w(rows * cols / 2), s(rows * cols / 32);
  quant_fp4_groups(x.data(), rows, cols, w.data(), s.data());
  std::vector<float> y(rows * cols, NAN);
  dequant_fp4_groups(w.data(), DType::F8_E8M0, s.data(), rows, cols, y.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float scale = e8m0_to_f32(s[r * 2 + c / 32]);
      uint8_t byte = w[r * 32 + c / 2];
      uint8_t code = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
      ASSERT_EQ(code, f32_to_e2m1(x[r * cols + c] / scale));
      ASSERT_EQ(y[r * cols + c], e2m1_to_f32(code) * scale);
      ASSERT_LE(std::fabs(x[r * cols + c] / scale), 6.f);
    }
}

TEST(Quant, F32ScalesAreAccepted) {
  const int64_t rows = 2, cols = 130;
  auto x = random_matrix(rows, cols, 5);
  std::vector<uint8_t> w(rows * cols), s8(2);
  quant_fp8_blocks(x.data(), rows, cols, w.data(), s8.data());
  std::vector<float> s32 = {e8m0_to_f32(s8[0]), e8m0_to_f32(s8[1])};
  std::vector<float> a(rows * cols), b(rows * cols);
  dequant_fp8_blocks(w.data(), DType::F8_E8M0, s8.data(), rows, cols, a.data());
  dequant_fp8_blocks(w.data(), DType::F32, s32.data(), rows, cols, b.data());
  EXPECT_EQ(a, b);
}

// The official act_quant: scale = max(amax, 1e-4) / 448, rounded up to a power of two for ue8m0,
// q = E4M3_RNE(clamp(v / scale)). Checked against an independent double-precision construction.
TEST(Quant, Fp8DynamicMatchesDefinition) {
  Rng r(77);
  for (bool pow2 : {true, false}) {
    for (int64_t n : {128, 200, 1}) {
      std::vector<float> x(n);
      for (auto& v : x) v = r.normal() * 5.f;
      if (n == 200) std::fill(x.begin() + 128, x.end(), 1e-6f);  // second block under the amax floor
      std::vector<uint8_t> q(n);
      std::vector<float> s((n + 127) / 128), rt(n);
      fp8_dynamic_quant(x.data(), n, kActBlock, pow2, q.data(), s.data(), rt.data());
      for (int64_t b = 0; b * 128 < n; ++b) {
        double amax = 1e-4;
        for (int64_t i = b * 128; i < std::min<int64_t>(n, b * 128 + 128); ++i) amax = std::max(amax, std::fabs(double(x[i])));
        double want = double(float(float(amax) * (1.f / 448.f)));
        if (pow2) want = std::exp2(std::ceil(std::log2(want)));
        EXPECT_EQ(double(s[b]), want) << "block " << b << " pow2=" << pow2;
        for (int64_t i = b * 128; i < std::min<int64_t>(n, b * 128 + 128); ++i) {
          const float v = std::clamp(x[i] / s[b], -448.f, 448.f);
          // q is the nearest E4M3 value to v (ties to even are covered by the numeric tests).
          float best = INFINITY;
          for (int c = 0; c < 256; ++c)
            if ((c & 0x7f) != 0x7f) best = std::min(best, std::fabs(e4m3_to_f32(uint8_t(c)) - v));
          EXPECT_EQ(std::fabs(e4m3_to_f32(q[i]) - v), best) << i;
          EXPECT_EQ(rt[i], e4m3_to_f32(q[i]) * s[b]) << i;
        }
      }
      // With power-of-two scales the round trip is idempotent: quantising it again reproduces it.
      if (pow2) {
        std::vector<float> rt2(n);
        fp8_dynamic_quant(rt.data(), n, kActBlock, pow2, nullptr, nullptr, rt2.data());
        EXPECT_EQ(rt, rt2) << "n=" << n;
      }
    }
  }
}

// The indexer QAT's E2M1 rounding (tensor/index_qat.h, shared with the CUDA kernel) is the
// checkpoint codec's: every float from 0 to 7 in steps of 2^-12, and each midpoint's neighbours.
TEST(IndexQat, E2m1NearestMatchesCodec) {
  auto codec = [](float m) { return e2m1_to_f32(f32_to_e2m1(m)); };
  for (int k = 0; k <= 7 * 4096; ++k) {
    const float m = float(k) / 4096.f;
    ASSERT_EQ(e2m1_nearest(std::min(m, 6.f)), codec(m)) << m;
  }
  for (float mid : {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.f})
    for (float m : {std::nextafter(mid, 0.f), mid, std::nextafter(mid, 7.f)}) ASSERT_EQ(e2m1_nearest(m), codec(m)) << m;
}

// index_qat_row against an independent construction: the Hadamard product in double from the
// matrix H[i][j] = (-1)^popcount(i & j) / sqrt(d), then per block of 32 the E2M1 grid of the
// scale 2^ceil(log2(amax / 6)). The FP32 butterflies differ from the double product by rounding,
// so each output must be a grid value within half a step (plus that rounding) of the reference;
// a unit vector's transform is exact (+-d^-1/2), so there the outputs are checked exactly.
TEST(IndexQat, RowMatchesDefinition) {
  Rng r(77);
  for (int d : {32, 64, 128}) {
    for (int k : {0, 5, d - 1}) {  // unit vectors
      std::vector<float> x(size_t(d), 0.f);
      x[size_t(k)] = 1.f;
      index_qat_row(x.data(), d);
      const double norm = 1.0 / std::sqrt(double(d));
      const int e = int(std::ceil(std::log2(norm / 6.0)));
      const double v = norm / std::ldexp(1.0, e);  // in (3, 6]
      const double q = v > 5.0 ? 6.0 : v > 3.5 ? 4.0 : 3.0;
      for (int i = 0; i < d; ++i)
        ASSERT_EQ(double(x[size_t(i)]), (__builtin_popcount(unsigned(i & k)) % 2 ? -q : q) * std::ldexp(1.0, e))
            << "d=" << d << " k=" << k << " i=" << i;
    }
    for (int rep = 0; rep < 50; ++rep) {
      std::vector<float> x(static_cast<size_t>(d));
      const float mag = std::ldexp(1.f, int(r.below(40)) - 20);
      for (auto& v : x) v = r.normal() * mag;
      if (rep == 0) std::fill(x.begin(), x.end(), 0.f);
      std::vector<double> y(size_t(d), 0.0);
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j)
          y[size_t(i)] += (__builtin_popcount(unsigned(i & j)) % 2 ? -1.0 : 1.0) * double(x[size_t(j)]);
      for (auto& v : y) v /= std::sqrt(double(d));
      std::vector<float> z = x;
      index_qat_row(z.data(), d);
      for (int b = 0; b < d; b += 32) {
        double amax = 6.0 * std::ldexp(1.0, -126);
        for (int i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(y[size_t(i)]));
        const double scale = std::ldexp(1.0, int(std::ceil(std::log2(amax / 6.0))));
        for (int i = b; i < b + 32; ++i) {
          const double g = double(z[size_t(i)]) / scale, a = std::fabs(g);
          const bool on_grid = a == 0 || a == 0.5 || a == 1 || a == 1.5 || a == 2 || a == 3 || a == 4 || a == 6;
          ASSERT_TRUE(on_grid) << "d=" << d << " i=" << i << " z/scale=" << g;
          const double step = a < 2 ? 0.5 : a < 4 ? 1.0 : 2.0;  // grid spacing around the value
          EXPECT_LE(std::fabs(g - y[size_t(i)] / scale), step / 2 + 1e-4) << "d=" << d << " i=" << i;
        }
      }
    }
  }
}
