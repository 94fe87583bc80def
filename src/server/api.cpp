#include "server/api.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

#include "util/error.h"
#include "util/utf8.h"

namespace dsv4::server {

ApiError::ApiError(int status_, std::string message, std::string param_, std::string type_, std::string code_)
    : std::runtime_error(std::move(message)),
      status(status_),
      type(std::move(type_)),
      param(std::move(param_)),
      code(std::move(code_)) {
  if (type.empty()) {
    switch (status) {
      case 401: type = "authentication_error"; break;
      case 403: type = "permission_error"; break;
      case 404: type = "not_found_error"; break;
      case 413: type = "invalid_request_error"; break;
      case 429: type = "rate_limit_error"; break;
      case 503: type = "service_unavailable_error"; break;
      default: type = status >= 500 ? "server_error" : "invalid_request_error";
    }
  }
}

std::string error_body(const ApiError& e) {
  nlohmann::json j;
  j["error"]["message"] = e.what();
  j["error"]["type"] = e.type;
  j["error"]["param"] = e.param.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.param);
  j["error"]["code"] = e.code.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.code);
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& msg) { throw ApiError(400, msg, param); }

const char* type_name(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: return "null";
    case ojson::value_t::boolean: return "boolean";
    case ojson::value_t::string: return "string";
    case ojson::value_t::array: return "array";
    case ojson::value_t::object: return "object";
    case ojson::value_t::number_float: return "number";
    default: return "integer";
  }
}

[[noreturn]] void wrong_type(const std::string& param, const char* want, const ojson& v) {
  bad(param, fmt::format("'{}' must be {}, got {}", param, want, type_name(v)));
}

// Field accessors: absent or null -> nullopt / default.
const ojson* field(const ojson& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> get_number(const ojson& o, const char* key, double lo, double hi) {
  const ojson* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrong_type(key, "a number", *v);
  double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) bad(key, fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, d));
  return d;
}

std::optional<int64_t> get_int(const ojson& o, const char* key, int64_t lo, int64_t hi) {
  const ojson* v = field(o, key);
  if (!v) return std::nullopt;
  int64_t x;
  if (v->is_number_integer()) {
    if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX)) bad(key, fmt::format("'{}' is out of range", key));
    x = v->get<int64_t>();
  } else if (v->is_number_float() && std::isfinite(v->get<double>()) && std::floor(v->get<double>()) == v->get<double>() &&
             std::fabs(v->get<double>()) < 9e15) {
    x = int64_t(v->get<double>());
  } else {
    wrong_type(key, "an integer", *v);
  }
  if (x < lo || x > hi) bad(key, fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, x));
  return x;
}

std::optional<bool> get_bool(const ojson& o, const char* key) {
  const ojson* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong_type(key, "a boolean", *v);
  return v->get<bool>();
}

std::optional<std::string> get_string(const ojson& o, const char* key) {
  const ojson* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong_type(key, "a string", *v);
  return v->get<std::string>();
}

// An array of token ids; an entry that is not one names itself (`param[i]`) in the error.
std::vector<int32_t> token_ids(const ojson& a, const std::string& param) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < a.size(); ++i) {
    const ojson& t = a[i];
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
      bad(fmt::format("{}[{}]", param, i), fmt::format("'{}' entries must be non-negative integer token ids", param));
    ids.push_back(int32_t(t.get<int64_t>()));
  }
  return ids;
}

ojson parse_body(std::string_view body, const ParseLimits& lim) {
  // Bounded before parsing: the JSON walks after it (copies, prompt rendering of tool schemas)
  // recurse once per level.
  if (size_t at = json_depth_exceeded_at(body, lim.max_json_depth); at != std::string_view::npos)
    bad("", fmt::format("the request JSON is nested deeper than {} levels (at byte {})", lim.max_json_depth, at));
  ojson j;
  try {
    j = ojson::parse(body.begin(), body.end());
  } catch (const std::exception& e) {
    std::string what = e.what();
    // nlohmann prefixes "[json.exception.parse_error.101] "; keep the useful part.
    auto p = what.find("] ");
    bad("", "malformed JSON body: " + (p == std::string::npos ? what : what.substr(p + 2)));
  }
  if (!j.is_object()) bad("", fmt::format("the request body must be a JSON object, got {}", type_name(j)));
  return j;
}

