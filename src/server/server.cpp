#include "server/server.h"

#include <httplib.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "text/output_parser.h"
#include "util/error.h"
#include "util/log.h"

namespace dsv4::server {

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string random_hex(size_t n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* hx = "0123456789abcdef";
  std::string s(n, '0');
  for (auto& c : s) c = hx[rng() & 15];
  return s;
}

// ---------------------------------------------------------------- metrics (Prometheus text)

struct Histogram {
  std::vector<double> bounds;
  std::vector<uint64_t> counts;  // per bucket (non-cumulative), + overflow
  double sum = 0;
  uint64_t n = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void observe(double v) {
    size_t i = std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin();
    ++counts[i];
    sum += v;
    ++n;
  }
  void write(std::string& out, const std::string& name, const std::string& help) const {
    out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < bounds.size(); ++i) {
      cum += counts[i];
      out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds[i], cum);
    }
    out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, n, name, sum, name, n);
  }
};

struct Metrics {
  std::mutex mu;
  std::map<std::pair<std::string, std::string>, uint64_t> requests;  // (endpoint, outcome)
  uint64_t prompt_tokens = 0, generation_tokens = 0, active_http = 0, disconnects = 0;
  Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}};
  Histogram tpot{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5}};
  Histogram e2e{{0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240}};
  // No queue-time histogram: the engine reports no admission time per request.
};

// ---------------------------------------------------------------- one request in flight

struct SampleOut {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt_logprobs;  // echo with logprobs: prompt positions 1..P-1
  bool echo_sent = false;                     // streamed completions: the prompt chunk went out
  TextOffsets text_offsets;  // streamed completions: text_offset of the next logprobs token
  FinishReason finish = FinishReason::None;
  std::string error;
  int32_t completion_tokens = 0;
  Clock::time_point first_token_time, last_token_time;  // when this sample's first / last tokens arrived
  int32_t generated() const { return completion_tokens ? completion_tokens : int32_t(tokens.size()); }
  // Forced output (test hook): the engine's tokens are replaced one for one.
  size_t forced_pos = 0;
  std::unique_ptr<IncrementalDecoder> forced_dec;
};

struct Live {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;
  int32_t open_samples = 1;
  std::string engine_id;
  Clock::time_point start = Clock::now();
};

}  // namespace

struct HttpServer::Impl {
  Engine& engine;
  Tokenizer tok;
  ServerConfig cfg;
  httplib::Server svr;
  Metrics metrics;
  std::atomic<bool> draining{false};
  std::mutex live_mu;
  std::map<std::string, std::weak_ptr<Live>> live;  // engine id -> state, for shutdown aborts
  std::thread watchdog;
  std::mutex wd_mu;
  std::condition_variable wd_cv;

  Impl(Engine& e, Tokenizer t, ServerConfig c) : engine(e), tok(std::move(t)), cfg(std::move(c)) {}

