// The HTTP server in process, against a fake Engine that emits a scripted token sequence (a
// "fixture model": here, one that answers with DSML tool calls or reasoning).
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <httplib.h>

#include <thread>

#include "engine/scripted_engine.h"
#include "server/server.h"
#include "text/tiny_tokenizer.h"
#include "util/error.h"
#include "util/utf8.h"

using namespace dsv4;
using namespace dsv4::server;
using json = nlohmann::json;

namespace {

Tokenizer tiny_tok() { return Tokenizer::from_json(tiny_tokenizer_json(1024, 0, 1), "<tiny>"); }

// Emits `script` (token ids) in steps of `per_step` tokens on its own thread, for each of the n
// samples (sample 0 reports 1 cached prompt token, the others the whole prompt, as forks do);
// or fails.
class FakeEngine : public Engine {
 public:
  FakeEngine(Tokenizer tok, std::vector<int32_t> script, size_t per_step = 2)
      : tok_(std::move(tok)), script_(std::move(script)), per_step_(per_step) {}
  ~FakeEngine() override {
    for (auto& t : threads_) t.join();
  }
  std::string submit(Request req, EventSink sink) override {
    if (reject_) reject(EngineError::Kind::InvalidRequest, "prompt", "rejected for the test");
    last_ = req;
    std::string id = req.id.empty() ? "fake" : req.id;
    threads_.emplace_back([this, id, req, sink] {
      IncrementalDecoder dec(tok_);
      size_t n = std::min(script_.size(), size_t(req.sampling.max_tokens));
      for (size_t i = 0; i < n; i += per_step_) {
        if (i) std::this_thread::sleep_for(step_time_);
        Event e;
        e.request_id = id;
        for (size_t k = i; k < std::min(n, i + per_step_); ++k) {
          e.tokens.push_back(script_[k]);
          e.text += dec.push(script_[k]);
          if (!alternatives_.empty()) {
            TokenLogprob lp{script_[k], -0.5f, {{script_[k], -0.5f}}};
            for (size_t a = 0; a < alternatives_.size(); ++a) lp.top.emplace_back(alternatives_[a], -1.0f - float(a));
            e.logprobs.push_back(lp);
          }
        }
        if (i + per_step_ >= n) {
          e.finish = fail_ ? FinishReason::Error : (n == script_.size() ? FinishReason::Stop : FinishReason::Length);
          if (fail_) e.error = "device on fire";
          e.text += dec.flush();
          e.prompt_tokens = int32_t(req.prompt.size());
          e.completion_tokens = int32_t(n);
        }
        for (int32_t s = 0; s < req.sampling.n; ++s) {
          e.index = s;
          if (e.finish != FinishReason::None) e.cached_prompt_tokens = s == 0 ? 1 : int32_t(req.prompt.size());
          sink(e);
        }
      }
    });
    return id;
  }
  void abort(const std::string&) override {}
  EngineMetrics metrics() const override { return {}; }
  void shutdown(bool) override {}

  Tokenizer tok_;
  std::vector<int32_t> script_;
  size_t per_step_;
  bool reject_ = false, fail_ = false;
  std::vector<int32_t> alternatives_;  // non-empty: logprobs with these tokens after the chosen one
  std::chrono::milliseconds step_time_{0};
  Request last_;
  std::vector<std::thread> threads_;
};

struct Running {
  HttpServer http;
  int port;
  std::thread th;
  Running(Engine& e, Tokenizer tok, ServerConfig cfg) : http(e, std::move(tok), [&] {
    cfg.port = 0;
    return cfg;
  }()) {
    port = http.bind();
    th = std::thread([this] { http.run(); });
  }
  ~Running() {
    http.shutdown();
    th.join();
  }
  httplib::Result post(const std::string& path, const json& body, httplib::Headers h = {}) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c.Post(path.c_str(), h, body.dump(), "application/json");
  }
};

const std::string kDsmlReply =
    "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"add\">\n"
    "<｜DSML｜parameter name=\"a\" string=\"false\">1</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"b\" string=\"false\">2</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";

json add_tool(const std::string& name = "add") {
  return json::array({{{"type", "function"},
                       {"function", {{"name", name}, {"parameters", {{"type", "object"}}}}}}});
}

// The data events of an SSE body, [DONE] excluded; sets *done when it was seen.
std::vector<json> sse_events(const std::string& body, bool* done = nullptr) {
  std::vector<json> events;
  size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    size_t end = body.find("\n\n", pos);
    std::string data = body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") {
      if (done) *done = true;
      continue;
    }
    events.push_back(json::parse(data));
  }
  return events;
}

