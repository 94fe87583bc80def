#include "server/server.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "server/tokenize_api.h"
#include "text/output_parser.h"
#include "util/error.h"
#include "util/log.h"

#ifndef DSV4_VERSION
#error "DSV4_VERSION must be defined by the build (the project version)"
#endif

namespace dsv4::server {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// Connections beyond --max-connections that may still ask /health, /metrics, /ping or /version;
// past this reserve a connection gets a 503 at once and is closed.
constexpr int kHealthReserve = 64;
// Kernel queue of connections not yet accepted (clamped by net.core.somaxconn).
constexpr int kListenBacklog = 4096;
// Engine events a request may have queued before its connection drains them; past this the
// connection is not keeping up and the request is aborted (the engine thread never waits).
constexpr size_t kMaxQueuedEvents = 16384;
// A closing connection reads and discards at most this much of an unread request body for at
// most kLingerTime, so the client sees the error response instead of a reset.
constexpr size_t kLingerBytes = 256u << 10;
constexpr auto kLingerTime = std::chrono::seconds(2);
// Nice value of the io threads (the front thread keeps the process's).
constexpr int kIoThreadNice = 5;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string random_hex(size_t n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* hx = "0123456789abcdef";
  std::string s(n, '0');
  for (auto& c : s) c = hx[rng() & 15];
  return s;
}

std::string to_string(beast::string_view s) { return std::string(s.data(), s.size()); }

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
  uint64_t prompt_tokens = 0, generation_tokens = 0, active_http = 0, disconnects = 0, rejected_connections = 0;
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

// What the engine thread shares with the connection: the engine's sink only appends here and
// posts `wake` to the connection's executor, so it never waits on a client.
struct Live {
  std::mutex mu;
  std::deque<Event> events;
  bool overflow = false;       // more than kMaxQueuedEvents were queued
  bool wake_pending = false;   // a wake is posted and has not run yet
  std::function<void()> wake;  // empty once the connection let go of the request
  std::string engine_id;
  Clock::time_point start = Clock::now();
};

struct Gen;

}  // namespace

struct HttpServer::Impl {
  Engine& engine;
  Tokenizer tok;
  ServerConfig cfg;
  Metrics metrics;
  std::atomic<bool> draining{false};
  std::atomic<int> connections{0};
  const int64_t started_unix;
  std::mutex live_mu;
  std::map<std::string, std::weak_ptr<Live>> live;  // engine id -> state, for shutdown aborts
  std::thread watchdog;
  uint64_t stats_prompt_tokens = 0, stats_generation_tokens = 0;  // engine totals at the last stats line
  Clock::time_point stats_time = Clock::now();
  // The event loops last: destroyed first, their pending handlers still find the members above.
  asio::io_context ioc;
  asio::steady_timer stats_timer{ioc};
  // The front thread accepts connections, reads their request headers and answers the light
  // routes (/health, /metrics, /v1/models, ...); a connection asking for generation or
  // tokenization moves to the io threads (`ioc`). So /health answers at once however many
  // stream events the io threads have queued. Destroyed before `ioc` (moved sockets live there).
  asio::io_context front_ioc;
  tcp::acceptor acceptor{front_ioc};
  asio::steady_timer accept_backoff{front_ioc};

  Impl(Engine& e, Tokenizer t, ServerConfig c)
      : engine(e), tok(std::move(t)), cfg(std::move(c)),
        started_unix(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()) {}

  bool authorized(beast::string_view header) const {
    if (cfg.api_key.empty()) return true;
    std::string want = "Bearer " + cfg.api_key;
    if (header.size() != want.size()) return false;
    unsigned diff = 0;  // constant time in the key's length
    for (size_t i = 0; i < want.size(); ++i) diff |= unsigned(header[i] ^ want[i]);
    return diff == 0;
  }

  void count(const char* endpoint, const std::string& outcome) {
    std::lock_guard<std::mutex> lk(metrics.mu);
    ++metrics.requests[{endpoint, outcome}];
  }

  void check_model(const std::string& model) const {
    if (!model.empty() && model != cfg.model_name)
      throw ApiError(404, fmt::format("The model '{}' does not exist (this server serves '{}')", model, cfg.model_name),
                     "model", "not_found_error", "model_not_found");
  }

  std::vector<int32_t> encode(const std::string& text, const char* param) {
    try {
      return tok.encode(text, true);
    } catch (const std::exception& e) {
      throw ApiError(400, fmt::format("cannot tokenize {}: {}", param, e.what()), param);
    }
  }

  // Tokens of a completion-style text prompt: BOS first (unless the text starts with it).
  std::vector<int32_t> encode_prompt_text(const std::string& text, bool add_bos) {
    std::vector<int32_t> ids;
    if (auto bos = tok.bos_id(); add_bos && bos && text.rfind(kBos, 0) != 0) ids.push_back(*bos);
    auto more = encode(text, "prompt");
    ids.insert(ids.end(), more.begin(), more.end());
    return ids;
  }