  // ------------------------------------------------------------ helpers
  void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(error_body(e), "application/json");
  }

  void check_auth(const httplib::Request& req) {
    if (cfg.api_key.empty()) return;
    std::string h = req.get_header_value("Authorization");
    std::string want = "Bearer " + cfg.api_key;
    bool ok = h.size() == want.size();
    unsigned diff = 0;
    for (size_t i = 0; ok && i < h.size(); ++i) diff |= unsigned(h[i] ^ want[i]);
    if (!ok || diff) throw ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "", "authentication_error", "invalid_api_key");
  }

  void count(const char* endpoint, const std::string& outcome) {
    std::lock_guard<std::mutex> lk(metrics.mu);
    ++metrics.requests[{endpoint, outcome}];
  }

  // Tokens of the prompt, validated.
  std::vector<int32_t> prompt_tokens(const ParsedRequest& r, std::string& prompt_text) {
    std::vector<int32_t> ids;
    if (r.endpoint == Endpoint::Chat) {
      prompt_text = render_chat_prompt(r);
      ids = encode(prompt_text, "messages");
    } else if (r.prompt_is_ids) {
      ids = r.prompt_ids;
      for (size_t i = 0; i < ids.size(); ++i)
        if (!tok.contains(ids[i]))
          throw ApiError(400, fmt::format("token id {} at prompt[{}] is not in the vocabulary", ids[i], i), "prompt");
      prompt_text = tok.decode(ids);
    } else {
      prompt_text = r.prompt_text;
      if (auto bos = tok.bos_id(); bos && prompt_text.rfind(kBos, 0) != 0) ids.push_back(*bos);
      auto more = encode(prompt_text, "prompt");
      ids.insert(ids.end(), more.begin(), more.end());
    }
    if (ids.empty()) throw ApiError(400, "the prompt is empty", "prompt");
    return ids;
  }

  std::vector<int32_t> encode(const std::string& text, const char* param) {
    try {
      return tok.encode(text, true);
    } catch (const std::exception& e) {
      throw ApiError(400, fmt::format("cannot tokenize {}: {}", param, e.what()), param);
    }
  }

  // ------------------------------------------------------------ handlers
  void handle_models(const httplib::Request& req, httplib::Response& res) {
    try {
      check_auth(req);
      json m = {{"id", cfg.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "dsv4"},
                {"max_model_len", cfg.context}};
      json j = {{"object", "list"}, {"data", json::array({m})}};
      res.set_content(dump(j), "application/json");
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  }

  std::string render_metrics() {
    EngineMetrics em = engine.metrics();
    std::string out;
    auto gauge = [&](const char* name, const char* help, double v) {
      out += fmt::format("# HELP {} {}\n# TYPE {} gauge\n{} {}\n", name, help, name, name, v);
    };
    auto counter = [&](const char* name, const char* help, double v) {
      out += fmt::format("# HELP {} {}\n# TYPE {} counter\n{} {}\n", name, help, name, name, v);
    };
    std::lock_guard<std::mutex> lk(metrics.mu);
    out += "# HELP dsv4_requests_total HTTP generation requests by endpoint and outcome\n# TYPE dsv4_requests_total counter\n";
    for (const auto& [k, v] : metrics.requests)
      out += fmt::format("dsv4_requests_total{{endpoint=\"{}\",outcome=\"{}\"}} {}\n", k.first, k.second, v);
    counter("dsv4_prompt_tokens_total", "Prompt tokens of finished requests", double(metrics.prompt_tokens));
    counter("dsv4_generation_tokens_total", "Generated tokens of finished requests", double(metrics.generation_tokens));
    counter("dsv4_client_disconnects_total", "Requests aborted because the client went away", double(metrics.disconnects));
    gauge("dsv4_http_requests_in_flight", "Generation requests being served", double(metrics.active_http));
    gauge("dsv4_num_requests_waiting", "Requests queued in the engine", double(em.waiting));
    gauge("dsv4_num_requests_running", "Requests running in the engine", double(em.running));
    double kv = em.blocks_total > 0 ? 1.0 - double(em.blocks_free) / double(em.blocks_total) : 0.0;
    gauge("dsv4_kv_cache_usage_perc", "Fraction of KV/state blocks in use (0..1)", kv);
    gauge("dsv4_kv_cache_blocks_total", "KV/state blocks in the pool", double(em.blocks_total));
    gauge("dsv4_kv_cache_blocks_free", "Free KV/state blocks", double(em.blocks_free));
    gauge("dsv4_prefix_cache_blocks", "Blocks held by the prefix cache", double(em.blocks_cached));
    gauge("dsv4_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens", em.prefix_hit_rate);
    gauge("dsv4_capacity_tokens", "Tokens the state pool can hold", double(em.capacity_tokens));
    counter("dsv4_engine_prompt_tokens_total", "Prompt tokens processed by the engine", double(em.prompt_tokens_total));
    counter("dsv4_engine_generation_tokens_total", "Tokens generated by the engine", double(em.generation_tokens_total));
    counter("dsv4_engine_requests_finished_total", "Requests the engine finished", double(em.requests_finished));
    counter("dsv4_engine_requests_aborted_total", "Requests the engine aborted", double(em.requests_aborted));
    counter("dsv4_engine_preemptions_total", "Preemptions", double(em.preemptions));
    counter("dsv4_engine_device_sampled_tokens_total", "Tokens sampled on the backend device",
            double(em.device_sampled_tokens));
    gauge("dsv4_generation_tokens_per_second", "Recent generation throughput", em.tokens_per_second);
    metrics.ttft.write(out, "dsv4_time_to_first_token_seconds", "Time from request arrival to the first token");
    metrics.tpot.write(out, "dsv4_time_per_output_token_seconds", "Mean time between output tokens, per request");
    metrics.e2e.write(out, "dsv4_e2e_request_latency_seconds", "Request latency, arrival to last token");
    return out;
  }

  void handle_generate(Endpoint ep, const httplib::Request& req, httplib::Response& res);
  void abort_all();
};

// ---------------------------------------------------------------- generation

