#include "server/tokenize_api.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace dsv4::server {

namespace {

using json = nlohmann::json;

// Nesting depth is bounded before parsing (as parse_request does), so a deeply nested body is a
// 400 rather than deep recursion.
json parse_object(std::string_view body, const ParseLimits& lim) {
  size_t depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > lim.max_json_depth)
        throw ApiError(400, fmt::format("the request body is nested deeper than {} levels", lim.max_json_depth));
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) throw ApiError(400, "the request body is not valid JSON");
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object");
  return j;
}

std::string optional_model(const json& j) {
  if (!j.contains("model") || j["model"].is_null()) return {};
  if (!j["model"].is_string()) throw ApiError(400, "'model' must be a string", "model");
  return j["model"].get<std::string>();
}

bool optional_bool(const json& j, const char* name, bool fallback) {
  if (!j.contains(name) || j[name].is_null()) return fallback;
  if (!j[name].is_boolean()) throw ApiError(400, fmt::format("'{}' must be a boolean", name), name);
  return j[name].get<bool>();
}

}  // namespace

TokenizeRequest parse_tokenize_request(std::string_view body, const ParseLimits& lim) {
  json j = parse_object(body, lim);
  TokenizeRequest r;
  r.model = optional_model(j);
  r.return_token_strs = optional_bool(j, "return_token_strs", false);
  const bool has_messages = j.contains("messages"), has_prompt = j.contains("prompt");
  if (has_messages == has_prompt) throw ApiError(400, "give exactly one of 'prompt' and 'messages'", has_prompt ? "messages" : "prompt");
  if (has_messages) {
    r.chat = parse_chat_request(body, lim);
    r.add_special_tokens = false;  // the chat format carries its own BOS
    return r;
  }
  if (!j["prompt"].is_string()) throw ApiError(400, "'prompt' must be a string", "prompt");
  r.prompt = j["prompt"].get<std::string>();
  r.add_special_tokens = optional_bool(j, "add_special_tokens", true);
  return r;
}

DetokenizeRequest parse_detokenize_request(std::string_view body, const ParseLimits& lim) {
  json j = parse_object(body, lim);
  DetokenizeRequest r;
  r.model = optional_model(j);
  if (!j.contains("tokens") || !j["tokens"].is_array()) throw ApiError(400, "'tokens' must be a list of token ids", "tokens");
  const json& tokens = j["tokens"];
  r.tokens.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const json& t = tokens[i];
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
      throw ApiError(400, "token ids must be non-negative integers", fmt::format("tokens[{}]", i));
    r.tokens.push_back(int32_t(t.get<int64_t>()));
  }
  return r;
}

}  // namespace dsv4::server
