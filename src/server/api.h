#pragma once
// OpenAI request mapping: request JSON -> internal request (pure; no HTTP, no engine, no
// tokenizer), so it can be unit-tested and fuzzed. Every rejection is an ApiError carrying the
// HTTP status, OpenAI's error type and the offending parameter.
#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "engine/engine.h"
#include "text/chat_format.h"
#include "text/pyjson.h"
#include "text/tokenizer.h"

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
  ChatOptions chat;  // thinking mode, reasoning effort, special tokens in content
  // The body set "special_tokens_in_content" (into chat); else the server's default applies.
  bool special_tokens_in_content_set = false;

  // Completions.
  std::string prompt_text;
  std::vector<int32_t> prompt_ids;
  bool prompt_is_ids = false;
  bool echo = false;

  SamplingParams sampling;           // max_tokens there only when max_tokens_set
  bool max_tokens_set = false;
  std::string max_tokens_key = "max_tokens";  // the field that set it (max_completion_tokens wins)
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
  size_t max_json_depth = 128;  // nesting of the request body (400 beyond)
};

// Throw ApiError (400) for malformed JSON, wrong types and out-of-range values.
ParsedRequest parse_chat_request(std::string_view body, const ParseLimits& lim = {});
ParsedRequest parse_completion_request(std::string_view body, const ParseLimits& lim = {});
ParsedRequest parse_request(Endpoint ep, std::string_view body, const ParseLimits& lim = {});

// The tools actually offered to the model (tool_choice none: none; named: only that one;
// unknown name: ApiError). Returns null for none.
ojson effective_tools(const ParsedRequest& r);
// Names of the tools actually offered (effective_tools): the output parser turns DSML calls
// of these into tool_calls and keeps any other DSML as text (empty set: all of it).
std::set<std::string> offered_tool_names(const ParsedRequest& r);
// Renders the chat prompt text (render_chat with the request's options); ApiError on bad messages.
std::string render_chat_prompt(const ParsedRequest& r);

// The rendered chat prompt and its tokens. Special-token text in client text (message content,
// tool results, ...) is tokenized as the request's "special_tokens_in_content" says, else as
// `server_default` (the serve flag --special-tokens-in-content) says. ApiError (400) on bad
// messages or text that cannot be tokenized.
struct ChatPrompt {
  std::string text;
  std::vector<int32_t> ids;
};
ChatPrompt chat_prompt_tokens(const ParsedRequest& r, const Tokenizer& tok,
                              ChatOptions::ContentSpecialTokens server_default);

// ---- response helpers (pure)

// A token as logprobs show it: its bytes when they are valid UTF-8, else "bytes:" and every byte
// as \xNN (OpenAI's form), so that distinct tokens never share a key in top_logprobs.
std::string logprob_token_text(std::string_view bytes);

// text_offset of the completions API, in characters (code points) of the text: feed the tokens'
// bytes in order; next() returns the offset of that token, the index of the character its
// first byte belongs to.
class TextOffsets {
 public:
  size_t next(std::string_view token_bytes);

 private:
  size_t chars_ = 0;  // characters started so far
};

// usage.completion_tokens_details.reasoning_tokens of one sample (thinking mode): its tokens
// that start before the first "</think>" of the generated bytes; all tokens before EOS when the
// model never closed its reasoning.
int32_t reasoning_token_count(const Tokenizer& tok, std::span<const int32_t> tokens);

}  // namespace dsv4::server
