// The production KV row (tensor/kv_format.h): layout arithmetic, the bytes of the format decoded
// by hand, and bit-exactness of unpack(pack(x)) against the FP32 simulation the forward pass
// used before the storage was packed (kept here verbatim as the specification), on the codec
// functions and on the CPU backend's pack_kv / unpack_kv / quantize_kv.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <fmt/format.h>

#include "backend/backend.h"
#include "tensor/kv_format.h"
#include "tensor/numeric.h"
#include "util/random.h"

using namespace dsv4;

namespace {

// The simulation as it was (CpuBackend::quantize_kv before packed storage): per row, blocks of 64
// no-RoPE values round-tripped through E4M3 at scale 2^ceil(log2(amax/448)) (amax >= 1e-4, the
// exponent taken from the bit pattern), the RoPE values through BF16.
void reference_quantize(float* v, int64_t d, int64_t nope) {
  for (int64_t b = 0; b < nope; b += 64) {
    const int64_t e = std::min(nope, b + 64);
    float amax = 1e-4f;
    for (int64_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(v[i]));
    const uint32_t bits = std::bit_cast<uint32_t>(amax * (1.f / 448.f));
    const uint32_t ex = ((bits >> 23) & 0xff) + ((bits & 0x7fffff) ? 1 : 0);
    const float scale = std::bit_cast<float>(ex << 23);
    for (int64_t i = b; i < e; ++i) v[i] = e4m3_to_f32(f32_to_e4m3(std::clamp(v[i] / scale, -448.f, 448.f))) * scale;
  }
  for (int64_t i = nope; i < d; ++i) v[i] = bf16_to_f32(f32_to_bf16(v[i]));
}

// Decodes a row from the documented byte layout alone, in double precision.
std::vector<double> decode_by_hand(const uint8_t* row, int64_t d, int64_t nope) {
  std::vector<double> out(static_cast<size_t>(d));
  const int64_t rope = d - nope, scale_at = nope + 2 * rope;
  for (int64_t i = 0; i < nope; ++i) {
    const uint8_t c = row[i];
    const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    const double mag = e == 0 ? m * std::ldexp(1.0, -9) : (1 + m / 8.0) * std::ldexp(1.0, e - 7);
    out[size_t(i)] = (s ? -mag : mag) * std::ldexp(1.0, int(row[scale_at + i / 64]) - 127);
  }
  for (int64_t i = 0; i < rope; ++i) {
    const uint32_t h = uint32_t(row[nope + 2 * i]) | (uint32_t(row[nope + 2 * i + 1]) << 8);
    out[size_t(nope + i)] = double(std::bit_cast<float>(h << 16));
  }
  return out;
}

// Bitwise equality of float arrays (so -0 != +0 and NaN payloads count).
::testing::AssertionResult same_bits(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i]))
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " (0x" << std::hex
                                           << std::bit_cast<uint32_t>(a[i]) << ") vs " << std::dec << b[i] << " (0x"
                                           << std::hex << std::bit_cast<uint32_t>(b[i]) << ")";
  return ::testing::AssertionSuccess();
}

struct Shape {
  int64_t d, nope;
};
// V4 (448 + 64), the tiny presets (48 + 16, 96 + 32: partial last blocks), an odd no-RoPE
// width, no RoPE dims, no FP8 dims.
const std::vector<Shape> kShapes = {{512, 448}, {64, 48}, {128, 96}, {130, 65}, {72, 72}, {40, 0}};