// reasoning_effort values, mapped as vLLM's DeepSeek-V4 tokenizer does: "none" turns thinking
// off; minimal/low/medium -> low, high/xhigh -> high, max -> max.
constexpr const char* kEffortValues = "none, minimal, low, medium, high, xhigh, max";

// The encoder's effort for `e` ("" for "none"); ApiError naming `param` for an unknown value.
std::string effort_level(const std::string& e, const char* param) {
  if (e == "none") return "";
  if (e == "minimal" || e == "low" || e == "medium") return "low";
  if (e == "high" || e == "xhigh") return "high";
  if (e == "max") return "max";
  bad(param, fmt::format("'{}' must be one of {}; got '{}'", param, kEffortValues, e));
}

void parse_common(const ojson& j, ParsedRequest& r, const ParseLimits& lim) {
  if (auto m = get_string(j, "model")) r.model = *m;
  SamplingParams& s = r.sampling;
  if (auto v = get_number(j, "temperature", 0, 100)) s.temperature = float(*v);
  if (auto v = get_number(j, "top_p", 0, 1)) {
    if (*v <= 0) bad("top_p", "'top_p' must be in (0, 1]");
    s.top_p = float(*v);
  }
  if (auto v = get_int(j, "top_k", -1, 1 << 30)) s.top_k = *v < 0 ? 0 : int32_t(*v);
  if (auto v = get_number(j, "min_p", 0, 1)) s.min_p = float(*v);
  if (auto v = get_number(j, "presence_penalty", -2, 2)) s.presence_penalty = float(*v);
  if (auto v = get_number(j, "frequency_penalty", -2, 2)) s.frequency_penalty = float(*v);
  if (auto v = get_number(j, "repetition_penalty", 0, 100)) {
    if (*v <= 0) bad("repetition_penalty", "'repetition_penalty' must be > 0");
    s.repetition_penalty = float(*v);
  }
  if (const ojson* v = field(j, "seed")) {
    if (v->is_number_unsigned()) s.seed = v->get<uint64_t>();
    else if (v->is_number_integer()) s.seed = uint64_t(v->get<int64_t>());
    else wrong_type("seed", "an integer", *v);
  }
  // max_completion_tokens wins over the deprecated max_tokens.
  // 0 is only meaningful for /v1/completions with echo (scoring the prompt): checked there.
  for (const char* key : {"max_tokens", "max_completion_tokens"}) {
    if (auto v = get_int(j, key, 0, INT32_MAX)) {
      s.max_tokens = int32_t(*v);
      r.max_tokens_set = true;
      r.max_tokens_key = key;
    }
  }
  if (auto v = get_int(j, "min_tokens", 0, INT32_MAX)) r.min_tokens = int32_t(*v);
  if (const ojson* v = field(j, "stop")) {
    if (v->is_string()) {
      if (!v->get<std::string>().empty()) s.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      if (int64_t(v->size()) > lim.max_stop) bad("stop", fmt::format("'stop' has at most {} entries", lim.max_stop));
      for (size_t i = 0; i < v->size(); ++i) {
        if (!(*v)[i].is_string()) wrong_type(fmt::format("stop[{}]", i), "a string", (*v)[i]);
        if (!(*v)[i].get<std::string>().empty()) s.stop.push_back((*v)[i].get<std::string>());
      }
    } else {
      wrong_type("stop", "a string or an array of strings", *v);
    }
  }
  if (const ojson* v = field(j, "stop_token_ids")) {
    if (!v->is_array()) wrong_type("stop_token_ids", "an array of integers", *v);
    s.stop_token_ids = token_ids(*v, "stop_token_ids");
  }
  if (auto v = get_bool(j, "ignore_eos")) s.ignore_eos = *v;
  if (auto v = get_int(j, "n", 1, lim.max_n)) s.n = int32_t(*v);
  if (auto v = get_bool(j, "stream")) r.stream = *v;
  if (const ojson* v = field(j, "stream_options")) {
    if (!v->is_object()) wrong_type("stream_options", "an object", *v);
    if (!r.stream) bad("stream_options", "'stream_options' is only allowed with \"stream\": true");
    if (auto u = get_bool(*v, "include_usage")) r.include_usage = *u;
  }
  if (auto u = get_string(j, "user")) r.user = *u;
  if (auto v = get_bool(j, "skip_special_tokens")) r.skip_special_tokens = *v;
  if (auto v = get_string(j, "dsv4_forced_output")) r.forced_output = *v;
  if (const ojson* v = field(j, "logit_bias")) {
    if (!v->is_object()) wrong_type("logit_bias", "an object", *v);
    if (!v->empty()) bad("logit_bias", "'logit_bias' is not supported");
  }
}

