// DeepSeek-V4 prompt rendering; see chat_format.h. The structure follows the
// official encoder's passes (merge assistant runs, merge tool results into user
// turns, sort tool results, drop earlier reasoning, render message by message)
// so that every branch of it has a counterpart here.
#include "text/chat_format.h"

#include <algorithm>
#include <map>
#include <vector>

#include "util/error.h"

namespace dsv4 {

namespace {

constexpr const char* kIdxKey = "\x01dsv4_index";  // original message index, for errors

constexpr std::string_view kEffortHigh =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

constexpr std::string_view kEffortMax =
    "Reasoning Effort: Beyond maximum \xE2\x80\x94 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
    "resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
    "certain that no assumption remains unchecked and no error remains undiscovered.\n\n";

constexpr std::string_view kToolsTemplateHead =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<\xEF\xBD\x9C" "DSML\xEF\xBD\x9Ctool_calls>\" block like the following:\n\n"
    "<\xEF\xBD\x9C" "DSML\xEF\xBD\x9Ctool_calls>\n"
    "<\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cinvoke name=\"$TOOL_NAME\">\n"
    "<\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cparameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</"
    "\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cparameter>\n"
    "...\n"
    "</\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cinvoke>\n"
    "<\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cinvoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</\xEF\xBD\x9C" "DSML\xEF\xBD\x9Cinvoke>\n"
    "</\xEF\xBD\x9C" "DSML\xEF\xBD\x9Ctool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";

constexpr std::string_view kToolsTemplateTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

constexpr std::string_view kResponseFormatHead =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

const std::map<std::string, std::string_view>& task_tokens() {
  static const std::map<std::string, std::string_view> m = {
      {"action", "<｜action｜>"}, {"query", "<｜query｜>"},   {"authority", "<｜authority｜>"},
      {"domain", "<｜domain｜>"}, {"title", "<｜title｜>"},   {"read_url", "<｜read_url｜>"},
  };
  return m;
}

// Prompt text under construction and the ranges of it that came from the client. `+=` appends
// template text, add_client() client text.
struct PromptText {
  std::string text;
  std::vector<ByteRange> client;

  PromptText& operator+=(std::string_view s) {
    text += s;
    return *this;
  }
  void add_client(std::string_view s) {
    if (s.empty()) return;
    extend_client(text.size(), text.size() + s.size());
    text += s;
  }
  PromptText& operator+=(const PromptText& o) {
    const size_t shift = text.size();
    for (const ByteRange& r : o.client) extend_client(shift + r.begin, shift + r.end);
    text += o.text;
    return *this;
  }

