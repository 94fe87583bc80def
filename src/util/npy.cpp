#include "util/npy.h"

#include <cstring>
#include <regex>

#include "util/error.h"
#include "util/mapped_file.h"

namespace dsv4 {

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}
const float* NpyArray::f32() const {
  if (dtype != "<f4") fail("npy: expected float32 array, got {}", dtype);
  return reinterpret_cast<const float*>(bytes.data());
}
const int32_t* NpyArray::i32() const {
  if (dtype != "<i4") fail("npy: expected int32 array, got {}", dtype);
  return reinterpret_cast<const int32_t*>(bytes.data());
}

static void write_npy(const std::string& path, const char* descr, const void* data, size_t elem,
                      const std::vector<int64_t>& shape) {
  std::string shp = "(";
  size_t n = 1;
  for (auto d : shape) {
    shp += std::to_string(d) + ",";
    n *= static_cast<size_t>(d);
  }
  if (shape.size() > 1) shp.pop_back();
  shp += ")";
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shp + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out = "\x93NUMPY";
  out.push_back(1);
  out.push_back(0);
  uint16_t hl = static_cast<uint16_t>(header.size());
  out.push_back(static_cast<char>(hl & 0xff));
  out.push_back(static_cast<char>(hl >> 8));
  out += header;
  out.append(static_cast<const char*>(data), n * elem);
  write_binary_file(path, out.data(), out.size());
}

void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  write_npy(path, "<f4", data, 4, shape);
}
void write_npy_i32(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape) {
  write_npy(path, "<i4", data, 4, shape);
}

NpyArray read_npy(const std::string& path) {
  MappedFile f(path);
  const uint8_t* p = f.data();
  if (f.size() < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0) fail("{}: not a .npy file", path);
  size_t hl, off;
  if (p[6] == 1) {
    hl = p[8] | (p[9] << 8);
    off = 10;
  } else {
    if (f.size() < 12) fail("{}: truncated .npy header", path);
    hl = p[8] | (p[9] << 8) | (p[10] << 16) | (size_t(p[11]) << 24);
    off = 12;
  }
  if (off + hl > f.size()) fail("{}: truncated .npy header", path);
  std::string header(reinterpret_cast<const char*>(p + off), hl);
  std::smatch m;
  NpyArray a;
  if (!std::regex_search(header, m, std::regex("'descr':\\s*'([^']+)'"))) fail("{}: .npy header has no descr", path);
  a.dtype = m[1];
  if (a.dtype != "<f4" && a.dtype != "<i4") fail("{}: unsupported .npy dtype {}", path, a.dtype);
  if (header.find("'fortran_order': True") != std::string::npos) fail("{}: fortran-order .npy not supported", path);
  if (!std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)"))) fail("{}: .npy header has no shape", path);
  std::string dims = m[1];
  std::regex num("\\d+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), num); it != std::sregex_iterator(); ++it)
    a.shape.push_back(std::stoll(it->str()));
  size_t nbytes = static_cast<size_t>(a.numel()) * 4;
  if (off + hl + nbytes > f.size()) fail("{}: .npy data truncated", path);
  a.bytes.assign(p + off + hl, p + off + hl + nbytes);
  return a;
}

}  // namespace dsv4