// Rows that exercise the edges: random magnitudes 1e-8..1e8 per block, all zeros, negative
// zeros, amax below the 1e-4 floor, huge values (E4M3 saturation, BF16 overflow to inf),
// amax exactly 448 * 2^k, subnormal inputs, a 1e-30..1e30 spread within one block.
std::vector<float> edge_rows(int64_t d, int64_t rows, uint64_t seed) {
  Rng r(seed);
  std::vector<float> x(size_t(rows * d));
  for (int64_t row = 0; row < rows; ++row) {
    float* v = x.data() + row * d;
    const int kind = int(row % 9);
    const float mag = std::pow(10.f, r.uniform(-8.f, 8.f));
    for (int64_t i = 0; i < d; ++i) {
      switch (kind) {
        case 0: v[i] = r.normal() * mag * std::pow(10.f, r.uniform(-2.f, 2.f)); break;
        case 1: v[i] = 0.f; break;
        case 2: v[i] = -0.f; break;
        case 3: v[i] = r.normal() * 3e-6f; break;
        case 4: v[i] = (i % 3 == 0 ? std::numeric_limits<float>::max() : -3e38f) * r.uniform(0.5f, 1.f); break;
        case 5: v[i] = (i % 64 == 5 ? 448.f * std::ldexp(1.f, int(i % 11) - 5) : r.uniform(-1.f, 1.f)); break;
        case 6: v[i] = std::numeric_limits<float>::denorm_min() * float(1 + r.below(1000)) * (i % 2 ? -1.f : 1.f); break;
        case 7: v[i] = std::pow(10.f, r.uniform(-30.f, 30.f)) * (r.below(2) ? -1.f : 1.f); break;
        default: v[i] = r.normal(); break;
      }
    }
  }
  return x;
}

}  // namespace

TEST(KvFormat, RowLayout) {
  const KvRowLayout v4 = kv_row_layout(512, 448);
  EXPECT_EQ(v4.rope, 64);
  EXPECT_EQ(v4.rope_offset, 448);
  EXPECT_EQ(v4.scale_offset, 448 + 128);
  EXPECT_EQ(v4.scales, 7);
  EXPECT_EQ(v4.bytes, 584);  // 583 rounded up to a multiple of 8
  struct Want {
    int64_t d, nope, scale_offset, scales, bytes;
  };
  for (const Want& w : std::vector<Want>{{64, 48, 80, 1, 88}, {128, 96, 160, 2, 168}, {130, 65, 195, 2, 200},
                                         {72, 72, 72, 2, 80}, {40, 0, 80, 0, 80}, {64, 64, 64, 1, 72}}) {
    const KvRowLayout L = kv_row_layout(w.d, w.nope);
    EXPECT_EQ(L.rope_offset, w.nope) << w.d << "/" << w.nope;
    EXPECT_EQ(L.scale_offset, w.scale_offset) << w.d << "/" << w.nope;
    EXPECT_EQ(L.scales, w.scales) << w.d << "/" << w.nope;
    EXPECT_EQ(L.bytes, w.bytes) << w.d << "/" << w.nope;
    EXPECT_EQ(L.bytes % kKvRowAlign, 0);
  }
}

// The bytes themselves, for a row whose encoding is known: 1.0 everywhere has amax 1, scale
// 2^ceil(log2(1/448)) = 2^-8 (code 127 - 8), E4M3 of 256 = 0x78, BF16 of 1.0 = 0x3f80.
TEST(KvFormat, KnownBytes) {
  const KvRowLayout L = kv_row_layout(128, 96);
  std::vector<float> x(128, 1.f);
  x[3] = -0.5f;    // 2^-1 / 2^-8 = 128 -> 0x70, sign bit
  x[100] = -2.f;   // BF16 0xc000
  std::vector<uint8_t> row(size_t(L.bytes), 0xaa);
  pack_kv_row(x.data(), L, row.data());
  EXPECT_EQ(row[0], 0x78);
  EXPECT_EQ(row[3], 0x80 | 0x70);
  EXPECT_EQ(row[95], 0x78);
  EXPECT_EQ(row[L.scale_offset], 119);
  EXPECT_EQ(row[L.scale_offset + 1], 119);
  EXPECT_EQ(row[96], 0x80);  // 1.0 = 0x3f80, little-endian
  EXPECT_EQ(row[97], 0x3f);
  EXPECT_EQ(row[96 + 2 * 4], 0x00);  // -2.0 = 0xc000
  EXPECT_EQ(row[96 + 2 * 4 + 1], 0xc0);
  for (int64_t i = L.scale_offset + L.scales; i < L.bytes; ++i) EXPECT_EQ(row[i], 0) << "padding byte " << i;
  std::vector<float> y(128);
  unpack_kv_row(row.data(), L, y.data());
  EXPECT_TRUE(same_bits(x.data(), y.data(), 128));  // all exactly representable
}