namespace {

struct Gen {
  HttpServer::Impl* S = nullptr;
  Endpoint ep;
  ParsedRequest r;
  std::shared_ptr<Live> live;
  std::vector<int32_t> prompt;
  std::string prompt_text;
  std::vector<int32_t> forced;
  std::vector<SampleOut> out;
  std::vector<std::unique_ptr<StreamParser>> parsers;  // chat, per sample
  std::vector<int> tool_calls_seen;                    // chat streaming, per sample
  std::vector<bool> role_sent;
  std::string id;
  int64_t created = 0;
  bool thinking = false;
  bool first_token_seen = false;
  bool finished_all = false;
  bool aborted_by_client = false;
  int32_t prompt_tokens = 0, cached_tokens = 0;
  Clock::time_point first_token_time;  // of any sample
  std::string failure;  // an engine error

  const char* endpoint_name() const { return ep == Endpoint::Chat ? "chat" : "completions"; }

  // Applies one engine event to sample state; returns the new text of that sample.
  std::string apply(const Event& e) {
    if (e.index < 0 || size_t(e.index) >= out.size()) return {};
    SampleOut& o = out[size_t(e.index)];
    std::string text;
    if (!forced.empty() || r.forced_output) {
      for (size_t k = 0; k < e.tokens.size() && o.forced_pos < forced.size(); ++k) {
        int32_t t = forced[o.forced_pos++];
        o.tokens.push_back(t);
        o.forced_dec->push(t, text);
      }
      if (e.finish != FinishReason::None) text += o.forced_dec->flush();
    } else {
      o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
      text = e.text;
    }
    o.text += text;
    o.logprobs.insert(o.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
    if (!e.prompt_logprobs.empty()) o.prompt_logprobs = e.prompt_logprobs;
    if (!e.tokens.empty()) {
      auto now = Clock::now();
      if (!first_token_seen) {
        first_token_seen = true;
        first_token_time = now;
      }
      if (o.first_token_time == Clock::time_point{}) o.first_token_time = now;
      o.last_token_time = now;
    }
    if (e.finish != FinishReason::None) {
      o.finish = e.finish;
      if (!forced.empty() && e.finish == FinishReason::Length) o.finish = FinishReason::Stop;
      o.error = e.error;
      o.completion_tokens = e.completion_tokens;
      if (e.finish == FinishReason::Error && failure.empty()) failure = e.error.empty() ? "engine error" : e.error;
      prompt_tokens = std::max(prompt_tokens, e.prompt_tokens);
      // Sample 0's: the forks of n > 1 report the whole shared prompt as cached.
      if (e.index == 0) cached_tokens = e.cached_prompt_tokens;
    }
    return text;
  }

  // Waits for events (up to `wait`); returns false on timeout with nothing new.
  bool drain(std::deque<Event>& got, std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lk(live->mu);
    live->cv.wait_for(lk, wait, [&] { return !live->events.empty(); });
    got.swap(live->events);
    return !got.empty();
  }

  bool all_done() const {
    return std::all_of(out.begin(), out.end(), [](const SampleOut& o) { return o.finish != FinishReason::None; });
  }

  int32_t completion_tokens() const {
    int32_t n = 0;
    for (const auto& o : out) n += o.generated();
    return n;
  }

  json usage() const {
    int32_t c = completion_tokens();
    int32_t p = prompt_tokens ? prompt_tokens : int32_t(prompt.size());
    int32_t reasoning = 0;
    if (thinking)
      for (const auto& o : out) reasoning += reasoning_token_count(S->tok, o.tokens);
    return {{"prompt_tokens", p}, {"completion_tokens", c}, {"total_tokens", p + c},
            {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}},
            {"completion_tokens_details", {{"reasoning_tokens", reasoning}}}};
  }

  std::string token_bytes(int32_t t) const {
    try {
      return std::string(S->tok.token_bytes(t));
    } catch (...) {
      return {};
    }
  }
  std::string token_str(int32_t t) const { return logprob_token_text(token_bytes(t)); }

  json chat_logprob_entries(const std::vector<TokenLogprob>& lps) const {
    json arr = json::array();
    for (const auto& lp : lps) {
      auto one = [&](int32_t t, float v) {
        json bytes = json::array();
        for (unsigned char c : token_bytes(t)) bytes.push_back(int(c));
        return json{{"token", token_str(t)}, {"logprob", v}, {"bytes", bytes}};
      };
      json e = one(lp.token, lp.logprob);
      json top = json::array();
      for (size_t k = 0; k < lp.top.size() && int32_t(k) < r.top_logprobs; ++k) top.push_back(one(lp.top[k].first, lp.top[k].second));
      e["top_logprobs"] = top;
      arr.push_back(e);
    }
    return arr;
  }