void parse_thinking(const ojson& j, ParsedRequest& r) {
  std::optional<bool> thinking;
  std::string effort;
  if (const ojson* k = field(j, "chat_template_kwargs")) {
    if (!k->is_object()) wrong_type("chat_template_kwargs", "an object", *k);
    for (const char* key : {"thinking", "enable_thinking"}) {
      if (const ojson* t = field(*k, key)) {
        if (!t->is_boolean()) wrong_type(fmt::format("chat_template_kwargs.{}", key), "a boolean", *t);
        thinking = t->get<bool>();
      }
    }
    if (auto e = get_string(*k, "reasoning_effort")) {
      effort = effort_level(*e, "chat_template_kwargs.reasoning_effort");
      if (*e == "none") thinking = false;
    }
    if (auto d = get_bool(*k, "drop_thinking")) r.chat.drop_thinking = *d;
  }
  if (const ojson* t = field(j, "thinking")) {
    if (t->is_boolean()) {
      thinking = t->get<bool>();
    } else if (t->is_object()) {
      auto type = get_string(*t, "type");
      if (!type || (*type != "enabled" && *type != "disabled"))
        bad("thinking.type", "'thinking.type' must be \"enabled\" or \"disabled\"");
      thinking = *type == "enabled";
    } else {
      wrong_type("thinking", "an object {\"type\": \"enabled\"|\"disabled\"}", *t);
    }
  }
  if (auto e = get_string(j, "reasoning_effort")) {
    effort = effort_level(*e, "reasoning_effort");
    if (*e == "none") thinking = false;         // as vLLM: "none" is chat mode
    else if (!thinking) thinking = true;        // asking for an effort asks for reasoning
  }
  r.chat.thinking = thinking.value_or(false) ? ThinkingMode::Thinking : ThinkingMode::Chat;
  r.chat.reasoning_effort = effort;
}