TEST(KvFormat, UnpackOfPackIsTheSimulationBitForBit) {
  uint64_t seed = 1;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(fmt::format("d={} nope={}", s.d, s.nope));
    const KvRowLayout L = kv_row_layout(s.d, s.nope);
    const int64_t rows = 90;
    const std::vector<float> x = edge_rows(s.d, rows, ++seed);
    std::vector<uint8_t> row(size_t(L.bytes));
    std::vector<float> got(size_t(s.d)), ref(size_t(s.d));
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x.data() + r * s.d;
      std::fill(row.begin(), row.end(), uint8_t(0xee));
      pack_kv_row(xr, L, row.data());
      unpack_kv_row(row.data(), L, got.data());
      std::copy_n(xr, s.d, ref.data());
      reference_quantize(ref.data(), s.d, s.nope);
      ASSERT_TRUE(same_bits(ref.data(), got.data(), s.d)) << "row " << r << " (kind " << r % 9 << ")";
      for (int64_t i = L.scale_offset + L.scales; i < L.bytes; ++i) ASSERT_EQ(row[i], 0) << "padding, row " << r;
      // The documented layout decodes to the same values.
      const std::vector<double> hand = decode_by_hand(row.data(), s.d, s.nope);
      for (int64_t i = 0; i < s.d; ++i) ASSERT_EQ(float(hand[i]), got[i]) << "row " << r << " dim " << i;
      // Accuracy on ordinary rows: E4M3 keeps 3 mantissa bits (half a step: 2^-4 relative), values
      // far below the block's amax land in E4M3 subnormals (step 2^-9 of the scale); BF16: 2^-8.
      if (r % 9 == 0 || r % 9 == 8)
        for (int64_t i = 0; i < s.d; ++i) {
          const double ax = std::fabs(double(xr[i]));
          const double tol = i < s.nope
                                 ? std::max(ax / 16.0, std::ldexp(1.0, int(row[L.scale_offset + i / 64]) - 127 - 10))
                                 : ax / 256.0;
          ASSERT_LE(std::fabs(double(got[i]) - double(xr[i])), tol) << "row " << r << " dim " << i;
        }
    }
  }
}

// Signs survive: negative zero stays -0 (E4M3 0x80, BF16 0x8000).
TEST(KvFormat, NegativeZero) {
  const KvRowLayout L = kv_row_layout(64, 48);
  std::vector<float> x(64, -0.f), y(64, 1.f);
  std::vector<uint8_t> row(size_t(L.bytes));
  pack_kv_row(x.data(), L, row.data());
  for (int64_t i = 0; i < 48; ++i) EXPECT_EQ(row[i], 0x80) << i;
  for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(row[48 + 2 * i + 1], 0x80) << i;
  EXPECT_EQ(row[L.scale_offset], 105);  // 1e-4 / 448 rounds up to 2^-22: 127 - 22
  unpack_kv_row(row.data(), L, y.data());
  for (float v : y) EXPECT_TRUE(v == 0.f && std::signbit(v));
}

// A non-finite value poisons (NaN) its own 64-block only, as the simulation did.
TEST(KvFormat, InfinityPoisonsItsBlockOnly) {
  const KvRowLayout L = kv_row_layout(512, 448);
  std::vector<float> x = edge_rows(512, 1, 77), y(512);
  x[70] = std::numeric_limits<float>::infinity();
  std::vector<uint8_t> row(size_t(L.bytes));
  pack_kv_row(x.data(), L, row.data());
  unpack_kv_row(row.data(), L, y.data());
  std::vector<float> ref = x;
  reference_quantize(ref.data(), 512, 448);
  for (int64_t i = 0; i < 512; ++i) {
    if (i >= 64 && i < 128) {
      EXPECT_TRUE(std::isnan(y[i])) << i;
      EXPECT_TRUE(std::isnan(ref[i])) << i;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(y[i]), std::bit_cast<uint32_t>(ref[i])) << i;
    }
  }
}