  // `offsets` continues over the sample's tokens (text_offset counts characters).
  // `prompt_lps` (echo): the prompt's tokens come first, the first one without a logprob.
  json completion_logprobs(const std::vector<TokenLogprob>& lps, TextOffsets& offsets,
                           const std::vector<TokenLogprob>* prompt_lps) const {
    json tokens = json::array(), tlp = json::array(), top = json::array(), offs = json::array();
    auto add = [&](const TokenLogprob& lp) {
      tokens.push_back(token_str(lp.token));
      tlp.push_back(lp.logprob);
      json t = json::object();
      for (size_t k = 0; k < lp.top.size() && int32_t(k) < r.top_logprobs; ++k) t[token_str(lp.top[k].first)] = lp.top[k].second;
      top.push_back(t);
      offs.push_back(offsets.next(token_bytes(lp.token)));
    };
    if (prompt_lps) {
      for (size_t p = 0; p < prompt.size(); ++p) {
        if (p > 0 && p - 1 < prompt_lps->size() && (*prompt_lps)[p - 1].token == prompt[p]) {
          add((*prompt_lps)[p - 1]);
          continue;
        }
        tokens.push_back(token_str(prompt[p]));
        tlp.push_back(nullptr);
        top.push_back(nullptr);
        offs.push_back(offsets.next(token_bytes(prompt[p])));
      }
    }
    for (const auto& lp : lps) add(lp);
    return {{"tokens", tokens}, {"token_logprobs", tlp}, {"top_logprobs", top}, {"text_offset", offs}};
  }

  std::string chat_finish(const SampleOut& o, bool has_tools) const {
    if (o.finish == FinishReason::Stop && has_tools) return "tool_calls";
    return o.finish == FinishReason::None ? "stop" : finish_reason_name(o.finish);
  }

  json full_chat_response() {
    json choices = json::array();
    for (size_t i = 0; i < out.size(); ++i) {
      ParsedMessage m = parse_completion_lenient(out[i].text, thinking, nullptr, offered_tool_names(r));
      if (!r.parallel_tool_calls && m.tool_calls.size() > 1) m.tool_calls.resize(1);
      json msg = {{"role", "assistant"}};
      msg["content"] = m.content.empty() && !m.tool_calls.empty() ? json(nullptr) : json(m.content);
      if (thinking) msg["reasoning_content"] = m.reasoning_content;
      if (!m.tool_calls.empty()) {
        json calls = json::array();
        for (const auto& tc : m.tool_calls)
          calls.push_back({{"id", "call_" + random_hex(24)}, {"type", "function"},
                           {"function", {{"name", tc.name}, {"arguments", tc.arguments_json}}}});
        msg["tool_calls"] = calls;
      }
      json c = {{"index", i}, {"message", msg}, {"finish_reason", chat_finish(out[i], !m.tool_calls.empty())}};
      c["logprobs"] = r.logprobs ? json{{"content", chat_logprob_entries(out[i].logprobs)}} : json(nullptr);
      choices.push_back(c);
    }
    return {{"id", id}, {"object", "chat.completion"}, {"created", created}, {"model", S->cfg.model_name},
            {"choices", choices}, {"usage", usage()}, {"system_fingerprint", "dsv4"}};
  }

  json full_completion_response() {
    json choices = json::array();
    for (size_t i = 0; i < out.size(); ++i) {
      std::string text = r.echo ? prompt_text + out[i].text : out[i].text;
      json c = {{"index", i}, {"text", text}, {"finish_reason", out[i].finish == FinishReason::None ? "stop" : finish_reason_name(out[i].finish)}};
      TextOffsets offsets;
      c["logprobs"] = r.logprobs ? completion_logprobs(out[i].logprobs, offsets, r.echo ? &out[i].prompt_logprobs : nullptr)
                                 : json(nullptr);
      choices.push_back(c);
    }
    return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", S->cfg.model_name},
            {"choices", choices}, {"usage", usage()}, {"system_fingerprint", "dsv4"}};
  }

  // ---- streaming chunks
  json chunk_base() const {
    json j = {{"id", id}, {"object", ep == Endpoint::Chat ? "chat.completion.chunk" : "text_completion"},
              {"created", created}, {"model", S->cfg.model_name}, {"system_fingerprint", "dsv4"}};
    if (r.include_usage) j["usage"] = nullptr;
    return j;
  }

  static std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

