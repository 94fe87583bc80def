#pragma once
// Device decoders for the checkpoint's narrow formats (twins of src/tensor/numeric.h).
#include <cstdint>

namespace dsv4::cuda {

__device__ __forceinline__ float e8m0_to_float(uint8_t e) {
  return e == 0 ? __int_as_float(0x00400000) : (e == 0xff ? __int_as_float(0x7fc00000) : __int_as_float(int(e) << 23));
}

__device__ __forceinline__ float e4m3_to_float(uint8_t v) {
  const int exp = (v >> 3) & 0xf, man = v & 7;
  float mag = exp == 0 ? float(man) * 0.001953125f /* 2^-9 */ : __int_as_float(((exp + 120) << 23) | (man << 20));
  if (exp == 0xf && man == 7) mag = __int_as_float(0x7fc00000);
  return (v & 0x80) ? -mag : mag;
}

__device__ __forceinline__ float e2m1_to_float(uint8_t nibble) {
  constexpr float kMag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  const float m = kMag[nibble & 7];
  return (nibble & 8) ? -m : m;
}

}  // namespace dsv4::cuda
