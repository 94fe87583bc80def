#pragma once
// DeepSeek-V4 chat format: OpenAI-shaped messages -> prompt text, byte-exact
// with the official Python encoder (encoding/encoding_dsv4.py of the model
// release) in its newest form, vLLM's deepseek_v4_encoding.py:
//   * BOS, then each message: system text, <｜User｜>..., assistant
//     [reasoning</think>]content[\n\n<｜DSML｜tool_calls>...]<｜end▁of▁sentence｜>,
//     <｜latest_reminder｜>..., developer (<｜User｜> + content + tools);
//   * after a user/developer turn (or a trailing system message / a system
//     message followed by an assistant turn): <｜Assistant｜> then <think>
//     (thinking mode, last turn or reasoning kept) or </think>;
//   * thinking mode drops earlier reasoning (and developer messages) before the
//     last user turn unless any message carries tools or drop_thinking=false;
//   * tool results (role "tool") merge into a user turn as <tool_result>...
//     blocks, sorted by the order of the preceding assistant's tool calls;
//   * consecutive assistant messages merge into one turn;
//   * the reasoning-effort preamble opens the prompt in thinking mode;
//   * per-message "task" (action/query/authority/domain/title/read_url) and
//     "wo_eos" fields of the official encoder are honoured.
//
// Messages: role "system" | "developer" | "user" | "assistant" | "tool" |
// "latest_reminder"; content is a string, null, or a list of
// {"type":"text","text":...} / {"type":"image_url"|"image"} parts (an image
// becomes the placeholder <｜deepseek_image｜>); assistant messages may carry
// "reasoning" or "reasoning_content" (both accepted; "reasoning" wins) and
// "tool_calls" [{"id","type":"function","function":{"name","arguments"}}]
// where arguments is a JSON object string (or an object, or null/"" = {});
// tool messages carry "tool_call_id" and content. System/developer messages may
// carry "tools" and "response_format" as in the official encoder.
//
// Use nlohmann::ordered_json: key order of tool schemas, response_format and
// arguments is part of the prompt bytes (a sorted-key json changes them).
//
// Errors (dsv4::Error, naming the message index): unknown role, developer
// without content, invalid task, tool-call arguments that are not a JSON
// object, missing function name, content of an unsupported type.
// Documented leniencies (where the Python encoder would crash or print a Python
// repr): list content on system/developer/assistant/latest_reminder messages is
// flattened like user content; user content null renders as "".
//
// Client text: render_chat_with_ranges() also returns the byte ranges of the prompt that came
// from the request (message content, reasoning, tool-call names and arguments, tool results,
// tool schemas, response formats) as opposed to the template's own
// text. Encoding with added-token matching off in those ranges (Tokenizer::encode(text, ranges))
// makes special-token text in content plain text. An image placeholder inside list content
// counts as client text.
#include <string>
#include <vector>

#include "text/pyjson.h"
#include "text/tokenizer.h"

namespace dsv4 {

enum class ThinkingMode { Chat, Thinking };

struct ChatOptions {
  ThinkingMode thinking = ThinkingMode::Chat;
  // "", "low", "high" or "max" ("" = "low"). Only used in thinking mode.
  std::string reasoning_effort;
  // The first V4 release: only "max" adds a preamble, and it is the text that
  // the newer encoder uses for "high"; "high"/"low" add nothing.
  bool legacy_effort = false;
  // Drop reasoning of assistant turns before the last user turn (thinking mode).
  bool drop_thinking = true;
  bool add_bos = true;
  // How special-token text in client text (see above) is tokenized: as the token (the official
  // encoder's and vLLM's behaviour) or as plain text. Rendering is the same either way;
  // encode_chat() reads it.
  enum class ContentSpecialTokens { Special, Plain };
  ContentSpecialTokens special_tokens_in_content = ContentSpecialTokens::Special;
};

// Parses "special" | "plain", the names of ContentSpecialTokens in requests and flags.
ChatOptions::ContentSpecialTokens content_special_tokens_from_name(const std::string& name);

// Parses "chat" | "thinking" | "max" (max = thinking with effort "max").
// Returns the options with thinking and reasoning_effort set.
ChatOptions chat_options_from_mode(const std::string& mode, ChatOptions base = {});

// Renders the prompt. `tools` (OpenAI list [{"type":"function","function":{...}}],
// null or empty for none) and `response_format` (null for none) are request
// level: as vLLM's DeepSeek-V4 tokenizer does, they are attached to the leading
// system or developer message (which renders "{content}\n\n## Tools ..."; they
// replace tools that message carries itself), and only when the conversation
// does not start with one, a system message carrying them is inserted first.
// (In thinking mode, a leading developer message before the last user turn is
// dropped with what it carries unless tools keep the history; see above.)
std::string render_chat(const ojson& messages, const ojson& tools, const ChatOptions& opts,
                        const ojson& response_format = nullptr);

struct RenderedChat {
  std::string text;                     // what render_chat() returns
  std::vector<ByteRange> client_ranges;  // the client text in it, sorted and disjoint
};
RenderedChat render_chat_with_ranges(const ojson& messages, const ojson& tools, const ChatOptions& opts,
                                     const ojson& response_format = nullptr);

// The prompt's tokens: special-token text in client ranges becomes the token or plain text, as
// `mode` says.
std::vector<int32_t> encode_chat(const Tokenizer& tok, const RenderedChat& chat, ChatOptions::ContentSpecialTokens mode);

// Special tokens of the format.
inline constexpr std::string_view kBos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view kThinkStart = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";
inline constexpr std::string_view kDsml = "｜DSML｜";
inline constexpr std::string_view kUserToken = "<｜User｜>";
inline constexpr std::string_view kAssistantToken = "<｜Assistant｜>";
inline constexpr std::string_view kLatestReminderToken = "<｜latest_reminder｜>";
inline constexpr std::string_view kImagePlaceholder = "<｜deepseek_image｜>";

}  // namespace dsv4
