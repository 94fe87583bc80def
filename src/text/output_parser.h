#pragma once
// DeepSeek-V4 completion parsing: generated text -> {reasoning, content, tool calls}.
//
// parse_completion() is the strict parser, equal to the official
// parse_message_from_completion_text(): the text must be exactly
//   [reasoning "</think>"]            (thinking mode only)
//   content
//   ( "<｜end▁of▁sentence｜>"
//   | "\n\n<｜DSML｜tool_calls>\n" invoke* "</｜DSML｜tool_calls>" ["<｜end▁of▁sentence｜>"] )
// with invoke = "<｜DSML｜invoke name=\"N\">\n" param* "</｜DSML｜invoke>\n" and
// param = "<｜DSML｜parameter name=\"K\" string=\"true|false\">V</｜DSML｜parameter>\n".
// Arguments are rebuilt as the official decoder does: "{" + ", ".join(json(K) +
// ": " + (json(V) if string="true" else V verbatim)) + "}". Any deviation throws
// dsv4::Error with the official message (missing </think>, missing EOS, tool-call
// format errors, duplicate parameter, special token in content, ...).
//
// StreamParser takes the same text as arbitrary byte deltas and emits
// OpenAI-style deltas: reasoning text, content text, tool-call start (name) and
// tool-call argument fragments (their concatenation is the arguments string).
// Guarantees:
//   * for every text that parse_completion() accepts, every way of splitting it
//     into deltas yields exactly parse_completion()'s result;
//   * no marker text (</think>, the "\n\n" before <｜DSML｜tool_calls, DSML tags,
//     EOS) and no prefix of one ever reaches reasoning or content: bytes that
//     could start a marker are held back until decided;
//   * text deltas end on UTF-8 character boundaries (an incomplete trailing
//     sequence is held back; finish() flushes whatever remains).
// Lenient behaviour on malformed output (never throws; error() describes it):
//   * thinking mode without </think>: everything is reasoning; EOS ends it;
//     "\n\n<｜DSML｜tool_calls" inside reasoning starts the tool calls;
//   * "<｜DSML｜tool_calls" in content without the blank line also starts them;
//   * missing EOS at the end is fine (the server may strip it);
//   * text after EOS is ignored;
//   * malformed DSML: the tool-call block is abandoned at the fault and the
//     rest of the text is dropped (tool calls already started stay, possibly
//     with incomplete arguments); a duplicate parameter is passed through.
// Deliberate differences from the official decoder, in both parsers:
//   * a string="false" value that is not valid JSON goes into the arguments as
//     a JSON string (the official decoder pastes it verbatim: invalid JSON).
// Tool names (StreamParser only; the server passes the tools the request offered):
//   * with a set of names, an invoke of any other name ends tool-call parsing:
//     the DSML text from the start of that invoke (from the block start when it
//     is the first) and everything after it up to EOS become content, as
//     vLLM keeps calls to unknown tools as text;
//   * with an empty set (no tools offered), DSML is never parsed: it is text.
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

struct ToolCall {
  std::string id;  // empty: the parser does not invent ids (the server assigns them)
  std::string name;
  std::string arguments_json;
};

struct ParsedMessage {
  std::string reasoning_content;
  std::string content;
  std::vector<ToolCall> tool_calls;
};

// Strict; throws dsv4::Error on malformed text.
ParsedMessage parse_completion(std::string_view text, bool thinking);

struct StreamDelta {
  enum class Kind { Reasoning, Content, ToolCallStart, ToolCallArgs };
  Kind kind;
  std::string text;  // reasoning/content text, tool name (ToolCallStart) or argument fragment
  int index = -1;    // tool-call index for ToolCallStart / ToolCallArgs
};

// The tools a request offered; nullopt: any name is a tool call (the official parser).
using ToolNames = std::optional<std::set<std::string>>;

class StreamParser {
 public:
  explicit StreamParser(bool thinking, ToolNames tools = std::nullopt);
  std::vector<StreamDelta> feed(std::string_view bytes);
  std::vector<StreamDelta> finish();
  bool eos_seen() const { return state_ == State::Done; }
  // Empty unless the text was malformed (see the lenient rules above).
  const std::string& error() const { return error_; }

 private:
  enum class State {
    Reasoning, Content, ToolsOpen, InvokeHeader, ParamHeader, ParamValue, ParamAfter, ToolsClosed, Done, Broken
  };
  void run(std::vector<StreamDelta>& out, bool final);
  bool step(std::vector<StreamDelta>& out, bool final);
  void emit_text(std::vector<StreamDelta>& out, StreamDelta::Kind kind, size_t n, bool final);
  void emit_value(std::vector<StreamDelta>& out, size_t n, bool final);
  void push(std::vector<StreamDelta>& out, StreamDelta::Kind kind, std::string text, int index = -1);
  void broken(const std::string& why);
  void consume(size_t n);
  bool offered(const std::string& name) const { return !tools_ || tools_->count(name) > 0; }
  void keep_block_as_text();  // the pending DSML (raw_) and the rest become content

  State state_;
  std::string buf_;
  size_t scanned_ = 0;  // bytes of buf_ already searched for markers in this state
  std::string error_;
  int tool_index_ = -1;
  bool first_param_ = true;
  bool param_is_string_ = false;
  std::set<std::string> param_names_;
  ToolNames tools_;
  bool dsml_;         // DSML tool calls are parsed (false: they are text)
  std::string raw_;   // DSML consumed since the pending block / invoke started
};

// Feeds the whole text to a StreamParser: the lenient parse (never throws).
ParsedMessage parse_completion_lenient(std::string_view text, bool thinking, std::string* error = nullptr,
                                       ToolNames tools = std::nullopt);

// Folds a delta into a message (tool calls are created by ToolCallStart).
void apply_delta(ParsedMessage& msg, const StreamDelta& d);

}  // namespace dsv4