void parse_tools(const ojson& j, ParsedRequest& r) {
  if (const ojson* t = field(j, "tools")) {
    if (!t->is_array()) wrong_type("tools", "an array", *t);
    for (size_t i = 0; i < t->size(); ++i) {
      const ojson& tool = (*t)[i];
      std::string p = fmt::format("tools[{}]", i);
      if (!tool.is_object()) wrong_type(p, "an object", tool);
      auto type = get_string(tool, "type");
      if (type && *type != "function") bad(p + ".type", "only tools of type \"function\" are supported");
      const ojson* fn = field(tool, "function");
      if (!fn || !fn->is_object()) bad(p + ".function", fmt::format("'{}.function' must be an object", p));
      const ojson* name = field(*fn, "name");
      if (!name || !name->is_string() || name->get<std::string>().empty())
        bad(p + ".function.name", fmt::format("'{}.function.name' must be a non-empty string", p));
      if (const ojson* params = field(*fn, "parameters"); params && !params->is_object())
        wrong_type(p + ".function.parameters", "an object", *params);
    }
    if (!t->empty()) r.tools = *t;
  }
  if (const ojson* c = field(j, "tool_choice")) {
    if (c->is_string()) {
      std::string s = c->get<std::string>();
      if (s == "auto") r.tool_choice = ToolChoice::Auto;
      else if (s == "none") r.tool_choice = ToolChoice::None;
      else if (s == "required") r.tool_choice = ToolChoice::Required;
      else bad("tool_choice", fmt::format("'tool_choice' must be auto, none, required or a named function; got '{}'", s));
    } else if (c->is_object()) {
      const ojson* fn = field(*c, "function");
      const ojson* name = fn && fn->is_object() ? field(*fn, "name") : nullptr;
      if (!name || !name->is_string())
        bad("tool_choice.function.name", "a named 'tool_choice' needs {\"type\": \"function\", \"function\": {\"name\": ...}}");
      r.tool_choice = ToolChoice::Named;
      r.tool_choice_name = name->get<std::string>();
    } else {
      wrong_type("tool_choice", "a string or an object", *c);
    }
    if ((r.tool_choice == ToolChoice::Required || r.tool_choice == ToolChoice::Named) && r.tools.is_null())
      bad("tool_choice", "'tool_choice' requires 'tools'");
    if (r.tool_choice == ToolChoice::Named) effective_tools(r);  // validates the name
  }
  if (auto p = get_bool(j, "parallel_tool_calls")) r.parallel_tool_calls = *p;
}

void parse_messages(const ojson& j, ParsedRequest& r, const ParseLimits& lim) {
  const ojson* m = field(j, "messages");
  if (!m) bad("messages", "'messages' is required");
  if (!m->is_array()) wrong_type("messages", "an array", *m);
  if (m->empty()) bad("messages", "'messages' must not be empty");
  static const char* roles[] = {"system", "developer", "user", "assistant", "tool", "latest_reminder"};
  for (size_t i = 0; i < m->size(); ++i) {
    const ojson& msg = (*m)[i];
    std::string p = fmt::format("messages[{}]", i);
    if (!msg.is_object()) wrong_type(p, "an object", msg);
    const ojson* role = field(msg, "role");
    if (!role || !role->is_string()) bad(p + ".role", fmt::format("'{}.role' must be a string", p));
    bool known = false;
    for (const char* k : roles) known |= role->get<std::string>() == k;
    if (!known) bad(p + ".role", fmt::format("'{}.role' '{}' is not one of system, developer, user, assistant, tool", p,
                                             role->get<std::string>()));
    const std::string& rname = role->get_ref<const std::string&>();
    const ojson* c = field(msg, "content");
    if (c && !c->is_string() && !c->is_array()) wrong_type(p + ".content", "a string or an array of content parts", *c);
    if (!c && rname == "user") bad(p + ".content", fmt::format("'{}.content' is required for a user message", p));
    if (c && c->is_array()) {
      for (size_t k = 0; k < c->size(); ++k) {
        std::string q = fmt::format("{}.content[{}]", p, k);
        const ojson& part = (*c)[k];
        if (!part.is_object()) wrong_type(q, "an object", part);
        auto type = get_string(part, "type");
        if (!type) bad(q + ".type", fmt::format("'{}.type' is required", q));
        if (*type != "text")
          bad(q + ".type", fmt::format("'{}.type' is '{}': this model accepts text only (content parts of type \"text\")", q, *type));
        const ojson* text = field(part, "text");
        if (!text || !text->is_string()) bad(q + ".text", fmt::format("'{}.text' must be a string", q));
      }
    }
    if (rname == "tool" && !field(msg, "tool_call_id"))
      bad(p + ".tool_call_id", fmt::format("'{}.tool_call_id' is required for a tool message", p));
    if (const ojson* tc = field(msg, "tool_calls")) {
      if (!tc->is_array()) wrong_type(p + ".tool_calls", "an array", *tc);
      for (size_t k = 0; k < tc->size(); ++k) {
        std::string q = fmt::format("{}.tool_calls[{}]", p, k);
        const ojson& call = (*tc)[k];
        if (!call.is_object()) wrong_type(q, "an object", call);
        const ojson* fn = field(call, "function");
        if (!fn || !fn->is_object()) bad(q + ".function", fmt::format("'{}.function' must be an object", q));
        const ojson* name = field(*fn, "name");
        if (!name || !name->is_string()) bad(q + ".function.name", fmt::format("'{}.function.name' must be a string", q));
        if (const ojson* a = field(*fn, "arguments"); a && !a->is_string() && !a->is_object()) {
          wrong_type(q + ".function.arguments", "a JSON string", *a);
        } else if (a && a->is_string() && json_depth_exceeded_at(a->get_ref<const std::string&>(), lim.max_json_depth) !=
                                              std::string_view::npos) {
          bad(q + ".function.arguments", fmt::format("'{}.function.arguments' is nested deeper than {} levels", q, lim.max_json_depth));
        }
      }
    }
    for (const char* key : {"reasoning_content", "reasoning", "tool_call_id", "name"}) {
      if (const ojson* v = field(msg, key); v && !v->is_string()) wrong_type(p + "." + key, "a string", *v);
    }
  }
  r.messages = *m;
}