  // Tokens of the prompt, validated.
  std::vector<int32_t> prompt_tokens(const ParsedRequest& r, std::string& prompt_text) {
    std::vector<int32_t> ids;
    if (r.endpoint == Endpoint::Chat) {
      ChatPrompt p = chat_prompt_tokens(r, tok, cfg.special_tokens_in_content);
      prompt_text = std::move(p.text);
      ids = std::move(p.ids);
    } else if (r.prompt_is_ids) {
      ids = r.prompt_ids;
      for (size_t i = 0; i < ids.size(); ++i)
        if (!tok.contains(ids[i]))
          throw ApiError(400, fmt::format("token id {} at prompt[{}] is not in the vocabulary", ids[i], i), "prompt");
      prompt_text = tok.decode(ids);
    } else {
      prompt_text = r.prompt_text;
      ids = encode_prompt_text(prompt_text, true);
    }
    if (ids.empty()) throw ApiError(400, "the prompt is empty", "prompt");
    return ids;
  }

  json model_card() const {
    return {{"id", cfg.model_name}, {"object", "model"}, {"created", started_unix}, {"owned_by", "dsv4"},
            {"root", cfg.model_name}, {"parent", nullptr}, {"max_model_len", cfg.context}};
  }

  std::string tokenize(std::string_view body) {
    TokenizeRequest r = parse_tokenize_request(body, cfg.limits);
    check_model(r.model);
    std::vector<int32_t> ids;
    if (r.chat) {
      check_model(r.chat->model);
      ids = chat_prompt_tokens(*r.chat, tok, cfg.special_tokens_in_content).ids;
    } else {
      ids = encode_prompt_text(*r.prompt, r.add_special_tokens);
    }
    json j = {{"count", ids.size()}, {"max_model_len", cfg.context}, {"tokens", ids}};
    if (r.return_token_strs) {
      json strs = json::array();
      for (int32_t t : ids) strs.push_back(logprob_token_text(tok.token_bytes(t)));
      j["token_strs"] = strs;
    }
    return dump(j);
  }

  std::string detokenize(std::string_view body) {
    DetokenizeRequest r = parse_detokenize_request(body, cfg.limits);
    check_model(r.model);
    for (size_t i = 0; i < r.tokens.size(); ++i)
      if (!tok.contains(r.tokens[i]))
        throw ApiError(400, fmt::format("token id {} is not in the vocabulary", r.tokens[i]), fmt::format("tokens[{}]", i));
    return dump(json{{"prompt", tok.decode(r.tokens)}});
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
    counter("dsv4_client_disconnects_total", "Requests aborted because the client went away or stopped reading",
            double(metrics.disconnects));
    counter("dsv4_http_connections_rejected_total", "Connections refused with 503 beyond --max-connections and its reserve",
            double(metrics.rejected_connections));
    gauge("dsv4_http_connections", "Open HTTP connections", double(connections.load()));
    gauge("dsv4_http_requests_in_flight", "Generation requests being served", double(metrics.active_http));
    gauge("dsv4_num_requests_waiting", "Requests queued in the engine", double(em.waiting));
    gauge("dsv4_num_requests_running", "Requests running in the engine", double(em.running));
    double kv = em.blocks_total > 0 ? 1.0 - double(em.blocks_free) / double(em.blocks_total) : 0.0;
    gauge("dsv4_kv_cache_usage_perc", "Fraction of KV/state blocks in use (0..1)", kv);
    gauge("dsv4_kv_cache_blocks", "KV/state blocks in the pool", double(em.blocks_total));
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
    counter("dsv4_spec_decode_num_draft_tokens_total", "Draft tokens proposed by the MTP block", double(em.draft_tokens));
    counter("dsv4_spec_decode_num_accepted_tokens_total", "Draft tokens accepted", double(em.accepted_draft_tokens));
    counter("dsv4_spec_decode_num_verify_steps_total", "Verification passes with drafts", double(em.speculative_steps));
    gauge("dsv4_spec_decode_mean_acceptance_length", "Tokens per verification pass (accepted drafts + 1)",
          em.mean_acceptance_length);
    gauge("dsv4_generation_tokens_per_second", "Recent generation throughput", em.tokens_per_second);
    metrics.ttft.write(out, "dsv4_time_to_first_token_seconds", "Time from request arrival to the first token");
    metrics.tpot.write(out, "dsv4_time_per_output_token_seconds", "Mean time between output tokens, per request");
    metrics.e2e.write(out, "dsv4_e2e_request_latency_seconds", "Request latency, arrival to last token");
    return out;
  }

  // vLLM-style periodic line; quiet while the server is idle.
  void log_stats() {
    EngineMetrics em = engine.metrics();
    const double dt = std::max(1e-9, seconds_since(stats_time));
    const uint64_t prompt_total = uint64_t(em.prompt_tokens_total), generation_total = uint64_t(em.generation_tokens_total);
    const uint64_t dp = prompt_total - std::min(prompt_total, stats_prompt_tokens);
    const uint64_t dg = generation_total - std::min(generation_total, stats_generation_tokens);
    stats_prompt_tokens = prompt_total;
    stats_generation_tokens = generation_total;
    stats_time = Clock::now();
    if (em.running == 0 && em.waiting == 0 && dp == 0 && dg == 0) return;
    double kv = em.blocks_total > 0 ? 100.0 * (1.0 - double(em.blocks_free) / double(em.blocks_total)) : 0.0;
    log_info("dsv4 serve: stats: running {}, waiting {}, connections {}; prompt {:.1f} tok/s, generation {:.1f} tok/s; "
             "prefix cache hit rate {:.1f} %, KV cache usage {:.1f} %",
             em.running, em.waiting, connections.load(), double(dp) / dt, double(dg) / dt, 100.0 * em.prefix_hit_rate, kv);
  }

