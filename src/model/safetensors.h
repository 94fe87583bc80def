#pragma once
// safetensors files: mmapped, validated header, zero-copy tensor views.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "util/mapped_file.h"

namespace dsv4 {

struct TensorData {
  std::string name;
  DType dtype = DType::F32;  // as stored; I8 may be reinterpreted as FP4_E2M1 by the model binder
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  const std::string* file = nullptr;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Validates the whole header (sizes, dtypes, offsets, overlaps, UTF-8) before returning.
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return file_.path(); }
  const std::map<std::string, TensorData>& tensors() const { return tensors_; }
  const TensorData* find(const std::string& name) const;

 private:
  MappedFile file_;
  std::map<std::string, TensorData> tensors_;
};

// Writer: tensors are written in the order given.
struct OwnedTensor {
  std::string name;
  DType dtype;  // FP4_E2M1 is written as I8 with the packed shape
  std::vector<int64_t> shape;  // stored shape
  std::vector<uint8_t> bytes;
};
void write_safetensors(const std::string& path, const std::vector<const OwnedTensor*>& tensors);

std::string escape_bytes(const std::string& s);  // printable form of possibly non-UTF-8 bytes

}  // namespace dsv4
