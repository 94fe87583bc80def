#pragma once
// UTF-8 checks and lossy conversion (Unicode's "maximal subpart" rule: each ill-formed
// subsequence becomes one U+FFFD, exactly like Rust's String::from_utf8_lossy, which is what
// Hugging Face tokenizers uses when decoding).
#include <cstddef>
#include <string>
#include <string_view>

namespace dsv4::utf8 {

// Offset of the first byte that does not start a well-formed sequence, or npos if `s` is valid.
size_t first_invalid(std::string_view s);
inline bool valid(std::string_view s) { return first_invalid(s) == std::string_view::npos; }

// Appends `in` to `out`, replacing every ill-formed subsequence with U+FFFD.
// If `final` is false, a trailing incomplete-but-so-far-valid sequence is not converted:
// the return value is how many bytes of `in` were consumed (the rest must be kept and
// prepended to the next chunk). With `final` true everything is consumed.
size_t append_lossy(std::string& out, std::string_view in, bool final = true);

inline std::string lossy(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  append_lossy(out, in, true);
  return out;
}

// Length in bytes of the well-formed sequence starting at s[0] (1..4), or 0 if s does not
// start with one (ill-formed or truncated).
size_t sequence_length(std::string_view s);

}  // namespace dsv4::utf8
