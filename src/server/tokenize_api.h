#pragma once
// Request shapes of vLLM's /tokenize and /detokenize (pure parsing, like api.h): /tokenize takes
// either a completion-style `prompt` or a chat-style `messages` list (rendered exactly as
// /v1/chat/completions would render it); /detokenize takes `tokens`.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "server/api.h"

namespace dsv4::server {

struct TokenizeRequest {
  std::string model;                  // empty: the served model
  std::optional<std::string> prompt;  // completion form
  std::optional<ParsedRequest> chat;  // chat form (`messages` given)
  bool add_special_tokens = true;     // completion form: prepend BOS unless the text starts with it
  bool return_token_strs = false;     // also return each token as text
};

struct DetokenizeRequest {
  std::string model;
  std::vector<int32_t> tokens;
};

// ApiError (400) naming the field for malformed bodies, missing fields and wrong types.
TokenizeRequest parse_tokenize_request(std::string_view body, const ParseLimits& lim = {});
DetokenizeRequest parse_detokenize_request(std::string_view body, const ParseLimits& lim = {});

}  // namespace dsv4::server
