#include "tensor/dtype.h"

#include "util/error.h"

namespace dsv4 {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F32: return "F32";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E8M0: return "F8_E8M0";
    case DType::FP4_E2M1: return "FP4_E2M1";
    case DType::I8: return "I8";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

std::string_view dtype_safetensors_name(DType t) { return t == DType::FP4_E2M1 ? "I8" : dtype_name(t); }

std::optional<DType> dtype_from_safetensors(std::string_view s) {
  for (DType t : {DType::BF16, DType::F16, DType::F32, DType::F8_E4M3, DType::F8_E8M0, DType::I8, DType::I32, DType::I64})
    if (dtype_name(t) == s) return t;
  return std::nullopt;
}

size_t dtype_bytes(DType t, size_t n) {
  switch (t) {
    case DType::FP4_E2M1: DSV4_CHECK(n % 2 == 0); return n / 2;
    case DType::F8_E4M3:
    case DType::F8_E8M0:
    case DType::I8: return n;
    case DType::BF16:
    case DType::F16: return 2 * n;
    case DType::F32:
    case DType::I32: return 4 * n;
    case DType::I64: return 8 * n;
  }
  return 0;
}

}  // namespace dsv4
