#pragma once
// Activation/state tensors owned by a backend (host memory for CPU, device memory for CUDA).
// A Tensor is a typed view into shared storage; slicing rows shares the storage.
#include <cstdint>
#include <memory>
#include <vector>

#include "util/error.h"

namespace dsv4 {

enum class ElemType : uint8_t { F32, I32 };

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
  bool empty() const { return !storage; }
  float* f32() const {
    DSV4_CHECK(type == ElemType::F32);
    return reinterpret_cast<float*>(storage.get() + offset);
  }
  int32_t* i32() const {
    DSV4_CHECK(type == ElemType::I32);
    return reinterpret_cast<int32_t*>(storage.get() + offset);
  }
  // Rows [r0, r1) of the leading dimension.
  Tensor rows_view(int64_t r0, int64_t r1) const {
    DSV4_CHECK(!shape.empty() && r0 >= 0 && r0 <= r1 && r1 <= shape[0]);
    Tensor t = *this;
    const int64_t row_elems = shape[0] ? numel() / shape[0] : 0;
    t.offset += size_t(r0 * row_elems * 4);
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
