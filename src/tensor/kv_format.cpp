#include "tensor/kv_format.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "tensor/numeric.h"

namespace dsv4 {

const char* kv_format_name(KvFormat f) {
  switch (f) {
    case KvFormat::F32: return "f32";
    case KvFormat::FP8: return "fp8";
    case KvFormat::FP8Simulated: return "fp8-simulated";
  }
  return "?";
}

uint8_t kv_scale_code(float amax) {
  const uint32_t b = std::bit_cast<uint32_t>(amax * (1.f / kE4M3Max));
  return uint8_t(((b >> 23) & 0xff) + ((b & 0x7fffff) ? 1 : 0));
}

void pack_kv_row(const float* x, const KvRowLayout& L, uint8_t* row) {
  for (int64_t b = 0, k = 0; b < L.nope; b += kKvScaleBlock, ++k) {
    const int64_t e = std::min(L.nope, b + kKvScaleBlock);
    float amax = kKvAmaxFloor;
    for (int64_t i = b; i < e; ++i) amax = std::max(amax, std::fabs(x[i]));
    const uint8_t code = kv_scale_code(amax);
    const float scale = e8m0_to_f32(code);
    for (int64_t i = b; i < e; ++i) row[i] = f32_to_e4m3(std::clamp(x[i] / scale, -kE4M3Max, kE4M3Max));
    row[L.scale_offset + k] = code;
  }
  for (int64_t i = 0; i < L.rope; ++i) {
    const uint16_t h = f32_to_bf16(x[L.nope + i]);
    row[L.rope_offset + 2 * i] = uint8_t(h & 0xff);
    row[L.rope_offset + 2 * i + 1] = uint8_t(h >> 8);
  }
  std::memset(row + L.scale_offset + L.scales, 0, size_t(L.bytes - L.scale_offset - L.scales));
}

void unpack_kv_row(const uint8_t* row, const KvRowLayout& L, float* out) {
  for (int64_t i = 0; i < L.nope; ++i) out[i] = e4m3_to_f32(row[i]) * e8m0_to_f32(row[L.scale_offset + i / kKvScaleBlock]);
  for (int64_t i = 0; i < L.rope; ++i)
    out[L.nope + i] = bf16_to_f32(uint16_t(row[L.rope_offset + 2 * i] | (uint16_t(row[L.rope_offset + 2 * i + 1]) << 8)));
}

}  // namespace dsv4
