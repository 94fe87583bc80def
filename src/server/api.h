#pragma once
// OpenAI request mapping: request JSON -> internal request (pure; no HTTP, no engine, no
// tokenizer), so it can be unit-tested and fuzzed. Every rejection is an ApiError carrying the
// HTTP status, OpenAI's error type and the offending parameter.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "engine/engine.h"
#include "text/chat_format.h"
#include "text/pyjson.h"

namespace dsv4::server {

class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = {}, std::string type = {}, std::string code = {});
  int status;
  std::string type;   // invalid_request_error, authentication_error, not_found_error, ...
  std::string param;  // offending field ("messages[2].role"), or empty
  std::string code;   // e.g. context_length_exceeded, model_not_found
};

// {"error": {"message", "type", "param", "code"}} (param/code null when empty).
std::string error_body(const ApiError& e);

enum class Endpoint { Chat, Completion };
enum class ToolChoice { Auto, None, Required, Named };

struct ParsedRequest {
  Endpoint endpoint = Endpoint::Chat;
  std::string model;  // empty: the served model

  // Chat.
  ojson messages;                   // as given (validated by render_chat)
  ojson tools = nullptr;            // OpenAI tool list or null
  ojson response_format = nullptr;  // {"type":"json_object"|"json_schema",...} or null (text)
  ToolChoice tool_choice = ToolChoice::Auto;
  std::string tool_choice_name;  // Named
  bool parallel_tool_calls = true;
  ChatOptions chat;  // thinking mode, reasoning effort

  // Completions.
  std::string prompt_text;
  std::vector<int32_t> prompt_ids;
  bool prompt_is_ids = false;
  bool echo = false;

  SamplingParams sampling;           // max_tokens there only when max_tokens_set
  bool max_tokens_set = false;
  int32_t min_tokens = 0;
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage
  bool logprobs = false;             // chat: logprobs=true; completions: logprobs=k
  int32_t top_logprobs = 0;
  std::string user;
  bool skip_special_tokens = true;
  // Test hook (only honoured when the server runs with --enable-test-hooks): the text the
  // "model" is forced to produce, token by token, through the real engine's schedule.
  std::optional<std::string> forced_output;
};

struct ParseLimits {
  int32_t max_n = 16;
  int32_t max_top_logprobs = 20;
  int32_t max_stop = 16;
};

// Throw ApiError (400) for malformed JSON, wrong types and out-of-range values.
ParsedRequest parse_chat_request(std::string_view body, const ParseLimits& lim = {});
ParsedRequest parse_completion_request(std::string_view body, const ParseLimits& lim = {});
ParsedRequest parse_request(Endpoint ep, std::string_view body, const ParseLimits& lim = {});

// The tools actually offered to the model (tool_choice none: none; named: only that one;
// unknown name: ApiError). Returns null for none.
ojson effective_tools(const ParsedRequest& r);
// Renders the chat prompt text (render_chat with the request's options); ApiError on bad messages.
std::string render_chat_prompt(const ParsedRequest& r);

}  // namespace dsv4::server
