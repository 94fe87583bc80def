#include "util/utf8.h"

#include <cstdint>
#include <cstring>

namespace dsv4::utf8 {

namespace {

// For a lead byte: total length, and the allowed range of the second byte (Unicode Table 3-7).
struct Lead {
  uint8_t len, lo, hi;
};

inline Lead lead_info(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xc2 && b <= 0xdf) return {2, 0x80, 0xbf};
  if (b == 0xe0) return {3, 0xa0, 0xbf};
  if (b == 0xed) return {3, 0x80, 0x9f};
  if (b >= 0xe1 && b <= 0xef) return {3, 0x80, 0xbf};
  if (b == 0xf0) return {4, 0x90, 0xbf};
  if (b >= 0xf1 && b <= 0xf3) return {4, 0x80, 0xbf};
  if (b == 0xf4) return {4, 0x80, 0x8f};
  return {0, 0, 0};
}

// Examines the sequence at p[0..n): returns {consumed, ok, truncated}.
//  ok: a complete well-formed sequence of `consumed` bytes.
//  !ok && truncated: a valid prefix that runs into the end of the input.
//  !ok && !truncated: an ill-formed maximal subpart of `consumed` (>= 1) bytes.
struct Step {
  size_t consumed;
  bool ok, truncated;
};

inline Step step(const uint8_t* p, size_t n) {
  Lead l = lead_info(p[0]);
  if (l.len == 0) return {1, false, false};
  if (l.len == 1) return {1, true, false};
  size_t i = 1;
  for (; i < l.len; ++i) {
    if (i >= n) return {i, false, true};
    uint8_t lo = i == 1 ? l.lo : 0x80, hi = i == 1 ? l.hi : 0xbf;
    if (p[i] < lo || p[i] > hi) return {i, false, false};
  }
  return {l.len, true, false};
}

inline bool ascii8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return (w & 0x8080808080808080ull) == 0;
}

// Advances i over well-formed UTF-8 (8 ASCII bytes at a time) up to n, or to the start of an
// ill-formed or truncated sequence, whose Step it returns (ok: i == n).
inline Step skip_valid(const uint8_t* p, size_t n, size_t& i) {
  while (i < n) {
    if (i + 8 <= n && ascii8(p + i)) {
      i += 8;
      continue;
    }
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const Step st = step(p + i, n - i);
    if (!st.ok) return st;
    i += st.consumed;
  }
  return {0, true, false};
}

}  // namespace

size_t sequence_length(std::string_view s) {
  if (s.empty()) return 0;
  Step st = step(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  return st.ok ? st.consumed : 0;
}

size_t first_invalid(std::string_view s) {
  size_t i = 0;
  return skip_valid(reinterpret_cast<const uint8_t*>(s.data()), s.size(), i).ok ? std::string_view::npos : i;
}

size_t append_lossy(std::string& out, std::string_view in, bool final) {
  static constexpr char kReplacement[] = "\xef\xbf\xbd";
  const auto* p = reinterpret_cast<const uint8_t*>(in.data());
  const size_t n = in.size();
  size_t i = 0, run = 0;  // [run, i) is valid and not yet copied
  for (Step st; !(st = skip_valid(p, n, i)).ok;) {
    out.append(in.data() + run, i - run);
    if (st.truncated && !final) return i;  // keep the incomplete tail for the next chunk
    out.append(kReplacement, 3);
    i += st.consumed;
    run = i;
  }
  out.append(in.data() + run, n - run);
  return n;
}

}  // namespace dsv4::utf8