// The CPU backend's ops are the codec applied per row: pack_kv writes exactly pack_kv_row's
// bytes, unpack_kv gathers rows by index (or 0..n-1), quantize_kv equals the simulation.
TEST(KvFormat, CpuBackendOps) {
  auto be = make_cpu_backend();
  uint64_t seed = 40;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(fmt::format("d={} nope={}", s.d, s.nope));
    const KvRowLayout L = kv_row_layout(s.d, s.nope);
    const int64_t rows = 200;
    const std::vector<float> x = edge_rows(s.d, rows, ++seed);
    Tensor xt = be->alloc({rows, s.d});
    be->upload(xt, x.data());
    Tensor packed = be->alloc({rows, L.bytes}, ElemType::U8);  // poisoned 0xff
    EXPECT_EQ(packed.nbytes(), rows * L.bytes);
    be->pack_kv(xt, s.nope, packed);
    std::vector<uint8_t> bytes(size_t(rows * L.bytes)), one(size_t(L.bytes));
    be->download(packed, bytes.data());
    for (int64_t r = 0; r < rows; ++r) {
      pack_kv_row(x.data() + r * s.d, L, one.data());
      ASSERT_EQ(std::memcmp(one.data(), bytes.data() + r * L.bytes, size_t(L.bytes)), 0) << "row " << r;
    }
    std::vector<float> ref = x;
    for (int64_t r = 0; r < rows; ++r) reference_quantize(ref.data() + r * s.d, s.d, s.nope);

    // Gather by index list (repeats, reversed order) and the identity form on a row view.
    Rng rng(seed);
    std::vector<int32_t> idx(77);
    for (auto& i : idx) i = int32_t(rng.below(uint64_t(rows)));
    idx[0] = int32_t(rows - 1);
    idx[1] = 0;
    Tensor it = be->alloc({int64_t(idx.size())}, ElemType::I32);
    be->upload(it, idx.data());
    Tensor out = be->alloc({int64_t(idx.size()), s.d});
    be->unpack_kv(packed, it, s.nope, out);
    std::vector<float> got(size_t(out.numel()));
    be->download(out, got.data());
    for (size_t i = 0; i < idx.size(); ++i)
      ASSERT_TRUE(same_bits(ref.data() + int64_t(idx[i]) * s.d, got.data() + int64_t(i) * s.d, s.d)) << "gathered " << i;
    Tensor view_out = be->alloc({50, s.d});
    be->unpack_kv(packed.rows_view(100, 150), Tensor{}, s.nope, view_out);
    std::vector<float> vgot(size_t(50 * s.d));
    be->download(view_out, vgot.data());
    ASSERT_TRUE(same_bits(ref.data() + 100 * s.d, vgot.data(), 50 * s.d));

    // quantize_kv in place.
    be->quantize_kv(xt, s.nope);
    std::vector<float> q(size_t(rows * s.d));
    be->download(xt, q.data());
    ASSERT_TRUE(same_bits(ref.data(), q.data(), rows * s.d));
  }
}

// U8 tensors: byte-sized views, copies and transfers.
TEST(KvFormat, ByteTensors) {
  auto be = make_cpu_backend();
  Tensor t = be->alloc({10, 24}, ElemType::U8);
  EXPECT_EQ(t.nbytes(), 240);
  std::vector<uint8_t> v(240);
  for (size_t i = 0; i < v.size(); ++i) v[i] = uint8_t(i * 7 + 1);
  be->upload(t, v.data());
  Tensor u = be->alloc({3, 24}, ElemType::U8);
  be->copy(t.rows_view(4, 7), u);
  EXPECT_EQ(t.rows_view(4, 7).offset, 96u);
  std::vector<uint8_t> w(72);
  be->download(u, w.data());
  EXPECT_TRUE(std::equal(w.begin(), w.end(), v.begin() + 96));
  Tensor f = be->alloc({72});  // same element count, other element size
  EXPECT_THROW(be->copy(u, f), Error);
}