  void schedule_stats() {
    stats_timer.expires_after(seconds(cfg.stats_interval_s));
    stats_timer.async_wait([this](beast::error_code ec) {
      if (ec) return;
      log_stats();
      schedule_stats();
    });
  }

  void accept();
  void refuse_connection(tcp::socket socket);
  std::shared_ptr<Gen> start_generation(Endpoint ep, const std::string& body, std::function<void()> wake);
  void finish_generation(Gen& g, bool client_gone);
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

  // Takes the events the engine queued; `overflow` is set when it queued more than the bound
  // (the connection stopped draining them).
  std::deque<Event> take_events(bool& overflow) {
    std::deque<Event> got;
    std::lock_guard<std::mutex> lk(live->mu);
    got.swap(live->events);
    live->wake_pending = false;
    overflow = live->overflow;
    return got;
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

std::shared_ptr<Gen> HttpServer::Impl::start_generation(Endpoint ep, const std::string& body, std::function<void()> wake) {
  const char* epname = ep == Endpoint::Chat ? "chat" : "completions";
  auto g = std::make_shared<Gen>();
  g->S = this;
  g->ep = ep;
  try {
    if (draining) throw ApiError(503, "the server is shutting down", "", "service_unavailable_error");
    g->r = parse_request(ep, body, cfg.limits);
    ParsedRequest& r = g->r;
    check_model(r.model);
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
    g->live->wake = std::move(wake);
    Request er;
    er.id = g->id;
    er.prompt = g->prompt;
    er.sampling = r.sampling;
    std::weak_ptr<Live> wl = g->live;
    try {
      g->live->engine_id = engine.submit(std::move(er), [wl](const Event& e) {
        auto l = wl.lock();
        if (!l) return;
        std::lock_guard<std::mutex> lk(l->mu);
        if (l->events.size() >= kMaxQueuedEvents) l->overflow = true;
        else l->events.push_back(e);
        if (l->wake && !l->wake_pending) {
          l->wake_pending = true;
          l->wake();
        }
      });
    } catch (const EngineError& e) {
      const bool gone = draining || e.kind == EngineError::Kind::Unavailable;
      throw ApiError(gone ? 503 : 400, e.what(), e.param, "",
                     e.kind == EngineError::Kind::ContextLength ? "context_length_exceeded" : "");
    }
  } catch (const ApiError& e) {
    count(epname, "rejected");
    throw;
  }
  {
    std::lock_guard<std::mutex> lk(live_mu);
    live[g->live->engine_id] = g->live;
  }
  std::lock_guard<std::mutex> lk(metrics.mu);
  ++metrics.active_http;
  return g;
}

// The request is over: every sample finished and its response was written, or the client went
// away (then the engine request is aborted; the engine frees its state on its own thread).
void HttpServer::Impl::finish_generation(Gen& g, bool client_gone) {
  {
    std::lock_guard<std::mutex> lk(g.live->mu);
    g.live->wake = nullptr;
  }
  if (client_gone && !g.all_done()) engine.abort(g.live->engine_id);
  {
    std::lock_guard<std::mutex> lk(live_mu);
    live.erase(g.live->engine_id);
  }
  const char* epname = g.endpoint_name();
  std::lock_guard<std::mutex> lk(metrics.mu);
  --metrics.active_http;
  std::string outcome = client_gone ? "client_disconnect" : !g.failure.empty() ? "error" : "success";
  bool aborted = std::any_of(g.out.begin(), g.out.end(), [](const SampleOut& o) { return o.finish == FinishReason::Abort; });
  if (!client_gone && aborted) outcome = "aborted";
  ++metrics.requests[{epname, outcome}];
  if (client_gone) ++metrics.disconnects;
  metrics.prompt_tokens += uint64_t(g.prompt_tokens ? g.prompt_tokens : int32_t(g.prompt.size()));
  metrics.generation_tokens += uint64_t(g.completion_tokens());
  if (g.first_token_seen) {
    metrics.ttft.observe(std::chrono::duration<double>(g.first_token_time - g.live->start).count());
    // TPOT from sample 0 alone: its time from first to last token over its tokens after the
    // first. (All samples decode in the same steps, so dividing by the tokens of all n samples
    // would make it n times too small.)
    const SampleOut& s0 = g.out[0];
    if (s0.generated() > 1 && s0.first_token_time != Clock::time_point{})
      metrics.tpot.observe(std::chrono::duration<double>(s0.last_token_time - s0.first_token_time).count() /
                           double(s0.generated() - 1));
  }
  metrics.e2e.observe(seconds_since(g.live->start));
}

// ---------------------------------------------------------------- HTTP transport

namespace {

enum class Route { ChatCompletions, Completions, Models, Model, Tokenize, Detokenize, Health, Ping, Version, Metrics };

struct RouteInfo {
  Route route;
  const char* allow;    // methods, as the Allow header lists them
  bool needs_auth;      // checked from the headers, before any body is read
  bool health_reserve;  // served on the connections beyond --max-connections
  bool heavy;           // served by the io threads (the connection moves there), not the front thread
};

std::optional<RouteInfo> find_route(std::string_view path) {
  static const std::pair<std::string_view, RouteInfo> routes[] = {
      {"/v1/chat/completions", {Route::ChatCompletions, "POST", true, false, true}},
      {"/v1/completions", {Route::Completions, "POST", true, false, true}},
      {"/v1/models", {Route::Models, "GET", true, false, false}},
      {"/tokenize", {Route::Tokenize, "POST", true, false, true}},
      {"/detokenize", {Route::Detokenize, "POST", true, false, true}},
      {"/health", {Route::Health, "GET", false, true, false}},
      {"/ping", {Route::Ping, "GET, POST", false, true, false}},
      {"/version", {Route::Version, "GET", false, true, false}},
      {"/metrics", {Route::Metrics, "GET", false, true, false}},
  };
  for (const auto& [p, info] : routes)
    if (path == p) return info;
  if (path.size() > 11 && path.substr(0, 11) == "/v1/models/") return RouteInfo{Route::Model, "GET", true, false, false};
  return std::nullopt;
}

bool method_allowed(const RouteInfo& r, http::verb m) {
  std::string_view allow = r.allow;
  if (m == http::verb::get) return allow.find("GET") != std::string_view::npos;
  if (m == http::verb::post) return allow.find("POST") != std::string_view::npos;
  return false;
}

// X-Request-Id as given when it is short printable ASCII, else a fresh one.
std::string request_id_from(beast::string_view given) {
  bool ok = !given.empty() && given.size() <= 128 &&
            std::all_of(given.begin(), given.end(), [](char c) { return c > 0x20 && c < 0x7f; });
  return ok ? to_string(given) : random_hex(32);
}

// %XX escapes of a path segment (a model id such as org%2Fname).
std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += char(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string chunk(std::string_view data) { return fmt::format("{:x}\r\n{}\r\n", data.size(), data); }

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(HttpServer::Impl& server, tcp::socket socket, bool reserve_only)
      : S(server), stream_(std::in_place, std::move(socket)), heartbeat_(stream_->get_executor()), reserve_only_(reserve_only) {
    ++S.connections;
    beast::error_code ec;
    auto ep = stream_->socket().remote_endpoint(ec);
    if (!ec) peer_ = fmt::format("{}:{}", ep.address().to_string(), ep.port());
  }
  ~Session() {
    if (gen_) S.finish_generation(*gen_, true);
    --S.connections;
  }

  void start() {
    asio::dispatch(stream_->get_executor(), [self = shared_from_this()] { self->wait_for_request(); });
  }

 private:
  // One request and its response.
  struct Exchange {
    std::string method, target, path, request_id, origin;
    Clock::time_point start = Clock::now();
    int status = 0;
    size_t bytes = 0;
    bool chunked = false;       // the response body is sent in chunks
    bool close_delimited = false;  // HTTP/1.0 stream: the body ends when the connection closes
  };

  // ---- reading
  void wait_for_request() {
    if (buf_.size() > 0) return read_header();  // a pipelined request is already here
    // A new connection must start its request within the header deadline; an idle keep-alive
    // one within --keep-alive-timeout. The header deadline restarts at the first byte.
    stream_->expires_after(seconds(served_ == 0 ? S.cfg.header_timeout_s : S.cfg.keep_alive_timeout_s));
    stream_->async_read_some(buf_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      self->buf_.commit(n);
      self->read_header();
    });
  }

  void read_header() {
    parser_.emplace();
    parser_->header_limit(uint32_t(std::min<size_t>(S.cfg.max_header_bytes, UINT32_MAX)));
    parser_->body_limit(uint64_t(S.cfg.max_body_bytes));
    ex_ = Exchange{};
    close_after_ = false;
    stream_->expires_after(seconds(S.cfg.header_timeout_s));
    http::async_read_header(*stream_, buf_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  void on_header(beast::error_code ec) {
    if (ec == beast::error::timeout || ec == http::error::end_of_stream || ec == asio::error::eof ||
        ec == asio::error::connection_reset || ec == asio::error::operation_aborted)
      return close();  // a slow (slowloris) or vanished client: nothing to answer
    auto& req = parser_->get();
    ex_.method = to_string(req.method_string());
    ex_.target = to_string(req.target());
    if (ec == http::error::header_limit)
      return fail_request(ApiError(431, fmt::format("the request line and headers exceed {} bytes", S.cfg.max_header_bytes)));
    if (ec == http::error::body_limit) return body_too_large();  // Content-Length over the limit
    if (ec) return fail_request(ApiError(400, fmt::format("malformed HTTP request: {}", ec.message())));
    ex_.request_id = request_id_from(req["X-Request-Id"]);
    ex_.origin = to_string(req[http::field::origin]);
    if (req.version() < 11) ex_.close_delimited = true;
    if (!req.keep_alive()) close_after_ = true;

    ex_.path = ex_.target.substr(0, ex_.target.find('?'));
    const std::string& path = ex_.path;
    route_ = find_route(path);
    if (req.method() == http::verb::options && route_ && !S.cfg.allowed_origins.empty()) return preflight();
    if (!route_) return fail_request(ApiError(404, fmt::format("no route {} {}", ex_.method, path), "", "not_found_error"));
    if (!method_allowed(*route_, req.method()))
      return fail_request(ApiError(405, fmt::format("method {} is not allowed on {} (allowed: {})", ex_.method, path, route_->allow)),
                          fmt::format("Allow: {}\r\n", route_->allow));
    if (reserve_only_ && !route_->health_reserve) {
      close_after_ = true;  // free the reserve's slot
      return fail_request(ApiError(503, fmt::format("too many connections (--max-connections {}); try again later", S.cfg.max_connections),
                                   "", "service_unavailable_error"),
                          "Retry-After: 1\r\n");
    }
    if (route_->needs_auth && !S.authorized(req[http::field::authorization])) {
      if (route_->route == Route::ChatCompletions) S.count("chat", "unauthorized");
      if (route_->route == Route::Completions) S.count("completions", "unauthorized");
      return fail_request(ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "", "authentication_error",
                                   "invalid_api_key"));
    }
    if (route_->heavy && !move_to_io_threads()) return close();
    if (parser_->is_done()) return dispatch();
    if (beast::iequals(req[http::field::expect], "100-continue")) {
      static const char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";
      beast::error_code ignored;  // a few bytes into an idle socket; the client sends the body either way
      stream_->socket().send(asio::buffer(kContinue, sizeof(kContinue) - 1), 0, ignored);
    }
    stream_->expires_after(seconds(S.cfg.read_timeout_s));
    http::async_read(*stream_, buf_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_body(ec); });
  }

  // Hands the connection from the front thread to the io threads: the socket is re-created on
  // `ioc` from a duplicate of its descriptor (Asio cannot rebind a socket to another context).
  // No operation is pending on it here; what was already read stays in buf_ and parser_.
  bool move_to_io_threads() {
    if (on_io_threads_) return true;
    beast::error_code ec;
    tcp::socket& old = stream_->socket();
    const auto protocol = old.local_endpoint(ec).protocol();
    if (ec) return false;
    const int fd = ::fcntl(old.native_handle(), F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return false;
    tcp::socket moved(asio::make_strand(S.ioc));
    moved.assign(protocol, fd, ec);
    if (ec) {
      ::close(fd);
      return false;
    }
    old.close(ec);
    stream_.emplace(std::move(moved));
    heartbeat_ = asio::steady_timer(stream_->get_executor());
    on_io_threads_ = true;
    return true;
  }

  void on_body(beast::error_code ec) {
    if (ec == http::error::body_limit) return body_too_large();  // chunked, or more than announced
    // A timeout has already closed the socket (Beast does), so a slow body gets no answer.
    if (ec == beast::error::timeout || ec == http::error::end_of_stream || ec == http::error::partial_message || ec == asio::error::eof ||
        ec == asio::error::connection_reset || ec == asio::error::operation_aborted)
      return close();
    if (ec) return fail_request(ApiError(400, fmt::format("malformed HTTP request body: {}", ec.message())));
    dispatch();
  }

  void body_too_large() {
    fail_request(ApiError(413, fmt::format("the request body exceeds the limit of {} bytes (--max-body-bytes)", S.cfg.max_body_bytes)));
  }

  // ---- answering
  void dispatch() {
    const std::string& body = parser_->get().body();
    try {
      switch (route_->route) {
        case Route::ChatCompletions: return start_generation(Endpoint::Chat, body);
        case Route::Completions: return start_generation(Endpoint::Completion, body);
        case Route::Models: return respond(200, dump(json{{"object", "list"}, {"data", json::array({S.model_card()})}}));
        case Route::Model: {
          S.check_model(percent_decode(std::string_view(ex_.path).substr(std::string_view("/v1/models/").size())));
          return respond(200, dump(S.model_card()));
        }
        case Route::Tokenize: return respond(200, S.tokenize(body));
        case Route::Detokenize: return respond(200, S.detokenize(body));
        case Route::Health:
        case Route::Ping:
          if (S.draining) return respond(503, R"({"status":"shutting down"})");
          return respond(200, R"({"status":"ok"})");
        case Route::Version: return respond(200, dump(json{{"version", DSV4_VERSION}}));
        case Route::Metrics: return respond(200, S.render_metrics(), "text/plain; version=0.0.4; charset=utf-8");
      }
    } catch (const ApiError& e) {
      return respond(e.status, error_body(e));
    } catch (const std::exception& e) {
      return respond(500, error_body(ApiError(500, e.what(), "", "server_error")));
    }
  }

  // An error before (or instead of) reading the body: the connection closes after it unless
  // the request had no body left to read.
  void fail_request(const ApiError& e, std::string extra_headers = {}) {
    if (!parser_ || !parser_->is_header_done() || !parser_->is_done()) close_after_ = true;
    respond(e.status, error_body(e), "application/json", std::move(extra_headers));
  }

  void preflight() {
    auto& req = parser_->get();
    std::string allow = cors_allow_origin();
    if (allow.empty()) return fail_request(ApiError(403, fmt::format("origin '{}' is not allowed (--allowed-origins)", ex_.origin)));
    std::string requested = to_string(req[http::field::access_control_request_headers]);
    std::string headers = fmt::format(
        "Access-Control-Allow-Methods: {}, OPTIONS\r\nAccess-Control-Allow-Headers: {}\r\nAccess-Control-Max-Age: 600\r\n",
        route_->allow, requested.empty() ? "Authorization, Content-Type, X-Request-Id" : requested);
    if (!parser_->is_done()) close_after_ = true;
    ex_.status = 204;
    complete_response(head(204, "", std::optional<size_t>(0), headers));
  }

  // Access-Control-Allow-Origin for this request's Origin ("" when CORS is off or it is not allowed).
  std::string cors_allow_origin() const {
    if (ex_.origin.empty()) return {};
    for (const auto& o : S.cfg.allowed_origins) {
      if (o == "*") return "*";
      if (o == ex_.origin) return ex_.origin;
    }
    return {};
  }

  // Status line and headers; `content_length` empty: chunked (or close-delimited for HTTP/1.0).
  std::string head(int status, std::string_view content_type, std::optional<size_t> content_length, std::string_view extra = {}) {
    std::string h = fmt::format("HTTP/1.1 {} {}\r\n", status, to_string(http::obsolete_reason(http::status(status))));
    if (!content_type.empty()) h += fmt::format("Content-Type: {}\r\n", content_type);
    if (content_length) {
      h += fmt::format("Content-Length: {}\r\n", *content_length);
    } else if (ex_.close_delimited) {
      close_after_ = true;
    } else {
      h += "Transfer-Encoding: chunked\r\n";
      ex_.chunked = true;
    }
    h += fmt::format("X-Request-Id: {}\r\n", ex_.request_id.empty() ? random_hex(32) : ex_.request_id);
    if (std::string allow = cors_allow_origin(); !allow.empty())
      h += fmt::format("Access-Control-Allow-Origin: {}\r\nAccess-Control-Expose-Headers: X-Request-Id\r\nVary: Origin\r\n", allow);
    if (close_after_) h += "Connection: close\r\n";
    else if (ex_.close_delimited) h += "Connection: keep-alive\r\n";  // an HTTP/1.0 client that asked for it
    h += extra;
    h += "\r\n";
    return h;
  }

  void respond(int status, std::string body, std::string_view content_type = "application/json", std::string extra_headers = {}) {
    ex_.status = status;
    complete_response(head(status, content_type, body.size(), extra_headers) + body);
  }

  // Queues the response's last bytes. The request's metrics are recorded before any of them can
  // go out (a client that reads the response may ask /metrics at once); once written, log and
  // read the next request.
  void complete_response(std::string last_bytes) {
    if (!queue(std::move(last_bytes))) return;
    if (gen_) {
      S.finish_generation(*gen_, false);
      gen_.reset();
    }
    complete_ = true;
    if (writing_) return;
    if (pending_.empty()) return after_response();
    write_pending();
  }

  void send(std::string bytes) {
    if (queue(std::move(bytes)) && !writing_) write_pending();
  }

  // False when the client stopped reading (the connection is dropped).
  bool queue(std::string bytes) {
    ex_.bytes += bytes.size();
    pending_ += bytes;
    if (pending_.size() <= S.cfg.max_stream_buffer_bytes) return true;
    drop("it stopped reading (output buffer full)");
    return false;
  }

  void send_body(std::string_view data) {
    if (data.empty()) return;
    last_send_ = Clock::now();
    send(ex_.chunked ? chunk(data) : std::string(data));
  }

  void write_pending() {
    writing_ = true;
    out_.swap(pending_);
    pending_.clear();
    stream_->expires_after(seconds(S.cfg.write_timeout_s));
    asio::async_write(*stream_, asio::buffer(out_), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing_ = false;
      self->out_.clear();
      if (ec) return self->drop(ec == beast::error::timeout ? "it took no bytes within --write-timeout" : "it went away");
      if (!self->pending_.empty()) return self->write_pending();
      if (self->complete_) self->after_response();
    });
  }

  void after_response() {
    complete_ = false;
    ++served_;
    access_log("");
    if (close_after_) return linger_close();
    parser_.reset();
    wait_for_request();
  }

  void access_log(std::string_view note) const {
    if (!S.cfg.access_log || ex_.method.empty()) return;
    log_info("{} \"{} {}\" {} {}B {:.1f}ms id={}{}", peer_, ex_.method, ex_.target, ex_.status, ex_.bytes,
             1000.0 * seconds_since(ex_.start), ex_.request_id, note);
  }

  // ---- generation
  void start_generation(Endpoint ep, const std::string& body) {
    std::weak_ptr<Session> weak = weak_from_this();
    auto executor = stream_->get_executor();
    std::shared_ptr<Gen> g = S.start_generation(ep, body, [weak, executor] {
      asio::post(executor, [weak] {
        if (auto self = weak.lock()) self->on_events();
      });
    });
    gen_ = g;
    ex_.status = 200;
    last_send_ = Clock::now();
    if (g->r.stream) {
      send(head(200, "text/event-stream", std::nullopt, "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"));
      std::string p = g->stream_prologue();
      send_body(p.empty() ? ": ok\n\n" : p);
    }
    if (!gen_) return;
    arm_heartbeat();
    on_events();  // the engine may have answered already
  }

  // While a request runs, a probe every heartbeat_s of silence notices clients that went away:
  // an SSE comment, or (non-streaming, once it takes longer than that) leading whitespace of a
  // chunked JSON body.
  void arm_heartbeat() {
    heartbeat_.expires_after(seconds(S.cfg.heartbeat_s));
    heartbeat_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || !self->gen_ || self->complete_) return;
      if (self->gen_->r.stream) {
        if (seconds_since(self->last_send_) >= self->S.cfg.heartbeat_s * 0.9) self->send_body(": ping\n\n");
      } else {
        if (self->ex_.bytes == 0) self->send(self->head(200, "application/json", std::nullopt));
        self->send_body(" ");
      }
      if (self->gen_ && !self->complete_) self->arm_heartbeat();
    });
  }

  void on_events() {
    if (!gen_ || complete_) return;
    std::shared_ptr<Gen> hold = gen_;  // send() may drop the connection (and gen_) midway
    Gen& g = *hold;
    bool overflow = false;
    std::deque<Event> events = g.take_events(overflow);
    if (overflow) return drop("it did not keep up with the engine's events");
    if (g.r.stream) {
      std::string s;
      for (auto& e : events) s += g.stream_event(e);
      if (g.all_done()) s += g.stream_epilogue();
      if (!s.empty()) send_body(s);
      if (gen_ && g.all_done()) finish_body();
      return;
    }
    for (auto& e : events) g.apply(e);
    if (!g.all_done()) return;
    const bool failed = !g.failure.empty();
    std::string body = failed ? error_body(ApiError(500, g.failure, "", "server_error"))
                              : dump(g.ep == Endpoint::Chat ? g.full_chat_response() : g.full_completion_response());
    if (ex_.bytes == 0) {
      heartbeat_.cancel();
      return respond(failed ? 500 : 200, std::move(body));
    }
    send_body(body);  // after the whitespace probes: the status line already said 200
    if (gen_) finish_body();
  }

  void finish_body() {
    heartbeat_.cancel();
    complete_response(ex_.chunked ? "0\r\n\r\n" : "");
  }

  // The client went away or stopped reading: abort its request and close the connection.
  void drop(std::string_view why) {
    if (gen_) {
      S.finish_generation(*gen_, true);
      gen_.reset();
      access_log(fmt::format(" (client dropped: {})", why));
    }
    heartbeat_.cancel();
    complete_ = false;
    close();
  }

  // Half-close, then read and discard what the client still sends (bounded), so it sees the
  // response instead of a reset caused by unread data.
  void linger_close() {
    beast::error_code ec;
    stream_->socket().shutdown(tcp::socket::shutdown_send, ec);
    if (ec) return close();
    linger_until_ = Clock::now() + kLingerTime;
    linger_read();
  }

  void linger_read() {
    if (linger_read_ >= kLingerBytes || Clock::now() >= linger_until_) return close();
    stream_->expires_at(linger_until_);
    buf_.consume(buf_.size());
    stream_->async_read_some(buf_.prepare(16384), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      self->linger_read_ += n;
      self->linger_read();
    });
  }

  void close() {
    beast::error_code ec;
    stream_->socket().close(ec);
  }

  HttpServer::Impl& S;
  std::optional<beast::tcp_stream> stream_;  // re-created by move_to_io_threads
  beast::flat_buffer buf_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<RouteInfo> route_;
  asio::steady_timer heartbeat_;
  const bool reserve_only_;  // over --max-connections: only the health reserve's routes
  std::string peer_;
  Exchange ex_;
  std::shared_ptr<Gen> gen_;
  std::string pending_, out_;  // queued bytes, bytes being written
  bool writing_ = false, complete_ = false, close_after_ = false;
  Clock::time_point last_send_ = Clock::now();
  Clock::time_point linger_until_;
  size_t linger_read_ = 0;
  uint64_t served_ = 0;  // responses completed on this connection
  bool on_io_threads_ = false;  // moved from the front thread (move_to_io_threads)
};

}  // namespace