 private:
  void extend_client(size_t begin, size_t end) {
    if (!client.empty() && client.back().end == begin) client.back().end = end;
    else client.push_back({begin, end});
  }
};

// Python truthiness of a JSON value.
bool truthy(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: return false;
    case ojson::value_t::boolean: return v.get<bool>();
    case ojson::value_t::number_integer: return v.get<int64_t>() != 0;
    case ojson::value_t::number_unsigned: return v.get<uint64_t>() != 0;
    case ojson::value_t::number_float: return v.get<double>() != 0.0;
    case ojson::value_t::string: return !v.get_ref<const std::string&>().empty();
    case ojson::value_t::array:
    case ojson::value_t::object: return !v.empty();
    default: return false;
  }
}

// msg.get(key): nullptr when absent.
const ojson* get(const ojson& m, const char* key) {
  auto it = m.find(key);
  return it == m.end() ? nullptr : &*it;
}
bool has_truthy(const ojson& m, const char* key) {
  const ojson* v = get(m, key);
  return v && truthy(*v);
}
bool not_none(const ojson& m, const char* key) {
  const ojson* v = get(m, key);
  return v && !v->is_null();
}
std::string role_of(const ojson& m) {
  const ojson* r = get(m, "role");
  if (r && r->is_string()) return r->get<std::string>();
  return r ? r->dump() : "null";
}
long idx_of(const ojson& m) {
  const ojson* v = get(m, kIdxKey);
  return v ? v->get<long>() : -1;
}

// flatten_content_blocks: text parts concatenated, images as the placeholder.
std::string flatten_list(const ojson& content, long idx) {
  std::string out;
  for (const auto& block : content) {
    if (block.is_string()) {
      out += block.get<std::string>();
    } else if (!block.is_object()) {
      fail("message {}: unsupported content part {}", idx, block.dump());
    } else {
      const ojson* t = get(block, "type");
      std::string type = t && t->is_string() ? t->get<std::string>() : (t ? t->dump() : "None");
      if (type == "image" || type == "image_url") {
        out += kImagePlaceholder;
      } else if (type == "text") {
        const ojson* text = get(block, "text");
        if (text && text->is_string()) out += text->get<std::string>();
        else if (text && !text->is_null()) fail("message {}: text part has non-string text", idx);
      } else {
        fail("message {}: unsupported content block type '{}'", idx, type);
      }
    }
  }
  return out;
}

// Content that the encoder formats as a string (content or "").
std::string text_or_empty(const ojson* v, long idx, const char* what) {
  if (!v || v->is_null()) return "";
  if (v->is_string()) return v->get<std::string>();
  if (v->is_array()) return flatten_list(*v, idx);
  fail("message {}: {} must be a string, a list of content parts or null, got {}", idx, what, v->dump());
}

PromptText render_tools(const ojson& tools, long idx) {
  if (!tools.is_array()) fail("message {}: tools must be a list", idx);
  PromptText out;
  out += kToolsTemplateHead;
  bool first = true;
  for (const auto& t : tools) {
    const ojson* fn = t.is_object() ? get(t, "function") : nullptr;
    if (!fn) fail("message {}: each tool needs a \"function\" object", idx);
    if (!first) out += "\n";
    first = false;
    out.add_client(py_json_dumps(*fn));
  }
  out += kToolsTemplateTail;
  return out;
}

PromptText render_response_format(const ojson& rf) {
  PromptText out;
  out += kResponseFormatHead;
  out.add_client(py_json_dumps(rf));
  return out;
}

// encode_arguments_to_dsml
PromptText encode_arguments(const ojson& raw, long idx) {
  ojson args;
  if (raw.is_null() || (raw.is_string() && raw.get_ref<const std::string&>().empty())) {
    args = ojson::object();
  } else if (raw.is_string()) {
    try {
      args = ojson::parse(raw.get<std::string>());
    } catch (const std::exception& e) {
      fail("message {}: tool call arguments are not valid JSON: {}", idx, e.what());
    }
    if (args.is_null()) args = ojson::object();
  } else {
    args = raw;
  }
  if (!args.is_object())
    fail("message {}: tool call arguments must be a JSON object, got {}", idx, py_json_dumps(args));
  PromptText out;
  bool first = true;
  for (auto it = args.begin(); it != args.end(); ++it) {
    if (!first) out += "\n";
    first = false;
    bool is_str = it.value().is_string();
    out += "<";
    out += kDsml;
    out += "parameter name=\"";
    out.add_client(it.key());
    out += std::string("\" string=\"") + (is_str ? "true" : "false") + "\">";
    out.add_client(is_str ? it.value().get<std::string>() : py_json_dumps(it.value()));
    out += "</";
    out += kDsml;
    out += "parameter>";
  }
  return out;
}

PromptText render_tool_calls(const ojson& tool_calls, long idx) {
  if (!tool_calls.is_array()) fail("message {}: tool_calls must be a list", idx);
  PromptText list;
  bool first = true;
  for (const auto& tc : tool_calls) {
    const ojson* fn = tc.is_object() ? get(tc, "function") : nullptr;
    if (!fn || !fn->is_object()) fail("message {}: each tool call needs a \"function\" object", idx);
    const ojson* name = get(*fn, "name");
    const ojson* args = get(*fn, "arguments");
    if (!name || !name->is_string()) fail("message {}: tool call function.name must be a string", idx);
    if (!args) fail("message {}: tool call function.arguments is missing", idx);
    if (!first) list += "\n";
    first = false;
    list += "<";
    list += kDsml;
    list += "invoke name=\"";
    list.add_client(name->get<std::string>());
    list += "\">\n";
    list += encode_arguments(*args, idx);
    list += "\n</";
    list += kDsml;
    list += "invoke>";
  }
  PromptText out;
  out += "\n\n<";
  out += kDsml;
  out += "tool_calls>\n";
  out += list;
  out += "\n</";
  out += kDsml;
  out += "tool_calls>";
  return out;
}

// _merge_assistant_run
ojson merge_assistant_run(const std::vector<ojson>& run) {
  if (run.size() == 1) return run[0];
  ojson combined = run[0];
  std::string content, reasoning;
  bool any_content = false, any_reasoning = false;
  ojson tool_calls = ojson::array();
  for (const auto& m : run) {
    if (has_truthy(m, "content")) {
      if (any_content) content += "\n\n";
      content += text_or_empty(get(m, "content"), idx_of(m), "content");
      any_content = true;
    }
    if (has_truthy(m, "reasoning")) {
      if (any_reasoning) reasoning += "\n\n";
      const ojson& r = m["reasoning"];
      if (!r.is_string()) fail("message {}: reasoning must be a string", idx_of(m));
      reasoning += r.get<std::string>();
      any_reasoning = true;
    }
    if (has_truthy(m, "tool_calls")) {
      if (!m["tool_calls"].is_array()) fail("message {}: tool_calls must be a list", idx_of(m));
      for (const auto& tc : m["tool_calls"]) tool_calls.push_back(tc);
    }
  }
  if (any_content) combined["content"] = content;
  else combined.erase("content");
  if (any_reasoning) combined["reasoning"] = reasoning;
  else combined.erase("reasoning");
  if (!tool_calls.empty()) combined["tool_calls"] = tool_calls;
  else combined.erase("tool_calls");
  for (const char* key : {"task", "wo_eos", "mask"}) {
    if (const ojson* v = get(run.back(), key)) combined[key] = *v;
    else combined.erase(key);
  }
  return combined;
}

std::vector<ojson> merge_consecutive_assistants(const std::vector<ojson>& msgs) {
  std::vector<ojson> merged, run;
  for (const auto& m : msgs) {
    if (role_of(m) == "assistant") {
      run.push_back(m);
      continue;
    }
    if (!run.empty()) {
      merged.push_back(merge_assistant_run(run));
      run.clear();
    }
    merged.push_back(m);
  }
  if (!run.empty()) merged.push_back(merge_assistant_run(run));
  return merged;
}

// merge_tool_messages
std::vector<ojson> merge_tool_messages(const std::vector<ojson>& msgs) {
  std::vector<ojson> merged;
  auto last_is_user_with_blocks = [&] {
    return !merged.empty() && role_of(merged.back()) == "user" && merged.back().contains("content_blocks");
  };
  for (const auto& m : msgs) {
    std::string role = role_of(m);
    if (role == "tool") {
      ojson block = {{"type", "tool_result"},
                     {"tool_use_id", m.value("tool_call_id", ojson(""))},
                     {"content", m.value("content", ojson(""))}};
      if (last_is_user_with_blocks()) {
        merged.back()["content_blocks"].push_back(block);
      } else {
        ojson u = {{"role", "user"}, {"content_blocks", ojson::array({block})}};
        u[kIdxKey] = idx_of(m);
        merged.push_back(u);
      }
    } else if (role == "user") {
      ojson text;
      const ojson* c = get(m, "content");
      if (!c) text = "";
      else if (c->is_array()) text = flatten_list(*c, idx_of(m));
      else text = *c;
      ojson block = {{"type", "text"}, {"text", text}};
      if (last_is_user_with_blocks() && !not_none(merged.back(), "task")) {
        merged.back()["content_blocks"].push_back(block);
      } else {
        ojson u = {{"role", "user"}, {"content", text}, {"content_blocks", ojson::array({block})}};
        for (const char* key : {"task", "wo_eos", "mask"})
          if (const ojson* v = get(m, key)) u[key] = *v;
        u[kIdxKey] = idx_of(m);
        merged.push_back(u);
      }
    } else {
      merged.push_back(m);
    }
  }
  return merged;
}

// Key for matching tool_call ids with tool_call_id values (Python dict keys).
std::string id_key(const ojson& v) { return v.is_string() ? "s" + v.get<std::string>() : "j" + v.dump(); }

// sort_tool_results_by_call_order
void sort_tool_results(std::vector<ojson>& msgs) {
  std::map<std::string, long> order;
  for (auto& m : msgs) {
    std::string role = role_of(m);
    if (role == "assistant" && has_truthy(m, "tool_calls")) {
      order.clear();
      long i = 0;
      for (const auto& tc : m["tool_calls"]) {
        ojson id;
        if (tc.is_object()) {
          if (has_truthy(tc, "id")) id = tc["id"];
          else if (const ojson* fn = get(tc, "function"); fn && fn->is_object() && get(*fn, "id")) id = (*fn)["id"];
        }
        if (truthy(id)) order[id_key(id)] = i;
        ++i;
      }
    } else if (role == "user" && has_truthy(m, "content_blocks")) {
      auto& blocks = m["content_blocks"];
      std::vector<ojson> tool_blocks;
      for (const auto& b : blocks)
        if (b.value("type", "") == "tool_result") tool_blocks.push_back(b);
      if (tool_blocks.size() > 1 && !order.empty()) {
        auto key = [&](const ojson& b) -> long {
          const ojson* id = get(b, "tool_use_id");
          if (!id || id->is_null()) return 0;
          auto it = order.find(id_key(*id));
          return it == order.end() ? 0 : it->second;
        };
        std::stable_sort(tool_blocks.begin(), tool_blocks.end(),
                         [&](const ojson& a, const ojson& b) { return key(a) < key(b); });
        size_t k = 0;
        for (auto& b : blocks)
          if (b.value("type", "") == "tool_result") b = tool_blocks[k++];
      }
    }
  }
}

long find_last_user(const std::vector<ojson>& msgs) {
  for (long i = static_cast<long>(msgs.size()) - 1; i >= 0; --i) {
    std::string r = role_of(msgs[static_cast<size_t>(i)]);
    if (r == "user" || r == "developer") return i;
  }
  return -1;
}

// _drop_thinking_messages
std::vector<ojson> drop_thinking_messages(const std::vector<ojson>& msgs) {
  long last_user = find_last_user(msgs);
  std::vector<ojson> out;
  for (long i = 0; i < static_cast<long>(msgs.size()); ++i) {
    const ojson& m = msgs[static_cast<size_t>(i)];
    std::string role = role_of(m);
    bool keep = role == "user" || role == "system" || role == "tool" || role == "latest_reminder" ||
                role == "direct_search_results";
    if (keep || i >= last_user) {
      out.push_back(m);
    } else if (role == "assistant") {
      ojson c = m;
      c.erase("reasoning");
      out.push_back(c);
    }
    // developer and other roles before the last user turn are dropped
  }
  return out;
}

std::string tool_result_text(const ojson& c, long idx) {
  if (c.is_string()) return c.get<std::string>();
  if (c.is_null()) return "None";  // Python formats None
  if (c.is_array()) {
    std::string out;
    bool first = true;
    for (const auto& b : c) {
      if (!b.is_object()) fail("message {}: tool result parts must be objects", idx);
      if (!first) out += "\n\n";
      first = false;
      const ojson* t = get(b, "type");
      if (t && t->is_string() && t->get<std::string>() == "text") {
        const ojson* text = get(b, "text");
        if (text && text->is_string()) out += text->get<std::string>();
        else if (text && !text->is_null()) fail("message {}: tool result text must be a string", idx);
      } else {
        out += "[Unsupported " + (t ? (t->is_string() ? t->get<std::string>() : t->dump()) : std::string("None")) + "]";
      }
    }
    return out;
  }
  fail("message {}: tool result content must be a string, a list of parts or null", idx);
}

struct Renderer {
  const std::vector<ojson>& msgs;
  ThinkingMode mode;
  bool drop_thinking;
  const ChatOptions& opts;
  long last_user;