void parse_response_format(const ojson& j, ParsedRequest& r) {
  const ojson* f = field(j, "response_format");
  if (!f) return;
  if (!f->is_object()) wrong_type("response_format", "an object", *f);
  auto type = get_string(*f, "type");
  if (!type) bad("response_format.type", "'response_format.type' is required");
  if (*type == "text") return;
  if (*type == "json_schema") {
    const ojson* s = field(*f, "json_schema");
    if (!s || !s->is_object()) bad("response_format.json_schema", "'response_format.json_schema' must be an object");
  } else if (*type != "json_object") {
    bad("response_format.type", fmt::format("'response_format.type' must be text, json_object or json_schema; got '{}'", *type));
  }
  r.response_format = *f;
}

}  // namespace

ParsedRequest parse_chat_request(std::string_view body, const ParseLimits& lim) {
  ojson j = parse_body(body, lim);
  ParsedRequest r;
  r.endpoint = Endpoint::Chat;
  parse_common(j, r, lim);
  parse_messages(j, r, lim);
  parse_tools(j, r);
  parse_thinking(j, r);
  parse_response_format(j, r);
  if (const ojson* v = field(j, "logprobs")) {
    if (!v->is_boolean()) wrong_type("logprobs", "a boolean", *v);
    r.logprobs = v->get<bool>();
  }
  if (auto v = get_int(j, "top_logprobs", 0, lim.max_top_logprobs)) {
    if (!r.logprobs) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r.top_logprobs = int32_t(*v);
  }
  r.sampling.logprobs = r.logprobs ? r.top_logprobs : -1;
  if (r.max_tokens_set && r.sampling.max_tokens == 0) bad(r.max_tokens_key, fmt::format("'{}' must be at least 1", r.max_tokens_key));
  return r;
}

