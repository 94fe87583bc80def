// libFuzzer target for the DeepSeek-V4 streaming output parser.
//
// Input: byte 0 = flags (bit 0: thinking mode), bytes 1..2 = seed of the way the
// text is cut into deltas, the rest = the completion text. Checks:
//   * nothing crashes or trips a sanitizer (strict and streaming parsers);
//   * the streamed result does not depend on how the text is split;
//   * whenever the strict parser (the official semantics) accepts the text, the
//     streaming parser yields exactly its result and reports no error;
//   * for valid UTF-8 input, no delta emitted before finish() splits a character.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "text/output_parser.h"
#include "util/utf8.h"
#include "util/error.h"
#include "stream_fuzz_util.h"

using namespace dsv4;
using dsv4::fuzz::same;

namespace {

ParsedMessage stream(std::string_view text, bool thinking, uint32_t seed, bool check_utf8, std::string* err) {
  StreamParser p(thinking);
  ParsedMessage m;
  fuzz::for_each_piece(text, seed, [&](std::string_view piece) {
    for (const auto& d : p.feed(piece)) {
      if (check_utf8 && d.kind != StreamDelta::Kind::ToolCallStart && !utf8::valid(d.text)) std::abort();
      apply_delta(m, d);
    }
  });
  for (const auto& d : p.finish()) apply_delta(m, d);
  if (err) *err = p.error();
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const bool thinking = data[0] & 1;
  const uint32_t seed = 1 + (data[1] | (data[2] << 8));
  std::string_view text(reinterpret_cast<const char*>(data) + 3, size - 3);
  const bool utf8 = utf8::valid(text);

  std::string err_whole;
  ParsedMessage whole = stream(text, thinking, 0, false, &err_whole);
  std::string err_split;
  ParsedMessage split = stream(text, thinking, seed, utf8, &err_split);
  if (!same(whole, split)) std::abort();
  // Byte-by-byte as well for short inputs.
  if (text.size() < 512) {
    StreamParser p(thinking);
    ParsedMessage m;
    for (char c : text)
      for (const auto& d : p.feed(std::string_view(&c, 1))) apply_delta(m, d);
    for (const auto& d : p.finish()) apply_delta(m, d);
    if (!same(whole, m)) std::abort();
  }

  ParsedMessage strict;
  bool ok = true;
  try {
    strict = parse_completion(text, thinking);
  } catch (const Error&) {
    ok = false;
  }
  if (ok && (!same(strict, whole) || !err_whole.empty())) std::abort();
  return 0;
}