  std::string effort_text() const {
    const std::string& e = opts.reasoning_effort;
    if (opts.legacy_effort) {
      if (e.empty() || e == "low" || e == "high") return "";
      if (e == "max") return std::string(kEffortHigh);
      fail("invalid reasoning effort '{}': expected low, high or max", e);
    }
    if (e.empty() || e == "low") return "";
    if (e == "high") return std::string(kEffortHigh);
    if (e == "max") return std::string(kEffortMax);
    fail("invalid reasoning effort '{}': expected low, high or max", e);
  }

  PromptText render(long index) const {
    const ojson& msg = msgs[static_cast<size_t>(index)];
    const long idx = idx_of(msg);
    const bool thinking = mode == ThinkingMode::Thinking;
    PromptText prompt;
    const std::string role = role_of(msg);
    const ojson* content = get(msg, "content");

    std::string effort = effort_text();
    if (index == 0 && thinking) prompt += effort;

    auto add_tools_and_format = [&] {
      if (has_truthy(msg, "tools")) {
        PromptText tools = render_tools(msg["tools"], idx);
        prompt += "\n\n";
        prompt += tools;
      }
      if (has_truthy(msg, "response_format")) {
        prompt += "\n\n";
        prompt += render_response_format(msg["response_format"]);
      }
    };
    if (role == "system") {
      prompt.add_client(text_or_empty(content, idx, "content"));
      add_tools_and_format();
    } else if (role == "developer") {
      if (!content || !truthy(*content)) fail("message {}: developer message needs non-empty content", idx);
      prompt += kUserToken;
      prompt.add_client(text_or_empty(content, idx, "content"));
      add_tools_and_format();
    } else if (role == "user") {
      prompt += kUserToken;
      const ojson* blocks = get(msg, "content_blocks");
      if (blocks && truthy(*blocks)) {
        bool first = true;
        for (const auto& b : *blocks) {
          if (!first) prompt += "\n\n";
          first = false;
          std::string type = b.value("type", "");
          if (type == "text") {
            const ojson* t = get(b, "text");
            if (t && t->is_string()) prompt.add_client(t->get<std::string>());
            else if (t && !t->is_null()) fail("message {}: content must be a string, a list of parts or null", idx);
          } else if (type == "image" || type == "image_url") {
            prompt += kImagePlaceholder;
          } else if (type == "tool_result") {
            const ojson* c = get(b, "content");
            std::string result = tool_result_text(c ? *c : ojson(""), idx);
            prompt += "<tool_result>";
            prompt.add_client(result);
            prompt += "</tool_result>";
          } else {
            prompt += "[Unsupported ";
            prompt.add_client(type);
            prompt += "]";
          }
        }
      } else {
        prompt.add_client(text_or_empty(content, idx, "content"));
      }
    } else if (role == "latest_reminder") {
      prompt += kLatestReminderToken;
      if (content && !content->is_null()) prompt.add_client(text_or_empty(content, idx, "content"));
      else prompt += "None";
    } else if (role == "assistant") {
      PromptText tc;
      if (has_truthy(msg, "tool_calls")) tc = render_tool_calls(msg["tool_calls"], idx);
      std::string summary = text_or_empty(content, idx, "content");
      std::string reasoning;
      if (const ojson* r = get(msg, "reasoning"); r && truthy(*r)) {
        if (!r->is_string()) fail("message {}: reasoning must be a string", idx);
        reasoning = r->get<std::string>();
      }
      bool prev_has_task = index >= 1 && not_none(msgs[static_cast<size_t>(index - 1)], "task");
      if (thinking && !prev_has_task && (!drop_thinking || index > last_user)) {
        prompt.add_client(reasoning);
        prompt += kThinkEnd;
      }
      prompt.add_client(summary);
      prompt += tc;
      if (!has_truthy(msg, "wo_eos")) prompt += kEos;
    } else {
      fail("message {}: unknown role '{}' (expected system, developer, user, assistant, tool or latest_reminder)",
           idx, role);
    }

    const long n = static_cast<long>(msgs.size());
    if (index + 1 < n) {
      std::string next = role_of(msgs[static_cast<size_t>(index + 1)]);
      if (next != "assistant" && next != "latest_reminder") return prompt;
    }

    if (not_none(msg, "task")) {
      const ojson& task = msg["task"];
      std::string t = task.is_string() ? task.get<std::string>() : task.dump();
      auto it = task_tokens().find(t);
      if (it == task_tokens().end())
        fail("message {}: invalid task '{}' (expected action, query, authority, domain, title or read_url)", idx, t);
      if (t != "action") {
        prompt += it->second;
      } else {
        prompt += kAssistantToken;
        prompt += thinking ? kThinkStart : kThinkEnd;
        prompt += it->second;
      }
    } else if (role == "user" || role == "developer" ||
               (role == "system" &&
                (index == n - 1 || role_of(msgs[static_cast<size_t>(index + 1)]) == "assistant"))) {
      prompt += kAssistantToken;
      if (!drop_thinking && thinking) prompt += kThinkStart;
      else if (drop_thinking && thinking && index >= last_user) prompt += kThinkStart;
      else prompt += kThinkEnd;
    }
    return prompt;
  }
};

}  // namespace