  // SSE text for one event.
  std::string stream_event(const Event& e) {
    std::string text = apply(e);
    if (e.index < 0 || size_t(e.index) >= out.size()) return {};
    size_t i = size_t(e.index);
    SampleOut& o = out[i];
    std::string s;
    if (ep == Endpoint::Completion) {
      if (r.echo && r.logprobs && !o.echo_sent) {  // the prompt's logprobs arrive with the first event
        o.echo_sent = true;
        json c = {{"index", i}, {"text", prompt_text}, {"finish_reason", nullptr}};
        c["logprobs"] = completion_logprobs({}, o.text_offsets, &o.prompt_logprobs);
        json j = chunk_base();
        j["choices"] = json::array({c});
        s += sse(j);
      }
      if (!text.empty() || !e.logprobs.empty() || o.finish != FinishReason::None) {
        json c = {{"index", i}, {"text", text}, {"finish_reason", nullptr}};
        c["logprobs"] = r.logprobs ? completion_logprobs(e.logprobs, o.text_offsets, nullptr) : json(nullptr);
        if (o.finish != FinishReason::None) c["finish_reason"] = finish_reason_name(o.finish);
        json j = chunk_base();
        j["choices"] = json::array({c});
        s += sse(j);
      }
      return s;
    }
    auto chunk = [&](json delta, json logprobs, json finish) {
      json c = {{"index", i}, {"delta", std::move(delta)}, {"logprobs", std::move(logprobs)}, {"finish_reason", std::move(finish)}};
      json j = chunk_base();
      j["choices"] = json::array({c});
      return sse(j);
    };
    std::vector<StreamDelta> ds = parsers[i]->feed(text);
    if (o.finish != FinishReason::None) {
      auto tail = parsers[i]->finish();
      ds.insert(ds.end(), tail.begin(), tail.end());
    }
    json lp = r.logprobs && !e.logprobs.empty() ? json{{"content", chat_logprob_entries(e.logprobs)}} : json(nullptr);
    // Merge consecutive deltas of one text kind; one chunk per run.
    for (size_t k = 0; k < ds.size();) {
      const StreamDelta& d = ds[k];
      json delta = json::object();
      if (d.kind == StreamDelta::Kind::Reasoning || d.kind == StreamDelta::Kind::Content) {
        std::string t;
        size_t m = k;
        while (m < ds.size() && ds[m].kind == d.kind) t += ds[m++].text;
        delta[d.kind == StreamDelta::Kind::Reasoning ? "reasoning_content" : "content"] = t;
        k = m;
      } else if (d.kind == StreamDelta::Kind::ToolCallStart) {
        int idx = d.index;
        ++k;
        if (!r.parallel_tool_calls && idx > 0) continue;
        tool_calls_seen[i] = std::max(tool_calls_seen[i], idx + 1);
        delta["tool_calls"] = json::array({{{"index", idx}, {"id", "call_" + random_hex(24)}, {"type", "function"},
                                             {"function", {{"name", d.text}, {"arguments", ""}}}}});
      } else {
        int idx = d.index;
        std::string t;
        size_t m = k;
        while (m < ds.size() && ds[m].kind == StreamDelta::Kind::ToolCallArgs && ds[m].index == idx) t += ds[m++].text;
        k = m;
        if (!r.parallel_tool_calls && idx > 0) continue;
        delta["tool_calls"] = json::array({{{"index", idx}, {"function", {{"arguments", t}}}}});
      }
      s += chunk(delta, lp, nullptr);
      lp = nullptr;
    }
    if (!lp.is_null()) s += chunk(json{{"content", ""}}, lp, nullptr);
    if (o.finish != FinishReason::None) s += chunk(json::object(), nullptr, chat_finish(o, tool_calls_seen[i] > 0));
    return s;
  }

  std::string stream_prologue() {
    std::string s;
    for (size_t i = 0; i < out.size(); ++i) {
      json j = chunk_base();
      if (ep == Endpoint::Chat) {
        json delta = {{"role", "assistant"}, {"content", ""}};
        if (thinking) delta["reasoning_content"] = "";
        j["choices"] = json::array({{{"index", i}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}}});
      } else if (r.echo && !r.logprobs) {  // with logprobs: sent with the first event (stream_event)
        json c = {{"index", i}, {"text", prompt_text}, {"finish_reason", nullptr}};
        c["logprobs"] = nullptr;
        j["choices"] = json::array({c});
      } else {
        continue;
      }
      s += sse(j);
    }
    return s;
  }

  std::string stream_epilogue() {
    std::string s;
    if (!failure.empty()) {
      ApiError e(500, failure, "", "server_error");
      s += "data: " + error_body(e) + "\n\n";
    }
    if (r.include_usage) {
      json j = chunk_base();
      j["choices"] = json::array();
      j["usage"] = usage();
      s += sse(j);
    }
    s += "data: [DONE]\n\n";
    return s;
  }
};

}  // namespace

void HttpServer::Impl::abort_all() {
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lk(live_mu);
    for (auto& [id, w] : live)
      if (!w.expired()) ids.push_back(id);
  }
  for (auto& id : ids) engine.abort(id);
}

