#include "tensor/kv_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tensor/numeric.h"
#include "tensor/quant.h"

namespace dsv4 {

const char* kv_format_name(KvFormat f) {
  switch (f) {
    case KvFormat::F32: return "f32";
    case KvFormat::FP8: return "fp8";
    case KvFormat::FP8Simulated: return "fp8-simulated";
  }
  return "?";
}

void pack_kv_row(const float* x, const KvRowLayout& L, uint8_t* row) {
  for (int64_t b = 0, k = 0; b < L.nope; b += kKvScaleBlock, ++k) {
    const float scale = fp8_dynamic_quant_block(x + b, std::min(kKvScaleBlock, L.nope - b), true, row + b, nullptr);
    row[L.scale_offset + k] = f32_to_e8m0(scale);  // exact: a power of two (or NaN -> 0xff)
  }
  for (int64_t i = 0; i < L.rope; ++i) {
    const uint16_t h = f32_to_bf16(x[L.nope + i]);
    row[L.rope_offset + 2 * i] = uint8_t(h & 0xff);
    row[L.rope_offset + 2 * i + 1] = uint8_t(h >> 8);
  }
  std::memset(row + L.scale_offset + L.scales, 0, size_t(L.bytes - L.scale_offset - L.scales));
}

void unpack_kv_row(const uint8_t* row, const KvRowLayout& L, float* out) {
  for (int64_t b = 0, k = 0; b < L.nope; b += kKvScaleBlock, ++k) {
    const float scale = e8m0_to_f32(row[L.scale_offset + k]);
    for (int64_t i = b; i < std::min(L.nope, b + kKvScaleBlock); ++i) out[i] = e4m3_to_f32(row[i]) * scale;
  }
  for (int64_t i = 0; i < L.rope; ++i)
    out[L.nope + i] = bf16_to_f32(uint16_t(row[L.rope_offset + 2 * i] | (uint16_t(row[L.rope_offset + 2 * i + 1]) << 8)));
}

}  // namespace dsv4