ChatOptions::ContentSpecialTokens content_special_tokens_from_name(const std::string& name) {
  if (name == "special") return ChatOptions::ContentSpecialTokens::Special;
  if (name == "plain") return ChatOptions::ContentSpecialTokens::Plain;
  fail("invalid special-token handling '{}': expected special or plain", name);
}

ChatOptions chat_options_from_mode(const std::string& mode, ChatOptions base) {
  if (mode == "chat") {
    base.thinking = ThinkingMode::Chat;
  } else if (mode == "thinking") {
    base.thinking = ThinkingMode::Thinking;
  } else if (mode == "max") {
    base.thinking = ThinkingMode::Thinking;
    base.reasoning_effort = "max";
  } else {
    fail("invalid thinking mode '{}': expected chat, thinking or max", mode);
  }
  return base;
}

std::string render_chat(const ojson& messages, const ojson& tools, const ChatOptions& opts,
                        const ojson& response_format) {
  return render_chat_with_ranges(messages, tools, opts, response_format).text;
}

std::vector<int32_t> encode_chat(const Tokenizer& tok, const RenderedChat& chat, ChatOptions::ContentSpecialTokens mode) {
  if (mode == ChatOptions::ContentSpecialTokens::Special) return tok.encode(chat.text);
  return tok.encode(chat.text, chat.client_ranges);
}