ParsedRequest parse_completion_request(std::string_view body, const ParseLimits& lim) {
  ojson j = parse_body(body, lim);
  ParsedRequest r;
  r.endpoint = Endpoint::Completion;
  parse_common(j, r, lim);
  const ojson* p = field(j, "prompt");
  if (!p) bad("prompt", "'prompt' is required");
  if (p->is_string()) {
    r.prompt_text = p->get<std::string>();
  } else if (p->is_array()) {
    // A list of one string or one token-id list (batches of several prompts are not supported).
    if (p->empty()) bad("prompt", "'prompt' must not be empty");
    if ((*p)[0].is_number()) {
      r.prompt_ids = token_ids(*p, "prompt");
      r.prompt_is_ids = true;
    } else if (p->size() == 1 && (*p)[0].is_string()) {
      r.prompt_text = (*p)[0].get<std::string>();
    } else if (p->size() == 1 && (*p)[0].is_array()) {
      r.prompt_ids = token_ids((*p)[0], "prompt[0]");
      r.prompt_is_ids = true;
    } else {
      bad("prompt", "'prompt' must be a string, a list of token ids, or a list with one of those (batched prompts are not supported)");
    }
  } else {
    wrong_type("prompt", "a string or an array of token ids", *p);
  }
  if (r.prompt_is_ids && r.prompt_ids.empty()) bad("prompt", "'prompt' must not be empty");
  if (auto e = get_bool(j, "echo")) r.echo = *e;
  if (auto lp = get_int(j, "logprobs", 0, lim.max_top_logprobs)) {
    r.logprobs = true;
    r.top_logprobs = int32_t(*lp);
  }
  r.sampling.logprobs = r.logprobs ? r.top_logprobs : -1;
  // echo with logprobs scores the prompt too (lm-eval's loglikelihood requests).
  if (r.echo && r.logprobs) r.sampling.prompt_logprobs = r.top_logprobs;
  if (r.max_tokens_set && r.sampling.max_tokens == 0 && !(r.echo && r.logprobs))
    bad(r.max_tokens_key, fmt::format("'{}' of 0 needs 'echo': true with 'logprobs' (prompt scoring)", r.max_tokens_key));
  if (const ojson* s = field(j, "suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
    bad("suffix", "'suffix' is not supported");
  if (auto b = get_int(j, "best_of", 1, 1 << 20); b && *b != r.sampling.n) bad("best_of", "'best_of' other than n is not supported");
  return r;
}

ParsedRequest parse_request(Endpoint ep, std::string_view body, const ParseLimits& lim) {
  return ep == Endpoint::Chat ? parse_chat_request(body, lim) : parse_completion_request(body, lim);
}

ojson effective_tools(const ParsedRequest& r) {
  if (r.tools.is_null() || r.tool_choice == ToolChoice::None) return nullptr;
  if (r.tool_choice != ToolChoice::Named) return r.tools;
  for (const auto& t : r.tools) {
    if (t["function"]["name"] == r.tool_choice_name) return ojson::array({t});
  }
  throw ApiError(400, fmt::format("'tool_choice' names function '{}', which is not in 'tools'", r.tool_choice_name),
                 "tool_choice");
}

std::set<std::string> offered_tool_names(const ParsedRequest& r) {
  std::set<std::string> names;
  ojson tools = effective_tools(r);
  if (tools.is_array())
    for (const auto& t : tools) names.insert(t["function"]["name"].get<std::string>());
  return names;
}

std::string render_chat_prompt(const ParsedRequest& r) {
  try {
    return render_chat(r.messages, effective_tools(r), r.chat, r.response_format);
  } catch (const ApiError&) {
    throw;
  } catch (const std::exception& e) {
    throw ApiError(400, std::string("invalid messages: ") + e.what(), "messages");
  }
}

std::string logprob_token_text(std::string_view bytes) {
  if (utf8::valid(bytes)) return std::string(bytes);
  std::string out = "bytes:";
  for (unsigned char c : bytes) out += fmt::format("\\x{:02x}", c);
  return out;
}

size_t TextOffsets::next(std::string_view token_bytes) {
  auto continuation = [](char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; };
  size_t at = chars_;
  if (!token_bytes.empty() && continuation(token_bytes[0]) && at > 0) --at;  // inside a character
  for (char c : token_bytes) chars_ += continuation(c) ? 0 : 1;
  return at;
}

int32_t reasoning_token_count(const Tokenizer& tok, std::span<const int32_t> tokens) {
  std::string bytes;
  std::vector<size_t> starts;
  for (int32_t t : tokens) {
    if (t == tok.eos_id()) break;
    starts.push_back(bytes.size());
    bytes += tok.token_bytes(t);
  }
  size_t end = bytes.find(kThinkEnd);
  return int32_t(std::count_if(starts.begin(), starts.end(), [&](size_t s) { return s < end; }));
}

}  // namespace dsv4::server
