#pragma once
// What the two output-parser fuzz targets share: how a text is cut into the pieces a streaming
// parser is fed, and equality of parsed messages.
#include <algorithm>
#include <cstdint>
#include <string_view>

#include "text/output_parser.h"

namespace dsv4::fuzz {

// Calls f on consecutive pieces of text: seed 0 gives the whole text at once; any other seed
// gives xorshift-sized pieces, mostly 1-5 bytes, one in eight up to 97.
template <class F>
void for_each_piece(std::string_view text, uint32_t seed, F&& f) {
  size_t pos = 0;
  uint32_t x = seed * 2654435761u + 1;
  while (pos < text.size()) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    const size_t n = std::min(seed == 0 ? text.size() : 1 + (x % 8 == 0 ? x % 97 : x % 5), text.size() - pos);
    f(text.substr(pos, n));
    pos += n;
  }
}

// The first n tool calls of a and b are equal (both have at least n).
inline bool same_calls(const ParsedMessage& a, const ParsedMessage& b, size_t n) {
  if (a.tool_calls.size() < n || b.tool_calls.size() < n) return false;
  for (size_t i = 0; i < n; ++i)
    if (a.tool_calls[i].name != b.tool_calls[i].name || a.tool_calls[i].arguments_json != b.tool_calls[i].arguments_json)
      return false;
  return true;
}

inline bool same(const ParsedMessage& a, const ParsedMessage& b) {
  return a.reasoning_content == b.reasoning_content && a.content == b.content &&
         a.tool_calls.size() == b.tool_calls.size() && same_calls(a, b, a.tool_calls.size());
}

}  // namespace dsv4::fuzz