void HttpServer::Impl::handle_generate(Endpoint ep, const httplib::Request& req, httplib::Response& res) {
  const char* epname = ep == Endpoint::Chat ? "chat" : "completions";
  auto g = std::make_shared<Gen>();
  g->S = this;
  g->ep = ep;
  try {
    if (draining) throw ApiError(503, "the server is shutting down", "", "service_unavailable_error");
    check_auth(req);
    g->r = parse_request(ep, req.body, cfg.limits);
    ParsedRequest& r = g->r;
    if (!r.model.empty() && r.model != cfg.model_name)
      throw ApiError(404, fmt::format("The model '{}' does not exist (this server serves '{}')", r.model, cfg.model_name),
                     "model", "not_found_error", "model_not_found");
    g->thinking = ep == Endpoint::Chat && r.chat.thinking == ThinkingMode::Thinking;
    g->prompt = prompt_tokens(r, g->prompt_text);
    int64_t plen = int64_t(g->prompt.size());
    if (r.forced_output) {
      if (!cfg.test_hooks) throw ApiError(400, "'dsv4_forced_output' needs the server flag --enable-test-hooks", "dsv4_forced_output");
      g->forced = encode(*r.forced_output, "dsv4_forced_output");
      if (g->forced.empty()) throw ApiError(400, "'dsv4_forced_output' must not be empty", "dsv4_forced_output");
      r.sampling.max_tokens = int32_t(g->forced.size());
      r.max_tokens_set = true;
      r.sampling.ignore_eos = true;
      r.sampling.stop.clear();
      r.sampling.stop_token_ids.clear();
    }
    if (plen >= cfg.context)
      throw ApiError(400, fmt::format("This model's maximum context length is {} tokens; the prompt has {} tokens", cfg.context, plen),
                     ep == Endpoint::Chat ? "messages" : "prompt", "invalid_request_error", "context_length_exceeded");
    if (r.max_tokens_set) {
      if (plen + r.sampling.max_tokens > cfg.context)
        throw ApiError(400, fmt::format("This model's maximum context length is {} tokens. However, you requested {} tokens "
                                        "({} in the prompt, {} for the completion). Reduce the prompt or max_tokens.",
                                        cfg.context, plen + r.sampling.max_tokens, plen, r.sampling.max_tokens),
                       "max_tokens", "invalid_request_error", "context_length_exceeded");
    } else {
      int64_t rest = cfg.context - plen;
      if (cfg.default_max_tokens > 0) rest = std::min<int64_t>(rest, cfg.default_max_tokens);
      r.sampling.max_tokens = int32_t(rest);
    }
    g->out.resize(size_t(r.sampling.n));
    for (auto& o : g->out)
      if (!g->forced.empty()) o.forced_dec = std::make_unique<IncrementalDecoder>(tok);
    if (ep == Endpoint::Chat)
      for (int32_t i = 0; i < r.sampling.n; ++i)
        g->parsers.push_back(std::make_unique<StreamParser>(g->thinking, offered_tool_names(r)));
    g->tool_calls_seen.assign(size_t(r.sampling.n), 0);
    g->id = (ep == Endpoint::Chat ? "chatcmpl-" : "cmpl-") + random_hex(24);
    g->created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    g->live = std::make_shared<Live>();
    Request er;
    er.id = g->id;
    er.prompt = g->prompt;
    er.sampling = r.sampling;
    std::weak_ptr<Live> wl = g->live;
    try {
      g->live->engine_id = engine.submit(std::move(er), [wl](const Event& e) {
        if (auto l = wl.lock()) {
          std::lock_guard<std::mutex> lk(l->mu);
          l->events.push_back(e);
          l->cv.notify_all();
        }
      });
    } catch (const EngineError& e) {
      const bool gone = draining || e.kind == EngineError::Kind::Unavailable;
      throw ApiError(gone ? 503 : 400, e.what(), e.param, "",
                     e.kind == EngineError::Kind::ContextLength ? "context_length_exceeded" : "");
    }
  } catch (const ApiError& e) {
    count(epname, e.status == 401 ? "unauthorized" : "rejected");
    send_error(res, e);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(live_mu);
    live[g->live->engine_id] = g->live;
  }
  {
    std::lock_guard<std::mutex> lk(metrics.mu);
    ++metrics.active_http;
  }

  // Called once the request is over (every sample finished, or the client went away).
  auto finalize = [this, g, epname](bool client_gone) {
    if (client_gone && !g->all_done()) {
      engine.abort(g->live->engine_id);
      // Wait (bounded) for the engine's final Abort events so its state is known freed.
      auto deadline = Clock::now() + std::chrono::seconds(10);
      while (!g->all_done() && Clock::now() < deadline) {
        std::deque<Event> got;
        g->drain(got, std::chrono::milliseconds(50));
        for (auto& e : got) g->apply(e);
      }
    }
    {
      std::lock_guard<std::mutex> lk(live_mu);
      live.erase(g->live->engine_id);
    }
    std::lock_guard<std::mutex> lk(metrics.mu);
    --metrics.active_http;
    std::string outcome = client_gone ? "client_disconnect" : !g->failure.empty() ? "error" : "success";
    bool aborted = std::any_of(g->out.begin(), g->out.end(), [](const SampleOut& o) { return o.finish == FinishReason::Abort; });
    if (!client_gone && aborted) outcome = "aborted";
    ++metrics.requests[{epname, outcome}];
    if (client_gone) ++metrics.disconnects;
    metrics.prompt_tokens += uint64_t(g->prompt_tokens ? g->prompt_tokens : int32_t(g->prompt.size()));
    int32_t ct = g->completion_tokens();
    metrics.generation_tokens += uint64_t(ct);
    if (g->first_token_seen) {
      metrics.ttft.observe(std::chrono::duration<double>(g->first_token_time - g->live->start).count());
      // TPOT from sample 0 alone: its time from first to last token over its tokens after the
      // first. (All samples decode in the same steps, so dividing by the tokens of all n samples
      // would make it n times too small.)
      const SampleOut& s0 = g->out[0];
      if (s0.generated() > 1 && s0.first_token_time != Clock::time_point{})
        metrics.tpot.observe(std::chrono::duration<double>(s0.last_token_time - s0.first_token_time).count() /
                             double(s0.generated() - 1));
    }
    metrics.e2e.observe(seconds_since(g->live->start));
  };

  auto hb = std::chrono::milliseconds(int64_t(cfg.heartbeat_s * 1000));
  if (!g->r.stream) {
    // Wait in the handler first; a slow request switches to a chunked body whose leading
    // whitespace probes the connection, so a vanished client aborts the request.
    auto pump = [g](std::chrono::milliseconds wait) {
      std::deque<Event> got;
      g->drain(got, wait);
      for (auto& e : got) g->apply(e);
      return g->all_done();
    };
    auto deadline = Clock::now() + hb;
    bool done = false;
    while (!(done = pump(std::chrono::milliseconds(20))) && Clock::now() < deadline) {
    }
    auto body = [this, g]() {
      if (!g->failure.empty()) return std::make_pair(500, error_body(ApiError(500, g->failure, "", "server_error")));
      return std::make_pair(200, dump(g->ep == Endpoint::Chat ? g->full_chat_response() : g->full_completion_response()));
    };
    if (done) {
      auto [st, b] = body();
      res.status = st;
      res.set_content(b, "application/json");
      finalize(false);
      return;
    }
    auto finished = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "application/json",
        [g, pump, body, finalize, finished, hb](size_t, httplib::DataSink& sink) {
          auto idle_since = Clock::now();
          for (;;) {
            if (pump(std::chrono::milliseconds(50))) {
              auto [st, b] = body();
              (void)st;
              *finished = true;
              bool ok = sink.write(b.data(), b.size());
              finalize(!ok);
              sink.done();
              return ok;
            }
            if (Clock::now() - idle_since >= hb) {
              if (!sink.write(" ", 1)) return false;  // the releaser aborts
              return true;
            }
          }
        },
        [finished, finalize](bool) {
          if (!*finished) {
            *finished = true;
            finalize(true);
          }
        });
    return;
  }

  // Streaming (SSE).
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  auto state = std::make_shared<int>(0);  // 0: prologue not sent, 1: streaming, 2: finished
  res.set_chunked_content_provider(
      "text/event-stream",
      [g, state, finalize, hb](size_t, httplib::DataSink& sink) {
        if (*state == 0) {
          *state = 1;
          std::string p = g->stream_prologue();
          if (p.empty()) p = ": ok\n\n";
          return sink.write(p.data(), p.size());
        }
        auto idle_since = Clock::now();
        for (;;) {
          std::deque<Event> got;
          if (g->drain(got, std::chrono::milliseconds(50))) {
            std::string s;
            for (auto& e : got) s += g->stream_event(e);
            if (g->all_done()) s += g->stream_epilogue();
            if (!s.empty() && !sink.write(s.data(), s.size())) return false;
            if (g->all_done()) {
              *state = 2;
              finalize(false);
              sink.done();
            }
            return true;
          }
          if (Clock::now() - idle_since >= hb) {
            static const char ping[] = ": ping\n\n";
            return sink.write(ping, sizeof(ping) - 1);
          }
        }
      },
      [state, finalize](bool) {
        if (*state != 2) {
          *state = 2;
          finalize(true);
        }
      });
}

