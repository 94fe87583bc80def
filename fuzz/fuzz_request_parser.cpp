// libFuzzer target for the OpenAI request mapping (src/server/api.cpp): JSON body -> request.
//
// Input: byte 0 selects the endpoint (bit 0: completions), the rest is the request body.
// Deep nesting without huge inputs: with bit 1 of byte 0 set, bytes 1..2 are a depth D (little
// endian, up to 65,535) and the first '@' of the body becomes D nested arrays around 1 (bit 2
// set: D nested objects {"a": ...}), so a 60-byte input reaches the 50,000 levels that once
// overflowed the parser's stack, anywhere in the body (e.g. tools[].function.parameters).
// Checks:
//   * nothing crashes or trips a sanitizer; the only exception that escapes parsing is
//     ApiError, always with a 4xx status and a non-empty message;
//   * an accepted chat request renders a prompt or fails with ApiError (400, param "messages"
//     or "tool_choice") -- never another exception;
//   * accepted requests keep their invariants: n >= 1, max_tokens >= 1 when set (0 for prompt
//     scoring: completions with echo and logprobs), logprobs
//     consistent with top_logprobs; the error body of a rejection is valid JSON.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <string_view>

#include <nlohmann/json.hpp>

#include "server/api.h"

using namespace dsv4;
using namespace dsv4::server;

namespace {

// The body with its first '@' replaced by `depth` nested levels around 1. Built with one
// allocation and a doubling copy: appending up to 65,535 levels one at a time (instrumented code)
// and re-copying the 400 KB result cost more than the parsing being fuzzed.
std::string nest(std::string_view body, size_t depth, bool objects) {
  const size_t at = body.find('@');
  if (at == std::string_view::npos) return std::string(body);
  const std::string_view open = objects ? "{\"a\":" : "[", close = objects ? "}" : "]";
  std::string out;
  out.reserve(body.size() + depth * (open.size() + close.size()));
  out.append(body.substr(0, at));
  const auto repeat = [&out](std::string_view unit, size_t count) {
    const size_t start = out.size(), total = unit.size() * count;
    if (total == 0) return;
    out.append(unit);
    while (out.size() - start < total) out.append(out, start, std::min(out.size() - start, total - (out.size() - start)));
  };
  repeat(open, depth);
  out += '1';
  repeat(close, depth);
  out.append(body.substr(at + 1));
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  Endpoint ep = (data[0] & 1) ? Endpoint::Completion : Endpoint::Chat;
  std::string_view input(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string deep_body;
  if (data[0] & 2) {
    if (input.size() < 2) return 0;
    size_t depth = uint8_t(input[0]) | (size_t(uint8_t(input[1])) << 8);
    deep_body = nest(input.substr(2), depth, data[0] & 4);
    input = deep_body;
  }
  std::string_view body = input;
  ParsedRequest r;
  try {
    r = parse_request(ep, body);
  } catch (const ApiError& e) {
    if (e.status < 400 || e.status >= 500 || std::string(e.what()).empty()) std::abort();
    (void)nlohmann::json::parse(error_body(e));  // throws (-> crash report) if not valid JSON
    return 0;
  }
  if (r.sampling.n < 1) std::abort();
  // max_tokens 0 is prompt scoring: completions with echo and logprobs only.
  const bool scoring = ep == Endpoint::Completion && r.echo && r.logprobs;
  if (r.max_tokens_set && r.sampling.max_tokens < (scoring ? 0 : 1)) std::abort();
  if (r.logprobs != (r.sampling.logprobs >= 0)) std::abort();
  if (ep == Endpoint::Completion && r.prompt_is_ids == r.prompt_ids.empty()) std::abort();
  if (ep == Endpoint::Chat) {
    try {
      std::string prompt = render_chat_prompt(r);
      if (prompt.empty()) std::abort();
    } catch (const ApiError& e) {
      if (e.status != 400) std::abort();
    }
  }
  return 0;
}
