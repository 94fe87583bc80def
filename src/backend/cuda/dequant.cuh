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
  // Bit construction (no lookup table in local memory): code s|e1e0|m -> 0, 0.5 (e = 0) or
  // 2^(e-1) * (1 + m/2).
  const uint32_t e = (nibble >> 1) & 3u, m = nibble & 1u;
  const uint32_t mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3f000000u : 0u);
  return __uint_as_float(mag | (uint32_t(nibble & 8u) << 28));
}

// Four E2M1 codes (16 bits, element i in nibble i) -> four E4M3 bytes. Magnitudes by byte
// permutation from an 8-entry table, by default (0, 0.5, 1, 1.5, 2, 3, 4, 6) as E4M3 (lo: the
// first four), signs moved to bit 7.
__device__ __forceinline__ uint32_t e2m1x4_to_e4m3x4(uint32_t u, uint32_t lo = 0x3c383000u,
                                                     uint32_t hi = 0x4c484440u) {
  const uint32_t mag = __byte_perm(lo, hi, u & 0x7777u);
  const uint32_t sg = u & 0x8888u;
  return mag | ((sg & 0x8u) << 4) | ((sg & 0x80u) << 8) | ((sg & 0x800u) << 12) | ((sg & 0x8000u) << 16);
}

}  // namespace dsv4::cuda
