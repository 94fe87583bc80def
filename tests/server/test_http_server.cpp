// The HTTP server in process, against a fake Engine that emits a scripted token sequence (a
// "fixture model": here, one that answers with DSML tool calls or reasoning).
#include <gtest/gtest.h>
#include <httplib.h>

#include <thread>

#include "server/scripted_engine.h"
#include "server/server.h"
#include "text/tiny_tokenizer.h"
#include "util/error.h"

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
    if (reject_) throw Error("engine: rejected for the test");
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

json add_tool() {
  return json::array({{{"type", "function"},
                       {"function", {{"name", "add"}, {"parameters", {{"type", "object"}}}}}}});
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
