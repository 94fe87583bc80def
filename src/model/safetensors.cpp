#include <fmt/format.h>
#include "model/safetensors.h"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/utf8.h"

namespace dsv4 {

int64_t TensorData::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string escape_bytes(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\') out.push_back(char(c));
    else out += fmt::format("\\x{:02x}", c);
  }
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const size_t size = file_.size();
  if (size < 8) fail("{}: truncated safetensors header ({} bytes, need at least 8)", path, size);
  uint64_t hlen = 0;
  std::memcpy(&hlen, file_.data(), 8);
  if (hlen > size - 8) fail("{}: safetensors header length {} is larger than the file ({} bytes)", path, hlen, size);
  std::string header(reinterpret_cast<const char*>(file_.data() + 8), hlen);
  if (size_t bad = utf8::first_invalid(header); bad != std::string::npos) {
    // Show the JSON string around the bad byte: it is almost always a tensor name.
    size_t q0 = header.rfind('"', bad), q1 = header.find('"', bad);
    std::string around = header.substr(q0 == std::string::npos ? 0 : q0 + 1,
                                       (q1 == std::string::npos ? header.size() : q1) - (q0 == std::string::npos ? 0 : q0 + 1));
    fail("{}: safetensors header has a name that is not valid UTF-8: \"{}\"", path, escape_bytes(around));
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: safetensors header is not valid JSON: {}", path, e.what());
  }
  if (!j.is_object()) fail("{}: safetensors header must be a JSON object", path);
  const size_t data_start = 8 + hlen, data_size = size - data_start;
  struct Range {
    uint64_t b, e;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const auto& v = it.value();
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      fail("{}: tensor '{}': header entry needs dtype, shape and data_offsets", path, name);
    if (!v["dtype"].is_string()) fail("{}: tensor '{}': dtype must be a string", path, name);
    auto dt = dtype_from_safetensors(v["dtype"].get<std::string>());
    if (!dt) fail("{}: tensor '{}': unsupported dtype '{}'", path, name, v["dtype"].get<std::string>());
    TensorData t;
    t.name = name;
    t.dtype = *dt;
    t.file = &file_.path();
    if (!v["shape"].is_array()) fail("{}: tensor '{}': shape must be a list", path, name);
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) fail("{}: tensor '{}': bad shape {}", path, name, v["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
      if (__builtin_mul_overflow(numel, uint64_t(d.get<int64_t>()), &numel))
        fail("{}: tensor '{}': shape {} overflows", path, name, v["shape"].dump());
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("{}: tensor '{}': data_offsets must be two non-negative integers", path, name);
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      fail("{}: tensor '{}': data_offsets [{}, {}] are out of range (data section is {} bytes)", path, name, b, e, data_size);
    uint64_t want = numel * (t.dtype == DType::BF16 || t.dtype == DType::F16 ? 2
                             : t.dtype == DType::F32 || t.dtype == DType::I32 ? 4
                             : t.dtype == DType::I64 ? 8 : 1);
    if (e - b != want)
      fail("{}: tensor '{}': data_offsets span {} bytes but dtype {} shape {} needs {}", path, name, e - b,
           dtype_name(t.dtype), v["shape"].dump(), want);
    t.data = file_.data() + data_start + b;
    t.nbytes = e - b;
    auto [pos, ok] = tensors_.emplace(name, std::move(t));
    ranges.push_back({b, e, &pos->first});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.b < b.b; });
  const Range* prev = nullptr;  // the non-empty range reaching furthest so far
  for (const auto& r : ranges) {
    if (r.e == r.b) continue;
    if (prev && r.b < prev->e)
      fail("{}: tensor '{}': data_offsets overlap tensor '{}'", path, *r.name, *prev->name);
    if (!prev || r.e > prev->e) prev = &r;
  }
}

const TensorData* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

void write_safetensors(const std::string& path, const std::vector<const OwnedTensor*>& tensors) {
  nlohmann::ordered_json h;
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const auto* t : tensors) {
    h[t->name] = {{"dtype", std::string(dtype_safetensors_name(t->dtype))},
                  {"shape", t->shape},
                  {"data_offsets", {off, off + t->bytes.size()}}};
    off += t->bytes.size();
  }
  std::string hs = h.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  std::string out(8, '\0');
  uint64_t hl = hs.size();
  std::memcpy(out.data(), &hl, 8);
  out += hs;
  out.reserve(out.size() + off);
  for (const auto* t : tensors) out.append(reinterpret_cast<const char*>(t->bytes.data()), t->bytes.size());
  write_binary_file(path, out.data(), out.size());
}

}  // namespace dsv4