void HttpServer::Impl::accept() {
  acceptor.async_accept(asio::make_strand(front_ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {
      // Out of file descriptors (or similar): back off instead of spinning on the error.
      log_info("dsv4 serve: accept failed: {} (raise `ulimit -n`?)", ec.message());
      accept_backoff.expires_after(std::chrono::milliseconds(100));
      accept_backoff.async_wait([this](beast::error_code e) {
        if (!e) accept();
      });
      return;
    }
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);  // SSE chunks go out as they are made
    const int open = connections.load();
    if (open >= cfg.max_connections + kHealthReserve) refuse_connection(std::move(socket));
    else std::make_shared<Session>(*this, std::move(socket), open >= cfg.max_connections)->start();
    accept();
  });
}

// Beyond the reserve: a 503 without reading anything, then close.
void HttpServer::Impl::refuse_connection(tcp::socket socket) {
  {
    std::lock_guard<std::mutex> lk(metrics.mu);
    ++metrics.rejected_connections;
  }
  std::string body = error_body(ApiError(503, fmt::format("too many connections (--max-connections {}); try again later",
                                                          cfg.max_connections), "", "service_unavailable_error"));
  auto msg = std::make_shared<std::string>(fmt::format(
      "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\n"
      "Connection: close\r\n\r\n{}", body.size(), body));
  auto sock = std::make_shared<tcp::socket>(std::move(socket));
  asio::async_write(*sock, asio::buffer(*msg), [sock, msg](beast::error_code, size_t) {
    beast::error_code ignored;
    sock->shutdown(tcp::socket::shutdown_both, ignored);
    sock->close(ignored);
  });
}

