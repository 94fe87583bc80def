#pragma once
// Minimal .npy (format 1.0) for float32 / int32 arrays: logits dumps and golden fixtures.
#include <cstdint>
#include <string>
#include <vector>

namespace dsv4 {

struct NpyArray {
  std::string dtype;  // "<f4" or "<i4"
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, C order
  int64_t numel() const;
  const float* f32() const;
  const int32_t* i32() const;
};

void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape);
void write_npy_i32(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape);
NpyArray read_npy(const std::string& path);

}  // namespace dsv4