// ---------------------------------------------------------------- HttpServer

HttpServer::HttpServer(Engine& engine, Tokenizer tok, ServerConfig cfg)
    : impl_(std::make_unique<Impl>(engine, std::move(tok), cfg)), cfg_(std::move(cfg)) {
  Impl* I = impl_.get();
  auto& svr = I->svr;
  int threads = std::max(4, cfg_.http_threads);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  svr.set_payload_max_length(cfg_.max_body_bytes);
  svr.set_keep_alive_max_count(1000);
  svr.set_read_timeout(30, 0);
  svr.set_write_timeout(30, 0);
  svr.Post("/v1/chat/completions", [I](const httplib::Request& q, httplib::Response& s) { I->handle_generate(Endpoint::Chat, q, s); });
  svr.Post("/v1/completions", [I](const httplib::Request& q, httplib::Response& s) { I->handle_generate(Endpoint::Completion, q, s); });
  svr.Get("/v1/models", [I](const httplib::Request& q, httplib::Response& s) { I->handle_models(q, s); });
  svr.Get("/health", [I](const httplib::Request&, httplib::Response& s) {
    if (I->draining) {
      s.status = 503;
      s.set_content("{\"status\":\"shutting down\"}", "application/json");
    } else {
      s.set_content("{\"status\":\"ok\"}", "application/json");
    }
  });
  svr.Get("/metrics", [I](const httplib::Request&, httplib::Response& s) {
    s.set_content(I->render_metrics(), "text/plain; version=0.0.4; charset=utf-8");
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& s, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = e.what();
    } catch (...) {
    }
    s.status = 500;
    s.set_content(error_body(ApiError(500, msg)), "application/json");
  });
  // httplib's own rejections (413 body too large, 404 unknown path, 400 bad request line...)
  // get OpenAI's error shape; handlers' own error bodies are left alone.
  size_t limit = cfg_.max_body_bytes;
  svr.set_error_handler(httplib::Server::HandlerWithResponse([limit](const httplib::Request& q, httplib::Response& s) {
    if (!s.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg;
    switch (s.status) {
      case 413: msg = fmt::format("the request body exceeds the limit of {} bytes (--max-body-bytes)", limit); break;
      case 404: msg = fmt::format("no route {} {}", q.method, q.path); break;
      case 405: msg = fmt::format("method {} is not allowed on {}", q.method, q.path); break;
      default: msg = fmt::format("HTTP error {}", s.status);
    }
    s.set_content(error_body(ApiError(s.status, msg)), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));
}

HttpServer::~HttpServer() {
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
}

int HttpServer::bind() {
  auto& svr = impl_->svr;
  if (cfg_.port == 0) {
    int p = svr.bind_to_any_port(cfg_.host);
    if (p <= 0) fail("--host: cannot bind {} to a free port", cfg_.host);
    cfg_.port = p;
  } else if (!svr.bind_to_port(cfg_.host, cfg_.port)) {
    fail("--port: cannot bind {}:{} (in use, or not permitted)", cfg_.host, cfg_.port);
  }
  return cfg_.port;
}

void HttpServer::run() {
  impl_->svr.listen_after_bind();
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
}

void HttpServer::shutdown(bool abort_now) {
  Impl* I = impl_.get();
  bool first = !I->draining.exchange(true);
  if (first) {
    // New generation requests now get 503; wait for the in-flight ones (aborting them after
    // the timeout), then close the listener so run() returns.
    double t = cfg_.shutdown_timeout_s;
    I->watchdog = std::thread([I, t] {
      auto in_flight = [I] {
        std::lock_guard<std::mutex> lk(I->metrics.mu);
        return I->metrics.active_http;
      };
      auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(t));
      bool aborted = false;
      for (;;) {
        if (in_flight() == 0) break;
        if (!aborted && Clock::now() >= deadline) {
          log_info("dsv4 serve: shutdown timeout; aborting in-flight requests");
          I->abort_all();
          aborted = true;
          deadline = Clock::now() + std::chrono::seconds(15);
        } else if (aborted && Clock::now() >= deadline) {
          break;
        }
        std::unique_lock<std::mutex> lk(I->wd_mu);
        I->wd_cv.wait_for(lk, std::chrono::milliseconds(20));
      }
      I->svr.stop();
    });
  }
  if (abort_now) I->abort_all();
}

}  // namespace dsv4::server