// A streamed chat answer put back together.
struct StreamedChat {
  std::string content, reasoning, finish;
  std::vector<std::string> names, args;
};
StreamedChat collect_chat(const std::string& body) {
  StreamedChat r;
  for (auto& j : sse_events(body)) {
    for (auto& c : j["choices"]) {
      auto& d = c["delta"];
      if (d.contains("content") && d["content"].is_string()) r.content += d["content"].get<std::string>();
      if (d.contains("reasoning_content") && d["reasoning_content"].is_string())
        r.reasoning += d["reasoning_content"].get<std::string>();
      if (d.contains("tool_calls"))
        for (auto& tc : d["tool_calls"]) {
          size_t i = tc["index"];
          if (r.args.size() <= i) r.args.resize(i + 1), r.names.resize(i + 1);
          if (tc["function"].contains("name")) r.names[i] = tc["function"]["name"];
          r.args[i] += tc["function"]["arguments"].get<std::string>();
        }
      if (!c["finish_reason"].is_null()) r.finish = c["finish_reason"];
    }
  }
  return r;
}

// Code point index -> byte offset of that character in UTF-8 `text` (text.size() past the end).
std::vector<size_t> char_starts(const std::string& text) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i)
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  starts.push_back(text.size());
  return starts;
}

}  // namespace

TEST(HttpServer, FixtureModelToolCallsNonStreaming) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode(kDsmlReply));
  Running s(eng, tok, ServerConfig{});
  auto res = s.post("/v1/chat/completions",
                    {{"messages", {{{"role", "user"}, {"content", "1+2"}}}}, {"tools", add_tool()}, {"max_tokens", 500}});
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  auto j = json::parse(res->body);
  auto& m = j["choices"][0]["message"];
  EXPECT_EQ(m["content"], "Sure.");
  ASSERT_EQ(m["tool_calls"].size(), 1u);
  EXPECT_EQ(m["tool_calls"][0]["function"]["name"], "add");
  EXPECT_EQ(json::parse(m["tool_calls"][0]["function"]["arguments"].get<std::string>()), json({{"a", 1}, {"b", 2}}));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "tool_calls");
  // The prompt the engine saw carried the tool and ended the assistant header.
  std::string prompt = tok.decode(eng.last_.prompt);
  EXPECT_NE(prompt.find("\"add\""), std::string::npos);
  EXPECT_EQ(eng.last_.sampling.max_tokens, 500);
}

TEST(HttpServer, FixtureModelToolCallsStreaming) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode(kDsmlReply), 1);
  Running s(eng, tok, ServerConfig{});
  auto res = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "1+2"}}}},
                                             {"tools", add_tool()}, {"stream", true}});
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  std::string content, args, name, finish;
  size_t pos = 0;
  int events = 0;
  bool done = false;
  while ((pos = res->body.find("data: ", pos)) != std::string::npos) {
    size_t end = res->body.find("\n\n", pos);
    std::string data = res->body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") {
      done = true;
      continue;
    }
    ++events;
    auto j = json::parse(data);
    for (auto& c : j["choices"]) {
      auto& d = c["delta"];
      if (d.contains("content") && d["content"].is_string()) content += d["content"].get<std::string>();
      if (d.contains("tool_calls"))
        for (auto& tc : d["tool_calls"]) {
          if (tc["function"].contains("name")) name = tc["function"]["name"];
          args += tc["function"]["arguments"].get<std::string>();
        }
      if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
    }
  }
  EXPECT_TRUE(done);
  EXPECT_GT(events, 5);
  EXPECT_EQ(content, "Sure.");  // no marker bytes leak into content
  EXPECT_EQ(name, "add");
  EXPECT_EQ(json::parse(args), json({{"a", 1}, {"b", 2}}));
  EXPECT_EQ(finish, "tool_calls");
}

TEST(HttpServer, ReasoningFromFixture) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode("hmm, four</think>4<｜end▁of▁sentence｜>"));
  Running s(eng, tok, ServerConfig{});
  auto res = s.post("/v1/chat/completions",
                    {{"messages", {{{"role", "user"}, {"content", "2+2"}}}}, {"thinking", {{"type", "enabled"}}}});
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  auto j = json::parse(res->body);
  EXPECT_EQ(j["choices"][0]["message"]["reasoning_content"], "hmm, four");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "4");
  EXPECT_EQ(tok.decode(eng.last_.prompt).substr(tok.decode(eng.last_.prompt).size() - 7), "<think>");
}