// ---------------------------------------------------------------- HttpServer

HttpServer::HttpServer(Engine& engine, Tokenizer tok, ServerConfig cfg)
    : cfg_(std::move(cfg)), impl_(std::make_unique<Impl>(engine, std::move(tok), cfg_)) {}

HttpServer::~HttpServer() {
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
}

int HttpServer::bind() {
  Impl* I = impl_.get();
  beast::error_code ec;
  tcp::resolver resolver(I->ioc);
  auto endpoints = resolver.resolve(cfg_.host, std::to_string(cfg_.port), tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || endpoints.empty()) fail("--host: cannot resolve '{}': {}", cfg_.host, ec.message());
  tcp::endpoint ep = endpoints.begin()->endpoint();
  std::string where = fmt::format("{}:{}", cfg_.host, cfg_.port);
  // SO_REUSEADDR (restart while old connections linger in TIME_WAIT), never SO_REUSEPORT: a
  // second server on a busy port must fail here instead of sharing the traffic.
  I->acceptor.open(ep.protocol(), ec);
  if (!ec) I->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) I->acceptor.bind(ep, ec);
  if (ec) fail("--port: cannot listen on {}: {}", where, ec.message());
  I->acceptor.listen(kListenBacklog, ec);
  if (ec) fail("--port: cannot listen on {}: {}", where, ec.message());
  cfg_.port = I->acceptor.local_endpoint().port();
  I->cfg.port = cfg_.port;
  // Every connection is a file descriptor: lift the soft limit as far as the hard one allows.
  rlimit lim{};
  const rlim_t want = rlim_t(cfg_.max_connections) + kHealthReserve + 256;
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < want) {
    lim.rlim_cur = std::min(want, lim.rlim_max);
    setrlimit(RLIMIT_NOFILE, &lim);
    if (lim.rlim_cur < want)
      log_info("dsv4 serve: open files are limited to {} (ulimit -n); --max-connections {} needs about {}", uint64_t(lim.rlim_cur),
               cfg_.max_connections, uint64_t(want));
  }
  return cfg_.port;
}

