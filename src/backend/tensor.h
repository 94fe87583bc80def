#pragma once
// Activation/state tensors owned by a backend (host memory for CPU, device memory for CUDA).
// A Tensor is a typed view into shared storage; slicing rows shares the storage.
#include <cstdint>
#include <memory>
#include <vector>

#include "util/error.h"

namespace dsv4 {

// U8: raw bytes (packed KV rows, tensor/kv_format.h); shapes count bytes in the last dim.
enum class ElemType : uint8_t { F32, I32, U8 };
constexpr int64_t elem_size(ElemType t) { return t == ElemType::U8 ? 1 : 4; }

struct Tensor {
  std::shared_ptr<uint8_t> storage;
  size_t offset = 0;  // bytes
  ElemType type = ElemType::F32;
  std::vector<int64_t> shape;

  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const { return cols() ? numel() / cols() : 0; }
  int64_t nbytes() const { return numel() * elem_size(type); }
  bool empty() const { return !storage; }
  float* f32() const {
    DSV4_CHECK(type == ElemType::F32);
    return reinterpret_cast<float*>(storage.get() + offset);
  }
  int32_t* i32() const {
    DSV4_CHECK(type == ElemType::I32);
    return reinterpret_cast<int32_t*>(storage.get() + offset);
  }
  uint8_t* u8() const {
    DSV4_CHECK(type == ElemType::U8);
    return storage.get() + offset;
  }
  // Rows [r0, r1) of the leading dimension.
  Tensor rows_view(int64_t r0, int64_t r1) const {
    DSV4_CHECK(!shape.empty() && r0 >= 0 && r0 <= r1 && r1 <= shape[0]);
    Tensor t = *this;
    const int64_t row_elems = shape[0] ? numel() / shape[0] : 0;
    t.offset += size_t(r0 * row_elems * elem_size(type));
    t.shape[0] = r1 - r0;
    return t;
  }
  Tensor reshaped(std::vector<int64_t> s) const {
    Tensor t = *this;
    t.shape = std::move(s);
    DSV4_CHECK(t.numel() == numel());
    return t;
  }
};

}  // namespace dsv4