TEST(HttpServer, EngineRejectionAndFailure) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode("abc"));
  Running s(eng, tok, ServerConfig{});
  eng.reject_ = true;
  auto res = s.post("/v1/completions", {{"prompt", "x"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(res->body.find("rejected for the test"), std::string::npos);
  EXPECT_EQ(json::parse(res->body)["error"]["param"], "prompt");  // the engine's typed field, not a parsed string
  eng.reject_ = false;
  eng.fail_ = true;
  res = s.post("/v1/completions", {{"prompt", "x"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 500);
  EXPECT_EQ(json::parse(res->body)["error"]["message"], "device on fire");
}

// n > 1: usage reports sample 0's cached prompt tokens; TPOT is per sample (sample 0's time
// over its own tokens, not over the tokens of all samples); there is no queue-time metric.
TEST(HttpServer, ParallelSamplesUsageAndTpot) {
  Tokenizer tok = tiny_tok();
  const std::vector<int32_t> script = tok.encode("abcdef");
  ASSERT_GE(script.size(), 3u);
  FakeEngine eng(tok, script, 1);
  eng.step_time_ = std::chrono::milliseconds(20);
  Running s(eng, tok, ServerConfig{});
  auto res = s.post("/v1/completions", {{"prompt", "hello there"}, {"n", 3}, {"max_tokens", 50}});
  ASSERT_EQ(res->status, 200) << res->body;
  auto j = json::parse(res->body);
  ASSERT_EQ(j["choices"].size(), 3u);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3 * script.size());
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
  httplib::Client c("127.0.0.1", s.port);
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->body.find("queue_time"), std::string::npos);
  auto value = [&](const std::string& name) {
    size_t at = m->body.find("\n" + name + " ");
    EXPECT_NE(at, std::string::npos) << name;
    return at == std::string::npos ? -1.0 : std::stod(m->body.substr(at + name.size() + 2));
  };
  EXPECT_EQ(value("dsv4_time_per_output_token_seconds_count"), 1);
  // Sample 0's tokens arrive >= 20 ms apart; over all 3 samples' tokens it would be ~1/3 of that.
  EXPECT_GE(value("dsv4_time_per_output_token_seconds_sum"), 0.019);
}

TEST(HttpServer, AuthContextAndModel) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode("abc"));
  ServerConfig cfg;
  cfg.api_key = "k";
  cfg.context = 64;
  cfg.model_name = "m";
  Running s(eng, tok, cfg);
  json body = {{"prompt", "hello"}, {"max_tokens", 10}};
  auto res = s.post("/v1/completions", body);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  res = s.post("/v1/completions", body, {{"Authorization", "Bearer x"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  res = s.post("/v1/completions", body, {{"Authorization", "Bearer k"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  body["max_tokens"] = 63;  // + a prompt of >= 2 tokens (BOS + text) > 64
  res = s.post("/v1/completions", body, {{"Authorization", "Bearer k"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(json::parse(res->body)["error"]["code"], "context_length_exceeded");
  body["max_tokens"] = 3;
  body["model"] = "other";
  res = s.post("/v1/completions", body, {{"Authorization", "Bearer k"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(json::parse(res->body)["error"]["code"], "model_not_found");
  // Without max_tokens the engine gets the rest of the context.
  body.erase("max_tokens");
  body.erase("model");
  res = s.post("/v1/completions", body, {{"Authorization", "Bearer k"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(int64_t(eng.last_.prompt.size()) + eng.last_.sampling.max_tokens, 64);
}

TEST(HttpServer, ScriptedEngineIsDeterministicAndHonoursLimits) {
  Tokenizer tok = tiny_tok();
  ScriptedEngine::Options o;
  o.eos_probability = 0;
  ScriptedEngine eng(tok, o);
  Running s(eng, tok, ServerConfig{});
  json body = {{"prompt", "abc"}, {"max_tokens", 9}, {"seed", 3}, {"temperature", 1.0}};
  auto a = json::parse(s.post("/v1/completions", body)->body);
  auto b = json::parse(s.post("/v1/completions", body)->body);
  EXPECT_EQ(a["choices"][0]["text"], b["choices"][0]["text"]);
  EXPECT_EQ(a["usage"]["completion_tokens"], 9);
  body["seed"] = 4;
  auto c = json::parse(s.post("/v1/completions", body)->body);
  EXPECT_NE(a["choices"][0]["text"], c["choices"][0]["text"]);
  eng.shutdown(false);
}

// 50,000 levels of nesting, or 30,000 inside a tool's parameters, used to overflow the stack and
// kill the server: now a 400 naming the limit, and the server keeps serving.
TEST(HttpServer, DeeplyNestedBodiesAreRejected) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode("ok"));
  Running s(eng, tok, ServerConfig{});
  httplib::Client c("127.0.0.1", s.port);
  c.set_read_timeout(30, 0);
  std::string deep = R"({"messages":[{"role":"user","content":"hi"}],"x":)" + std::string(50000, '[') +
                     std::string(50000, ']') + "}";
  std::string params;
  for (int i = 0; i < 30000; ++i) params += R"({"type":"object","properties":{"p":)";
  params += "{}";
  for (int i = 0; i < 30000; ++i) params += "}}";
  std::string tools = R"({"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":)"
                      R"({"name":"f","parameters":)" + params + "}}]}";
  for (const std::string* body : {&tools, &deep}) {
    auto res = c.Post("/v1/chat/completions", *body, "application/json");
    ASSERT_TRUE(res) << "the server went away";
    EXPECT_EQ(res->status, 400);
    auto err = json::parse(res->body)["error"];
    EXPECT_EQ(err["type"], "invalid_request_error");
    EXPECT_NE(err["message"].get<std::string>().find(fmt::format("nested deeper than {} levels", ParseLimits{}.max_json_depth)),
              std::string::npos)
        << err["message"];
  }
  auto ok = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
}

// DSML from the model is a tool call only for a tool the request offered; otherwise it is text
// (no tools at all, or an unknown name), streaming or not.
TEST(HttpServer, DsmlForToolsNotOfferedStaysText) {
  Tokenizer tok = tiny_tok();
  const std::string text = kDsmlReply.substr(0, kDsmlReply.size() - kEos.size());
  for (json tools : {json(nullptr), add_tool("multiply")}) {
    FakeEngine eng(tok, tok.encode(kDsmlReply), 3);
    Running s(eng, tok, ServerConfig{});
    json body = {{"messages", {{{"role", "user"}, {"content", "1+2"}}}}};
    if (!tools.is_null()) body["tools"] = tools;
    auto res = s.post("/v1/chat/completions", body);
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    auto j = json::parse(res->body);
    auto& m = j["choices"][0]["message"];
    EXPECT_EQ(m["content"], text) << tools;
    EXPECT_FALSE(m.contains("tool_calls")) << tools;
    EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
    body["stream"] = true;
    res = s.post("/v1/chat/completions", body);
    ASSERT_TRUE(res);
    StreamedChat st = collect_chat(res->body);
    EXPECT_EQ(st.content, text) << tools;
    EXPECT_TRUE(st.names.empty()) << tools;
    EXPECT_EQ(st.finish, "stop");
  }
}

// A string="false" value that is not JSON becomes a JSON string: arguments are always valid JSON.
TEST(HttpServer, NonJsonToolValueBecomesString) {
  Tokenizer tok = tiny_tok();
  const std::string reply =
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"add\">\n"
      "<｜DSML｜parameter name=\"days\" string=\"false\">abc</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"b\" string=\"false\">[2, {\"c\": null}]</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  const json want = {{"days", "abc"}, {"b", json::array({2, {{"c", nullptr}}})}};
  FakeEngine eng(tok, tok.encode(reply), 1);
  Running s(eng, tok, ServerConfig{});
  json body = {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"tools", add_tool()}};
  auto res = s.post("/v1/chat/completions", body);
  ASSERT_TRUE(res);
  auto j = json::parse(res->body);
  auto& calls = j["choices"][0]["message"]["tool_calls"];
  ASSERT_EQ(calls.size(), 1u) << res->body;
  EXPECT_EQ(json::parse(calls[0]["function"]["arguments"].get<std::string>()), want);
  body["stream"] = true;
  res = s.post("/v1/chat/completions", body);
  ASSERT_TRUE(res);
  StreamedChat st = collect_chat(res->body);
  ASSERT_EQ(st.args.size(), 1u);
  EXPECT_EQ(json::parse(st.args[0]), want);
}

// usage.completion_tokens_details.reasoning_tokens: the tokens before </think>.
TEST(HttpServer, ReasoningTokensInUsage) {
  Tokenizer tok = tiny_tok();
  const std::string reasoning = "hmm, two and two make four";
  FakeEngine eng(tok, tok.encode(reasoning + "</think>4<｜end▁of▁sentence｜>"), 2);
  Running s(eng, tok, ServerConfig{});
  json body = {{"messages", {{{"role", "user"}, {"content", "2+2"}}}}, {"thinking", {{"type", "enabled"}}}};
  auto res = s.post("/v1/chat/completions", body);
  ASSERT_TRUE(res);
  auto j = json::parse(res->body);
  EXPECT_EQ(j["choices"][0]["message"]["reasoning_content"], reasoning);
  const size_t want = tok.encode(reasoning).size();
  ASSERT_GT(want, 3u);
  EXPECT_EQ(j["usage"]["completion_tokens_details"]["reasoning_tokens"], want) << j["usage"];
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  res = s.post("/v1/chat/completions", body);
  ASSERT_TRUE(res);
  auto events = sse_events(res->body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back()["usage"]["completion_tokens_details"]["reasoning_tokens"], want);
  body = {{"messages", {{{"role", "user"}, {"content", "2+2"}}}}};  // chat mode: no reasoning
  res = s.post("/v1/chat/completions", body);
  EXPECT_EQ(json::parse(res->body)["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
}

// Completions logprobs: text_offset counts characters; top_logprobs keeps one key per token even
// when several are partial UTF-8 (OpenAI's "bytes:\xNN" form).
TEST(HttpServer, CompletionLogprobsOffsetsAndKeys) {
  Tokenizer tok = tiny_tok();
  const std::string text = "é中x€ab";
  std::vector<int32_t> script = tok.encode(text);
  std::vector<int32_t> partial = tok.encode("日");  // three byte tokens, none valid UTF-8 alone
  ASSERT_EQ(partial.size(), 3u);
  FakeEngine eng(tok, script, 2);
  eng.alternatives_ = partial;
  Running s(eng, tok, ServerConfig{});
  json body = {{"prompt", "q"}, {"max_tokens", 50}, {"logprobs", 4}};
  auto check = [&](const json& tokens, const json& offsets, const json& tops, const std::string& what) {
    ASSERT_EQ(tokens.size(), script.size()) << what;
    ASSERT_EQ(offsets.size(), script.size()) << what;
    std::vector<size_t> starts = char_starts(text);
    size_t byte = 0;
    for (size_t i = 0; i < script.size(); ++i) {
      // The character at text_offset holds the token's first byte.
      size_t off = offsets[i];
      ASSERT_LT(off + 1, starts.size()) << what << " token " << i;
      EXPECT_LE(starts[off], byte) << what << " token " << i;
      EXPECT_LT(byte, starts[off + 1]) << what << " token " << i;
      byte += tok.token_bytes(script[i]).size();
      EXPECT_EQ(tops[i].size(), 4u) << what << " token " << i << ": " << tops[i];
      for (auto& [key, v] : tops[i].items())
        EXPECT_TRUE(dsv4::utf8::valid(key) && key.find("\xEF\xBF\xBD") == std::string::npos) << key;
    }
    EXPECT_EQ(byte, text.size());
  };
  auto res = s.post("/v1/completions", body);
  ASSERT_TRUE(res);
  auto lp = json::parse(res->body)["choices"][0]["logprobs"];
  check(lp["tokens"], lp["text_offset"], lp["top_logprobs"], "non-streaming");
  for (int32_t t : partial) EXPECT_TRUE(lp["top_logprobs"][0].contains(logprob_token_text(tok.token_bytes(t))));
  EXPECT_EQ(logprob_token_text("\xE4"), "bytes:\\xe4");
  body["stream"] = true;
  res = s.post("/v1/completions", body);
  ASSERT_TRUE(res);
  json tokens = json::array(), offsets = json::array(), tops = json::array();
  for (auto& j : sse_events(res->body))
    for (auto& c : j["choices"])
      if (c["logprobs"].is_object())
        for (size_t i = 0; i < c["logprobs"]["tokens"].size(); ++i) {
          tokens.push_back(c["logprobs"]["tokens"][i]);
          offsets.push_back(c["logprobs"]["text_offset"][i]);
          tops.push_back(c["logprobs"]["top_logprobs"][i]);
        }
  check(tokens, offsets, tops, "streaming");
}

// A prompt over the context names `prompt` on /v1/completions (`messages` on chat).
TEST(HttpServer, ContextErrorNamesThePromptField) {
  Tokenizer tok = tiny_tok();
  FakeEngine eng(tok, tok.encode("abc"));
  ServerConfig cfg;
  cfg.context = 16;
  Running s(eng, tok, cfg);
  std::string long_text(200, 'z');
  auto res = s.post("/v1/completions", {{"prompt", long_text}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(json::parse(res->body)["error"]["param"], "prompt");
  EXPECT_EQ(json::parse(res->body)["error"]["code"], "context_length_exceeded");
  res = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", long_text}}}}});
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["error"]["param"], "messages");
}
