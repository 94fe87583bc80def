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
//   * accepted requests keep their invariants: n >= 1, max_tokens >= 1 when set, logprobs
//     consistent with top_logprobs; the error body of a rejection is valid JSON.
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

std::string nest(std::string_view body, size_t depth, bool objects) {
  std::string out(body);
  size_t at = out.find('@');
  if (at == std::string::npos) return out;
  std::string deep;
  const std::string_view open = objects ? "{\"a\":" : "[", close = objects ? "}" : "]";
  deep.reserve(depth * (open.size() + close.size()) + 1);
  for (size_t i = 0; i < depth; ++i) deep += open;
  deep += '1';
  for (size_t i = 0; i < depth; ++i) deep += close;
  out.replace(at, 1, deep);
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
  if (r.max_tokens_set && r.sampling.max_tokens < 1) std::abort();
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
