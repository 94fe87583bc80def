#pragma once
// Storage dtypes as they appear in safetensors files of DeepSeek-V4 checkpoints.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace dsv4 {

enum class DType : uint8_t {
  BF16,
  F16,
  F32,
  F8_E4M3,   // float8_e4m3fn: no inf, max 448, 0x7f/0xff NaN
  F8_E8M0,   // ue8m0 power-of-two scales: 2^(e-127), 0xff NaN
  FP4_E2M1,  // packed two per byte, low nibble first; stored as "I8" in the checkpoint
  I8,
  I32,
  I64,
};

std::string_view dtype_name(DType t);
// Parses a safetensors dtype string ("BF16", "F8_E4M3", ...). I8 stays I8: whether an I8
// tensor holds packed FP4 is known only from the model description.
std::optional<DType> dtype_from_safetensors(std::string_view s);
std::string_view dtype_safetensors_name(DType t);

// Bytes for n logical elements (FP4 packs two per byte; n must be even for FP4).
size_t dtype_bytes(DType t, size_t n);

}  // namespace dsv4
