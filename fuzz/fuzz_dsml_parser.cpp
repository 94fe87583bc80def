// libFuzzer target for the DSML tool-call parsing of the output parser (src/text/output_parser.cpp).
//
// Input: byte 0 selects the offered tools (low 2 bits: 0 = any name, as the official parser;
// 1 = none offered; 2 = {get_weather, search}; 3 = {search}), bytes 1..2 seed the way the
// text is cut into deltas, the rest is the body of a tool-call block: the target puts
// "\n\n<｜DSML｜tool_calls>\n" in front, so every mutation lands inside DSML.
// Checks:
//   * nothing crashes or trips a sanitizer (strict and streaming parsers);
//   * for each tool set, the streamed result does not depend on how the text is split;
//   * any name: whenever the strict parser accepts the text, the streaming parser yields its
//     result with no error; the arguments of an error-free valid-UTF-8 parse are JSON objects;
//   * none offered: DSML is text, so the content is the text up to the first EOS, no tool calls;
//   * a set of names: the tool calls are those of the any-name parse up to the first call to a
//     tool not offered; from that call on the DSML is content, ending where the text or an EOS
//     ends it.
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "text/chat_format.h"
#include "text/output_parser.h"
#include "util/error.h"
#include "util/utf8.h"
#include "stream_fuzz_util.h"

using namespace dsv4;
using dsv4::fuzz::same;
using dsv4::fuzz::same_calls;

namespace {

struct Streamed {
  ParsedMessage msg;
  std::string error;
};

// seed == 0: one feed; else xorshift-sized pieces from `seed`.
Streamed stream(std::string_view text, const ToolNames& tools, uint32_t seed) {
  StreamParser p(false, tools);
  Streamed s;
  fuzz::for_each_piece(text, seed, [&](std::string_view piece) {
    for (const auto& d : p.feed(piece)) apply_delta(s.msg, d);
  });
  for (const auto& d : p.finish()) apply_delta(s.msg, d);
  s.error = p.error();
  return s;
}

ToolNames tool_set(uint8_t mode) {
  switch (mode & 3) {
    case 0: return std::nullopt;
    case 1: return std::set<std::string>{};
    case 2: return std::set<std::string>{"get_weather", "search"};
    default: return std::set<std::string>{"search"};
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const ToolNames tools = tool_set(data[0]);
  const uint32_t seed = 1 + (data[1] | (data[2] << 8));
  const std::string block_start = "\n\n<" + std::string(kDsml) + "tool_calls>\n";
  const std::string text = block_start + std::string(reinterpret_cast<const char*>(data) + 3, size - 3);

  const Streamed whole = stream(text, tools, 0);
  if (!same(whole.msg, stream(text, tools, seed).msg)) std::abort();

  if (!tools) {
    ParsedMessage strict;
    bool accepted = true;
    try {
      strict = parse_completion(text, false);
    } catch (const Error&) {
      accepted = false;
    }
    if (accepted && (!same(strict, whole.msg) || !whole.error.empty())) std::abort();
    if (whole.error.empty() && utf8::valid(text))
      for (const auto& call : whole.msg.tool_calls) {
        auto args = nlohmann::json::parse(call.arguments_json, nullptr, false);
        if (!args.is_object()) std::abort();
      }
    return 0;
  }

  if (tools->empty()) {
    if (!whole.msg.tool_calls.empty() || whole.msg.content != text.substr(0, text.find(kEos))) std::abort();
    return 0;
  }

  const Streamed any = stream(text, std::nullopt, 0);
  size_t first_unoffered = 0;
  while (first_unoffered < any.msg.tool_calls.size() && tools->count(any.msg.tool_calls[first_unoffered].name))
    ++first_unoffered;
  if (first_unoffered == any.msg.tool_calls.size()) {
    if (!same(whole.msg, any.msg) || whole.error != any.error) std::abort();
    return 0;
  }
  // The calls before the first unoffered one stay calls; the DSML from it on is text.
  if (whole.msg.tool_calls.size() != first_unoffered || !same_calls(whole.msg, any.msg, first_unoffered)) std::abort();
  const std::string& kept = whole.msg.content;
  const std::string invoke_tag = "<" + std::string(kDsml) + "invoke";
  if (kept.rfind(first_unoffered == 0 ? block_start : invoke_tag, 0) != 0) std::abort();
  const bool ends_text = text.size() >= kept.size() && text.compare(text.size() - kept.size(), kept.size(), kept) == 0;
  if (!ends_text && text.find(kept + std::string(kEos)) == std::string::npos) std::abort();
  return 0;
}