RenderedChat render_chat_with_ranges(const ojson& messages, const ojson& tools, const ChatOptions& opts,
                                     const ojson& response_format) {
  if (!messages.is_array()) fail("messages must be a JSON list");
  std::vector<ojson> msgs;
  long i = 0;
  for (const auto& m : messages) {
    if (!m.is_object()) fail("message {}: must be a JSON object", i);
    ojson c = m;
    c[kIdxKey] = i;
    // Both field names of the reasoning text are accepted; "reasoning" wins.
    if (!not_none(c, "reasoning") && not_none(c, "reasoning_content")) c["reasoning"] = c["reasoning_content"];
    std::string role = role_of(c);
    if (role != "user" && role != "tool" && c.contains("content") && c["content"].is_array())
      c["content"] = flatten_list(c["content"], i);
    msgs.push_back(std::move(c));
    ++i;
  }
  // Request-level tools / response_format go to the leading system or developer message (they
  // replace tools it carries itself), else into a system message inserted first.
  if (truthy(tools) || !response_format.is_null()) {
    std::string head = msgs.empty() ? "" : role_of(msgs.front());
    if (head != "system" && head != "developer") {
      ojson sys = {{"role", "system"}};
      sys[kIdxKey] = -1;
      msgs.insert(msgs.begin(), std::move(sys));
    }
    if (truthy(tools)) msgs.front()["tools"] = tools;
    if (!response_format.is_null()) msgs.front()["response_format"] = response_format;
  }

  msgs = merge_consecutive_assistants(msgs);
  msgs = merge_tool_messages(msgs);
  sort_tool_results(msgs);

  PromptText prompt;
  if (opts.add_bos) prompt += kBos;
  bool drop = opts.drop_thinking;
  for (const auto& m : msgs)
    if (has_truthy(m, "tools")) drop = false;
  if (opts.thinking == ThinkingMode::Thinking && drop) msgs = drop_thinking_messages(msgs);

  Renderer r{msgs, opts.thinking, drop, opts, find_last_user(msgs)};
  for (long k = 0; k < static_cast<long>(msgs.size()); ++k) prompt += r.render(k);
  return {std::move(prompt.text), std::move(prompt.client)};
}

}  // namespace dsv4