void HttpServer::run() {
  Impl* I = impl_.get();
  I->accept();
  if (cfg_.stats_interval_s > 0) I->schedule_stats();
  std::vector<std::thread> threads;
  threads.emplace_back([I] {
    pthread_setname_np(pthread_self(), "dsv4-front");  // names as `top -H` shows them
    I->front_ioc.run();
  });
  for (int i = 0; i < cfg_.io_threads; ++i)
    threads.emplace_back([I] {
      pthread_setname_np(pthread_self(), "dsv4-io");
      // When the CPU is contended, the front thread (accepts, /health) goes first: measured with
      // 4,096 streams on 2 busy cores, /health's worst case went from 108-196 ms to 44 ms.
      setpriority(PRIO_PROCESS, pid_t(gettid()), kIoThreadNice);
      I->ioc.run();
    });
  for (auto& t : threads) t.join();
  if (I->watchdog.joinable()) I->watchdog.join();
  // Requests still registered (the shutdown timed out) must not post to a stopped loop.
  std::lock_guard<std::mutex> lk(I->live_mu);
  for (auto& [id, w] : I->live)
    if (auto l = w.lock()) {
      std::lock_guard<std::mutex> lk2(l->mu);
      l->wake = nullptr;
    }
}

void HttpServer::shutdown(bool abort_now) {
  Impl* I = impl_.get();
  bool first = !I->draining.exchange(true);
  if (first) {
    // New generation requests now get 503; wait for the in-flight ones (aborting them after
    // the timeout), then stop the event loop so run() returns.
    double t = cfg_.shutdown_timeout_s;
    I->watchdog = std::thread([I, t] {
      auto in_flight = [I] {
        std::lock_guard<std::mutex> lk(I->metrics.mu);
        return I->metrics.active_http;
      };
      auto deadline = Clock::now() + seconds(t);
      bool aborted = false;
      while (in_flight() > 0) {
        if (!aborted && Clock::now() >= deadline) {
          log_info("dsv4 serve: shutdown timeout; aborting in-flight requests");
          I->abort_all();
          aborted = true;
          deadline = Clock::now() + std::chrono::seconds(15);
        } else if (aborted && Clock::now() >= deadline) {
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      I->front_ioc.stop();
      I->ioc.stop();
    });
  }
  if (abort_now) I->abort_all();
}

}  // namespace dsv4::server
