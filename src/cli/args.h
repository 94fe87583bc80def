#pragma once
// Comma-separated integer lists of command-line options (--tokens 1,2,3, --batch 1,8,64).
#include <charconv>
#include <string>
#include <vector>

#include "util/error.h"

namespace dsv4::cli {

// Every item must be an integer of type T (errors name the flag); "" gives an empty list.
template <class T>
std::vector<T> parse_int_list(const std::string& s, const char* flag) {
  std::vector<T> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    T v{};
    auto [p, ec] = std::from_chars(s.data() + i, s.data() + j, v);
    if (ec != std::errc() || p != s.data() + j) fail("{}: '{}' is not an integer", flag, s.substr(i, j - i));
    out.push_back(v);
    i = j + 1;
  }
  return out;
}

}  // namespace dsv4::cli
