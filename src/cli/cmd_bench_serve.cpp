// dsv4 bench serve: a serving benchmark client for any OpenAI-compatible server (in the spirit
// of `vllm bench serve`): random or file prompts, burst / request-rate / fixed-concurrency
// modes, concurrency sweeps, warm-up; TTFT/TPOT/ITL/E2E statistics, throughput, failures;
// table on stdout, JSON, CSV and an SVG plot of a sweep.
#include <httplib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "server/sse.h"
#include "util/error.h"
#include "util/log.h"
#include "util/mapped_file.h"

namespace dsv4::cli {

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchOpts {
  std::string base_url = "http://127.0.0.1:8000", endpoint = "/v1/completions", model, api_key;
  std::string dataset = "random";
  int num_prompts = 100;
  int input_len = 128, output_len = 64;
  double range_ratio = 0.0;
  std::string request_rate = "inf";
  double burstiness = 1.0;
  int max_concurrency = 0;
  std::string concurrency_sweep, rate_sweep;
  int warmup = 0;
  uint64_t seed = 0;
  bool ignore_eos = true;
  double timeout_s = 600;
  std::string result_json, result_csv, plot, plot_from, label;
  bool quiet = false;
};

struct Prompt {
  std::string text;
  int output_len = 0;
};

struct Outcome {
  bool ok = false;
  std::string error;
  double ttft = 0, e2e = 0;
  std::vector<double> itl;
  int prompt_tokens = 0, output_tokens = 0;
  Clock::time_point start;
};

// ---------------------------------------------------------------- prompts

const char* kWords[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
    "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so",
    "no", "time", "people", "year", "way", "day", "man", "thing", "world", "life", "hand", "part", "child", "eye",
    "place", "work", "week", "case", "point", "number", "group", "problem", "fact", "water", "room", "money", "story",
    "book", "word", "house", "light", "night", "city", "tree", "river", "music", "paper", "market", "model", "system"};

std::vector<Prompt> make_prompts(const BenchOpts& o, int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto len_of = [&](int base) {
    if (o.range_ratio <= 0) return base;
    int lo = std::max(1, int(std::floor(base * (1 - o.range_ratio)))), hi = std::max(lo, int(std::ceil(base * (1 + o.range_ratio))));
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  std::vector<Prompt> out;
  if (o.dataset == "random") {
    for (int i = 0; i < count; ++i) {
      Prompt p;
      int n = len_of(o.input_len);
      for (int w = 0; w < n; ++w) {
        if (w) p.text += ' ';
        p.text += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
      }
      p.output_len = len_of(o.output_len);
      out.push_back(std::move(p));
    }
    return out;
  }
  // A file: JSON lines with "prompt" (and optional "output_len"), or plain text lines.
  std::ifstream f(o.dataset);
  if (!f) fail("--dataset: cannot open '{}'", o.dataset);
  std::vector<Prompt> all;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    Prompt p;
    p.output_len = o.output_len;
    if (line[0] == '{') {
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("prompt") || !j["prompt"].is_string())
        fail("--dataset: '{}': a JSON line needs a string \"prompt\"", o.dataset);
      p.text = j["prompt"].get<std::string>();
      if (j.contains("output_len") && j["output_len"].is_number_integer()) p.output_len = j["output_len"].get<int>();
    } else {
      p.text = line;
    }
    all.push_back(std::move(p));
  }
  if (all.empty()) fail("--dataset: '{}' has no prompts", o.dataset);
  for (int i = 0; i < count; ++i) out.push_back(all[size_t(i) % all.size()]);
  return out;
}

// ---------------------------------------------------------------- one request

struct Target {
  std::string scheme_host_port;  // for httplib::Client
  std::string prefix;            // path prefix from the base URL
};

Target parse_base(std::string url) {
  Target t;
  while (!url.empty() && url.back() == '/') url.pop_back();
  size_t scheme = url.find("://");
  size_t path = url.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  t.scheme_host_port = path == std::string::npos ? url : url.substr(0, path);
  t.prefix = path == std::string::npos ? "" : url.substr(path);
  if (t.scheme_host_port.rfind("http://", 0) != 0 && t.scheme_host_port.rfind("https://", 0) != 0)
    t.scheme_host_port = "http://" + t.scheme_host_port;
  return t;
}

std::string join_path(const Target& t, const std::string& endpoint) {
  // --base-url http://h:p/v1 with --endpoint /v1/completions: do not double the /v1.
  if (!t.prefix.empty() && endpoint.rfind(t.prefix + "/", 0) == 0) return endpoint;
  return t.prefix + endpoint;
}

std::unique_ptr<httplib::Client> client_for(const Target& t, const BenchOpts& o) {
  auto c = std::make_unique<httplib::Client>(t.scheme_host_port);
  c->set_connection_timeout(10, 0);
  c->set_read_timeout(time_t(o.timeout_s), 0);
  c->set_write_timeout(30, 0);
  return c;
}

Outcome run_one(const Target& t, const BenchOpts& o, const Prompt& p) {
  Outcome r;
  bool chat = o.endpoint.find("chat") != std::string::npos;
  json body = {{"model", o.model}, {"max_tokens", p.output_len}, {"stream", true},
               {"stream_options", {{"include_usage", true}}}, {"temperature", 0.0}};
  if (o.ignore_eos) body["ignore_eos"] = true;
  if (chat) body["messages"] = json::array({{{"role", "user"}, {"content", p.text}}});
  else body["prompt"] = p.text;
  auto cli = client_for(t, o);
  httplib::Request req;
  req.method = "POST";
  req.path = join_path(t, o.endpoint);
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  if (!o.api_key.empty()) req.set_header("Authorization", "Bearer " + o.api_key);
  server::SseParser sse;
  std::string raw;  // an error body
  int status = 0;
  bool first = false, done = false;
  int chunks = 0;
  Clock::time_point last;
  r.start = Clock::now();
  auto on_data = [&](const std::string& d) {
    if (d == "[DONE]") {
      done = true;
      return;
    }
    json j = json::parse(d, nullptr, false);
    if (j.is_discarded()) return;
    if (j.contains("error")) {
      r.error = j["error"].value("message", "error event");
      return;
    }
    if (j.contains("usage") && j["usage"].is_object()) {
      r.prompt_tokens = j["usage"].value("prompt_tokens", 0);
      r.output_tokens = j["usage"].value("completion_tokens", 0);
    }
    bool has_text = false;
    if (j.contains("choices"))
      for (auto& c : j["choices"]) {
        if (chat && c.contains("delta")) {
          auto& dl = c["delta"];
          for (const char* k : {"content", "reasoning_content"})
            if (dl.contains(k) && dl[k].is_string() && !dl[k].get<std::string>().empty()) has_text = true;
          if (dl.contains("tool_calls")) has_text = true;
        } else if (!chat && c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) {
          has_text = true;
        }
      }
    if (!has_text) return;
    auto now = Clock::now();
    ++chunks;
    if (!first) {
      first = true;
      r.ttft = std::chrono::duration<double>(now - r.start).count();
    } else {
      r.itl.push_back(std::chrono::duration<double>(now - last).count());
    }
    last = now;
  };
  req.response_handler = [&](const httplib::Response& res) {
    status = res.status;
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (status != 200) {
      raw.append(data, n);
      return true;
    }
    for (auto& d : sse.feed(std::string_view(data, n))) on_data(d);
    return true;
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  bool sent = cli->send(req, res, err);
  r.e2e = std::chrono::duration<double>(Clock::now() - r.start).count();
  for (auto& d : sse.finish()) on_data(d);
  if (!sent) {
    r.error = "connection failed: " + httplib::to_string(err);
  } else if (status != 200) {
    json j = json::parse(raw, nullptr, false);
    r.error = fmt::format("HTTP {}: {}", status,
                          !j.is_discarded() && j.contains("error") ? j["error"].value("message", raw) : raw.substr(0, 200));
  } else if (!done && r.error.empty()) {
    r.error = "stream ended without [DONE]";
  } else if (!first && r.error.empty()) {
    r.error = "no tokens received";
  }
  if (r.output_tokens == 0) r.output_tokens = chunks;
  r.ok = r.error.empty();
  return r;
}

// The server's speculative-decoding counters (dsv4's Prometheus /metrics, at the root of the
// host): draft tokens, accepted drafts, verify passes. Empty when the server exports none.
std::optional<std::array<double, 3>> spec_counters(const Target& t, const BenchOpts& o) {
  auto cli = client_for(t, o);
  httplib::Headers h;
  if (!o.api_key.empty()) h.emplace("Authorization", "Bearer " + o.api_key);
  auto res = cli->Get("/metrics", h);
  if (!res || res->status != 200) return std::nullopt;
  const char* names[] = {"dsv4_spec_decode_num_draft_tokens_total", "dsv4_spec_decode_num_accepted_tokens_total",
                         "dsv4_spec_decode_num_verify_steps_total"};
  std::array<double, 3> v{};
  std::array<bool, 3> found{};
  std::istringstream in(res->body);
  for (std::string line; std::getline(in, line);)
    for (size_t i = 0; i < 3; ++i)
      if (line.rfind(std::string(names[i]) + " ", 0) == 0) {
        v[i] = std::strtod(line.c_str() + std::strlen(names[i]) + 1, nullptr);
        found[i] = true;
      }
  if (!found[0] || !found[1] || !found[2]) return std::nullopt;
  return v;
}

// ---------------------------------------------------------------- statistics

struct Stat {
  double mean = 0, median = 0, p90 = 0, p99 = 0, stdev = 0;
};

Stat stat_of(std::vector<double> v) {
  Stat s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  double var = 0;
  for (double x : v) var += (x - s.mean) * (x - s.mean);
  s.stdev = std::sqrt(var / double(v.size()));
  auto pct = [&](double p) {  // linear interpolation (numpy's default)
    double idx = p / 100.0 * double(v.size() - 1);
    size_t lo = size_t(std::floor(idx)), hi = std::min(v.size() - 1, lo + 1);
    return v[lo] + (v[hi] - v[lo]) * (idx - double(lo));
  };
  s.median = pct(50);
  s.p90 = pct(90);
  s.p99 = pct(99);
  return s;
}

json stat_json(const Stat& s) {  // milliseconds
  return {{"mean", s.mean * 1e3}, {"median", s.median * 1e3}, {"p90", s.p90 * 1e3}, {"p99", s.p99 * 1e3}, {"std", s.stdev * 1e3}};
}

struct Point {
  std::string mode;  // "burst", "rate", "concurrency"
  double request_rate = INFINITY;
  int max_concurrency = 0;
};

json run_point(const Target& t, const BenchOpts& o, const Point& pt, const std::vector<Prompt>& prompts,
               const std::vector<Prompt>& warm) {
  // Warm-up (not measured).
  if (!warm.empty()) {
    std::vector<std::thread> th;
    int conc = pt.max_concurrency > 0 ? pt.max_concurrency : int(warm.size());
    for (size_t i = 0; i < warm.size(); i += size_t(conc)) {
      for (size_t k = i; k < std::min(warm.size(), i + size_t(conc)); ++k)
        th.emplace_back([&, k] { run_one(t, o, warm[k]); });
      for (auto& x : th) x.join();
      th.clear();
    }
  }
  const auto spec_before = spec_counters(t, o);
  std::vector<Outcome> out(prompts.size());
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, peak = 0;
  std::atomic<size_t> finished{0};
  std::mt19937_64 rng(o.seed + 17);
  std::vector<std::thread> threads;
  std::string label = pt.mode == "concurrency" ? fmt::format("concurrency {}", pt.max_concurrency)
                      : std::isinf(pt.request_rate) ? std::string("burst")
                                                    : fmt::format("rate {:g}/s", pt.request_rate);
  ProgressBar bar(o.quiet ? "" : "bench " + label, prompts.size());
  auto t0 = Clock::now();
  auto next_arrival = t0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (!std::isinf(pt.request_rate)) {
      // Gamma-distributed gaps with mean 1/rate; burstiness 1 = Poisson.
      std::gamma_distribution<double> gap(o.burstiness, 1.0 / (pt.request_rate * o.burstiness));
      if (i > 0) next_arrival += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
      std::this_thread::sleep_until(next_arrival);
    }
    {
      std::unique_lock<std::mutex> lk(mu);
      if (pt.max_concurrency > 0) cv.wait(lk, [&] { return in_flight < pt.max_concurrency; });
      ++in_flight;
      peak = std::max(peak, in_flight);
    }
    threads.emplace_back([&, i] {
      out[i] = run_one(t, o, prompts[i]);
      {
        std::lock_guard<std::mutex> lk(mu);
        --in_flight;
        if (!o.quiet) bar.advance(1);
      }
      ++finished;
      cv.notify_all();
    });
  }
  for (auto& x : threads) x.join();
  if (!o.quiet) bar.finish();
  double duration = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto spec_after = spec_before ? spec_counters(t, o) : std::nullopt;

  std::vector<double> ttft, tpot, itl, e2e;
  int64_t in_tok = 0, out_tok = 0;
  int ok = 0;
  json errors = json::array();
  for (auto& r : out) {
    if (!r.ok) {
      if (errors.size() < 10) errors.push_back(r.error);
      continue;
    }
    ++ok;
    in_tok += r.prompt_tokens;
    out_tok += r.output_tokens;
    ttft.push_back(r.ttft);
    e2e.push_back(r.e2e);
    if (r.output_tokens > 1) tpot.push_back((r.e2e - r.ttft) / double(r.output_tokens - 1));
    itl.insert(itl.end(), r.itl.begin(), r.itl.end());
  }
  json j;
  j["mode"] = pt.mode;
  j["request_rate"] = std::isinf(pt.request_rate) ? json("inf") : json(pt.request_rate);
  j["max_concurrency"] = pt.max_concurrency > 0 ? json(pt.max_concurrency) : json(nullptr);
  j["num_prompts"] = prompts.size();
  j["completed"] = ok;
  j["failed"] = int(prompts.size()) - ok;
  j["errors"] = errors;
  j["duration_s"] = duration;
  j["peak_concurrency"] = peak;
  j["total_input_tokens"] = in_tok;
  j["total_output_tokens"] = out_tok;
  j["request_throughput"] = ok / duration;
  j["output_throughput"] = double(out_tok) / duration;
  j["total_token_throughput"] = double(in_tok + out_tok) / duration;
  j["ttft_ms"] = stat_json(stat_of(ttft));
  j["tpot_ms"] = stat_json(stat_of(tpot));
  j["itl_ms"] = stat_json(stat_of(itl));
  j["e2el_ms"] = stat_json(stat_of(e2e));
  // Speculative decoding during the run (the server's counters before and after it; requests of
  // other clients in that time count too).
  if (spec_before && spec_after && (*spec_after)[0] > (*spec_before)[0]) {
    const double drafts = (*spec_after)[0] - (*spec_before)[0], accepted = (*spec_after)[1] - (*spec_before)[1],
                 passes = (*spec_after)[2] - (*spec_before)[2];
    j["spec_decode"] = {{"draft_tokens", drafts},
                        {"accepted_tokens", accepted},
                        {"verify_passes", passes},
                        {"acceptance_rate", accepted / drafts},
                        {"mean_acceptance_length", (accepted + passes) / passes}};
  }
  return j;
}

void print_point(const json& j) {
  auto line = [](const std::string& k, const std::string& v) { std::printf("%-40s %s\n", k.c_str(), v.c_str()); };
  std::printf("============ Serving Benchmark Result ============\n");
  line("Mode:", j["mode"].get<std::string>());
  line("Request rate (req/s):", j["request_rate"].is_string() ? "inf" : fmt::format("{:g}", j["request_rate"].get<double>()));
  line("Max concurrency:", j["max_concurrency"].is_null() ? "unlimited" : std::to_string(j["max_concurrency"].get<int>()));
  line("Successful requests:", std::to_string(j["completed"].get<int>()));
  line("Failed requests:", std::to_string(j["failed"].get<int>()));
  line("Benchmark duration (s):", fmt::format("{:.2f}", j["duration_s"].get<double>()));
  line("Total input tokens:", std::to_string(j["total_input_tokens"].get<int64_t>()));
  line("Total generated tokens:", std::to_string(j["total_output_tokens"].get<int64_t>()));
  line("Request throughput (req/s):", fmt::format("{:.2f}", j["request_throughput"].get<double>()));
  line("Output token throughput (tok/s):", fmt::format("{:.2f}", j["output_throughput"].get<double>()));
  line("Total token throughput (tok/s):", fmt::format("{:.2f}", j["total_token_throughput"].get<double>()));
  for (auto [key, title] : {std::pair{"ttft_ms", "Time to First Token"}, {"tpot_ms", "Time per Output Token (excl. 1st token)"},
                            {"itl_ms", "Inter-token Latency"}, {"e2el_ms", "End-to-end Latency"}}) {
    std::printf("%s\n", fmt::format("{:-^50}", " " + std::string(title) + " ").c_str());
    const json& s = j[key];
    std::string k(key);
    std::string name = k.substr(0, k.size() - 3);
    for (auto& n : name) n = char(std::toupper(static_cast<unsigned char>(n)));
    line(fmt::format("Mean {} (ms):", name), fmt::format("{:.2f}", s["mean"].get<double>()));
    line(fmt::format("Median {} (ms):", name), fmt::format("{:.2f}", s["median"].get<double>()));
    line(fmt::format("P90 {} (ms):", name), fmt::format("{:.2f}", s["p90"].get<double>()));
    line(fmt::format("P99 {} (ms):", name), fmt::format("{:.2f}", s["p99"].get<double>()));
  }
  if (j.contains("spec_decode")) {
    const json& sd = j["spec_decode"];
    std::printf("%s\n", fmt::format("{:-^50}", " Speculative Decoding ").c_str());
    line("Draft tokens:", fmt::format("{:.0f}", sd["draft_tokens"].get<double>()));
    line("Accepted draft tokens:", fmt::format("{:.0f}", sd["accepted_tokens"].get<double>()));
    line("Verify passes with drafts:", fmt::format("{:.0f}", sd["verify_passes"].get<double>()));
    line("Acceptance rate (%):", fmt::format("{:.2f}", 100 * sd["acceptance_rate"].get<double>()));
    line("Mean acceptance length:", fmt::format("{:.3f}", sd["mean_acceptance_length"].get<double>()));
  }
  for (auto& e : j["errors"]) std::printf("error: %s\n", e.get<std::string>().c_str());
  std::printf("==================================================\n");
  std::fflush(stdout);
}

const char* kCsvCols[] = {"mode", "request_rate", "max_concurrency", "num_prompts", "completed", "failed", "duration_s",
                          "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
                          "total_token_throughput"};

void write_csv(const std::string& path, const json& points) {
  std::ofstream f(path);
  if (!f) fail("--result-csv: cannot write '{}'", path);
  for (const char* c : kCsvCols) f << c << ',';
  const char* lat[] = {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"};
  const char* st[] = {"mean", "median", "p90", "p99"};
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) f << lat[a] << '_' << st[b] << (a == 3 && b == 3 ? "\n" : ",");
  for (const auto& p : points) {
    for (const char* c : kCsvCols) {
      const json& v = p[c];
      if (v.is_null()) f << "";
      else if (v.is_string()) f << v.get<std::string>();
      else if (v.is_number_float()) f << fmt::format("{:.6g}", v.get<double>());
      else f << v.dump();
      f << ',';
    }
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) f << fmt::format("{:.4f}", p[lat[a]][st[b]].get<double>()) << (a == 3 && b == 3 ? "\n" : ",");
  }
}

// The swept variable of a set of points: request rate when any point ran at a finite rate, else
// max concurrency (a point without a cap, a burst, is "inf" on that axis).
enum class SweepAxis { RequestRate, Concurrency };

SweepAxis sweep_axis(const json& points) {
  for (const auto& p : points)
    if (p.value("mode", "") == "rate") return SweepAxis::RequestRate;
  return SweepAxis::Concurrency;
}

// A point's x: its request rate or max concurrency; infinity for "inf" or no cap.
double sweep_x(const json& p, SweepAxis axis) {
  const json& v = axis == SweepAxis::RequestRate ? p["request_rate"] : p["max_concurrency"];
  return v.is_number() ? v.get<double>() : INFINITY;
}

// Tick step of about `target` steps over [0, span]: 1, 2 or 5 times a power of ten.
double nice_step(double span, int target) {
  double raw = span / target, mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

std::string tick_label(double v) {
  if (std::abs(v) >= 1e6) return fmt::format("{:g}M", v / 1e6);
  if (std::abs(v) >= 1e4) return fmt::format("{:g}k", v / 1e3);
  return fmt::format("{:g}", v);
}

std::string xml_escape(const std::string& t) {
  std::string out;
  for (char c : t) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

// An SVG of a sweep: throughput (left) and latency percentiles (right) against the swept
// variable. Concurrency is on a log2 axis (sweeps double it); request rate on a linear one.
// "inf" points (a burst, no cap) sit in their own slot at the right end, past a dashed break,
// labelled "inf". Legends go below the panels so they never cover a line.
void write_svg(const std::string& path, const json& points, SweepAxis axis, const std::string& title) {
  struct Series {
    std::string name, color;
    std::vector<double> y;
  };
  // Points in x order, inf last.
  std::vector<size_t> order(points.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sweep_x(points[a], axis) < sweep_x(points[b], axis); });
  std::vector<double> xs;
  for (size_t i : order) xs.push_back(sweep_x(points[i], axis));
  auto col = [&](const char* k, const char* stat) {
    std::vector<double> v;
    for (size_t i : order) v.push_back(stat ? points[i][k][stat].get<double>() : points[i][k].get<double>());
    return v;
  };
  std::vector<Series> left = {{"output tok/s", "#1f77b4", col("output_throughput", nullptr)},
                              {"total tok/s", "#2ca02c", col("total_token_throughput", nullptr)}};
  std::vector<Series> right = {{"TTFT p50", "#ff7f0e", col("ttft_ms", "median")}, {"TTFT p99", "#d62728", col("ttft_ms", "p99")},
                               {"TPOT p50", "#9467bd", col("tpot_ms", "median")}, {"ITL p99", "#8c564b", col("itl_ms", "p99")},
                               {"E2E p50", "#7f7f7f", col("e2el_ms", "median")}};
  const bool log_x = axis == SweepAxis::Concurrency;
  const std::string xname = log_x ? "max concurrency (log scale)" : "request rate (req/s)";
  const bool has_inf = !xs.empty() && std::isinf(xs.back());
  std::vector<double> finite(xs.begin(), xs.end() - (has_inf ? 1 : 0));
  while (!finite.empty() && std::isinf(finite.back())) finite.pop_back();
  const size_t n_inf = xs.size() - finite.size();

  const double W = 1000, H = 540, pw = 380, ph = 300, top = 60, legend_top = top + ph + 52;
  const double inf_slot = has_inf ? 56 : 0;  // the right end of the axis that holds "inf"
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">{}</text>\n",
      W, H, W, H, W / 2, xml_escape(title));
  // Finite x -> fraction of the finite part of the axis.
  double lo = 0, hi = 1;
  if (!finite.empty()) {
    lo = log_x ? std::log2(finite.front()) : 0.0;
    hi = log_x ? std::log2(finite.back()) : finite.back();
    if (!log_x) hi = std::ceil(hi / nice_step(hi, 5)) * nice_step(hi, 5);
    if (hi <= lo) hi = lo + 1;
  }
  auto panel = [&](double left_x, const std::vector<Series>& series, const std::string& ylabel) {
    const double pad = 12, fin_w = pw - inf_slot - 2 * pad;
    auto X = [&](double x) {
      if (std::isinf(x)) return left_x + pw - inf_slot / 2;
      double f = ((log_x ? std::log2(x) : x) - lo) / (hi - lo);
      return left_x + pad + (finite.empty() ? 0.5 : f) * fin_w;
    };
    double ymax = 0;
    for (const auto& se : series)
      for (double y : se.y) ymax = std::max(ymax, y);
    const double ystep = nice_step(ymax > 0 ? ymax * 1.05 : 1, 6);
    const double ytop = std::ceil((ymax > 0 ? ymax * 1.05 : 1) / ystep) * ystep;
    auto Y = [&](double y) { return top + ph - y / ytop * ph; };
    s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", left_x, top, pw, ph);
    for (double y = 0; y <= ytop + ystep / 2; y += ystep)
      s += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
                       "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                       left_x, Y(y), left_x + pw, Y(y), left_x - 6, Y(y) + 4, tick_label(y));
    // x ticks: the points' own values on the log axis, round steps on the linear one; a label
    // too close to the previous one is left out.
    std::vector<double> ticks;
    if (log_x) {
      ticks = finite;
      ticks.erase(std::unique(ticks.begin(), ticks.end()), ticks.end());
    } else if (!finite.empty()) {
      for (double x = 0, step = nice_step(hi, 5); x <= hi + step / 2; x += step) ticks.push_back(x);
    }
    double last_label = -1e9;
    for (double x : ticks) {
      double px = X(x);
      s += fmt::format("<line x1=\"{:.1f}\" y1=\"{}\" x2=\"{:.1f}\" y2=\"{}\" stroke=\"#eee\"/>\n", px, top, px, top + ph);
      if (px - last_label < 30) continue;
      s += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px, top + ph + 16, tick_label(x));
      last_label = px;
    }
    if (has_inf) {
      double bx = left_x + pw - inf_slot;
      s += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\n", bx, top,
                       bx, top + ph);
      s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">inf</text>\n", X(INFINITY), top + ph + 16);
    }
    s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", left_x + pw / 2, top + ph + 36, xname);
    s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">{}</text>\n", left_x - 52,
                     top + ph / 2, left_x - 52, top + ph / 2, ylabel);
    int li = 0;
    for (const auto& se : series) {
      // The line joins the finite points; the inf point hangs off it with a dotted segment.
      std::string pts;
      for (size_t i = 0; i < finite.size(); ++i) pts += fmt::format("{:.1f},{:.1f} ", X(xs[i]), Y(se.y[i]));
      s += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>\n", pts, se.color);
      if (n_inf > 0 && !finite.empty())
        s += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\" "
                         "stroke-dasharray=\"2 3\"/>\n",
                         X(finite.back()), Y(se.y[finite.size() - 1]), X(INFINITY), Y(se.y[finite.size()]), se.color);
      for (size_t i = 0; i < xs.size(); ++i)
        s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", X(xs[i]), Y(se.y[i]), se.color);
      // Legend below the panel, three entries a row.
      double lx = left_x + (li % 3) * (pw / 3), ly = legend_top + (li / 3) * 18;
      s += fmt::format("<g class=\"legend\"><rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/>"
                       "<text x=\"{}\" y=\"{}\">{}</text></g>\n",
                       lx, ly - 4, se.color, lx + 20, ly, se.name);
      ++li;
    }
  };
  panel(80, left, "tokens / s");
  panel(580, right, "latency (ms)");
  s += "</svg>\n";
  std::ofstream f(path);
  if (!f) fail("--plot: cannot write '{}'", path);
  f << s;
}

std::string plot_title(const json& config) {
  std::string label = config.value("label", "");
  return fmt::format("dsv4 bench serve: {} ({} in / {} out tokens, {} prompts)", label.empty() ? config.value("model", "") : label,
                     config.value("input_len", 0), config.value("output_len", 0), config.value("num_prompts", 0));
}

// --plot-from: the plot of a saved --result-json, without running anything.
int plot_saved_results(const BenchOpts& o) {
  if (o.plot.empty()) fail("--plot-from needs --plot (the SVG to write)");
  json all;
  try {
    all = json::parse(read_text_file(o.plot_from));
  } catch (const std::exception& e) {
    fail("--plot-from: cannot read '{}': {}", o.plot_from, e.what());
  }
  if (!all.contains("results") || !all["results"].is_array() || all["results"].empty())
    fail("--plot-from: '{}' has no results (write it with --result-json)", o.plot_from);
  write_svg(o.plot, all["results"], sweep_axis(all["results"]), plot_title(all.value("config", json::object())));
  return 0;
}

std::vector<double> parse_list(const std::string& s, const char* flag) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      double x = item == "inf" ? INFINITY : std::stod(item, &used);
      if (item != "inf" && used != item.size()) throw std::invalid_argument(item);
      if (!(x > 0)) throw std::invalid_argument(item);
      v.push_back(x);
    } catch (const std::exception&) {
      fail("{}: '{}' is not a positive number", flag, item);
    }
  }
  if (v.empty()) fail("{}: empty list", flag);
  return v;
}

int bench_serve(BenchOpts o) {
  if (!o.plot_from.empty()) return plot_saved_results(o);
  Target t = parse_base(o.base_url);
  if (o.model.empty()) {
    auto cli = client_for(t, o);
    httplib::Headers h;
    if (!o.api_key.empty()) h.emplace("Authorization", "Bearer " + o.api_key);
    auto res = cli->Get(join_path(t, "/v1/models").c_str(), h);
    if (!res || res->status != 200)
      fail("--model not given and GET {}/v1/models failed ({})", o.base_url,
           res ? fmt::format("HTTP {}", res->status) : httplib::to_string(res.error()));
    json j = json::parse(res->body, nullptr, false);
    if (j.is_discarded() || !j.contains("data") || j["data"].empty()) fail("--model: the server lists no models");
    o.model = j["data"][0]["id"].get<std::string>();
  }
  std::vector<Point> points;
  if (!o.concurrency_sweep.empty()) {
    for (double c : parse_list(o.concurrency_sweep, "--concurrency-sweep")) {
      if (std::isinf(c) || c != std::floor(c)) fail("--concurrency-sweep: '{}' is not an integer", c);
      points.push_back({"concurrency", INFINITY, int(c)});
    }
  } else if (!o.rate_sweep.empty()) {
    for (double r : parse_list(o.rate_sweep, "--rate-sweep")) points.push_back({std::isinf(r) ? "burst" : "rate", r, o.max_concurrency});
  } else {
    double r = parse_list(o.request_rate, "--request-rate")[0];
    std::string mode = o.max_concurrency > 0 && std::isinf(r) ? "concurrency" : std::isinf(r) ? "burst" : "rate";
    points.push_back({mode, r, o.max_concurrency});
  }
  auto prompts = make_prompts(o, o.num_prompts, o.seed);
  auto warm = make_prompts(o, o.warmup, o.seed + 1000003);
  if (!o.quiet)
    log_info("bench serve: {} {} model '{}', {} prompts (input ~{}, output {}), {} point(s)", o.base_url, o.endpoint, o.model,
             o.num_prompts, o.input_len, o.output_len, points.size());
  json results = json::array();
  for (const auto& pt : points) {
    json j = run_point(t, o, pt, prompts, warm);
    print_point(j);
    results.push_back(j);
  }
  json cfg = {{"base_url", o.base_url}, {"endpoint", o.endpoint}, {"model", o.model}, {"dataset", o.dataset},
              {"num_prompts", o.num_prompts}, {"input_len", o.input_len}, {"output_len", o.output_len},
              {"range_ratio", o.range_ratio}, {"burstiness", o.burstiness}, {"warmup", o.warmup}, {"seed", o.seed},
              {"ignore_eos", o.ignore_eos}, {"label", o.label}};
  json all = {{"config", cfg}, {"results", results},
              {"date", std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()}};
  if (!o.result_json.empty()) {
    std::ofstream f(o.result_json);
    if (!f) fail("--result-json: cannot write '{}'", o.result_json);
    f << all.dump(2) << "\n";
  }
  if (!o.result_csv.empty()) write_csv(o.result_csv, results);
  if (!o.plot.empty()) write_svg(o.plot, results, sweep_axis(results), plot_title(cfg));
  int failed = 0;
  for (auto& r : results) failed += r["failed"].get<int>();
  return failed == 0 ? 0 : 3;
}

}  // namespace

void register_bench(CLI::App& app, Action& action) {
  auto* bench = app.get_subcommands([](CLI::App* a) { return a->get_name() == "bench"; }).empty()
                    ? app.add_subcommand("bench", "Benchmarks")
                    : app.get_subcommand("bench");
  bench->require_subcommand(1);
  auto o = std::make_shared<BenchOpts>();
  auto* cmd = bench->add_subcommand("serve", "Serving benchmark against an OpenAI-compatible server (like vllm bench serve)");
  cmd->add_option("--base-url", o->base_url, "Server URL")->capture_default_str();
  cmd->add_option("--endpoint", o->endpoint, "/v1/completions or /v1/chat/completions")->capture_default_str();
  cmd->add_option("--model", o->model, "Model id (default: the first of GET /v1/models)");
  cmd->add_option("--api-key", o->api_key, "Bearer token")->envname("OPENAI_API_KEY");
  cmd->add_option("--dataset", o->dataset, "random, or a file: JSON lines {\"prompt\", \"output_len\"?} or text lines")->capture_default_str();
  cmd->add_option("--num-prompts", o->num_prompts, "Measured requests per point")->capture_default_str()->check(CLI::Range(1, 1000000));
  cmd->add_option("--input-len", o->input_len, "Random prompt length (words, about one token each)")->capture_default_str()->check(CLI::Range(1, 10000000));
  cmd->add_option("--output-len", o->output_len, "max_tokens per request")->capture_default_str()->check(CLI::Range(1, 10000000));
  cmd->add_option("--range-ratio", o->range_ratio, "Lengths drawn uniformly from [len*(1-r), len*(1+r)]")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--request-rate", o->request_rate, "Requests per second (inf: all at once)")->capture_default_str();
  cmd->add_option("--burstiness", o->burstiness, "Gamma shape of arrival gaps (1: Poisson)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--max-concurrency", o->max_concurrency, "Cap on requests in flight (0: none)")->capture_default_str()->check(CLI::Range(0, 100000));
  cmd->add_option("--concurrency-sweep", o->concurrency_sweep, "Comma list of fixed concurrencies, one point each (e.g. 1,2,4,8)");
  cmd->add_option("--rate-sweep", o->rate_sweep, "Comma list of request rates, one point each (inf allowed)");
  cmd->add_option("--warmup", o->warmup, "Unmeasured requests before each point")->capture_default_str()->check(CLI::Range(0, 100000));
  cmd->add_option("--seed", o->seed, "Prompt / arrival seed")->capture_default_str();
  cmd->add_option("--ignore-eos", o->ignore_eos, "Send ignore_eos so every request generates output-len tokens")->capture_default_str();
  cmd->add_option("--timeout", o->timeout_s, "Per-request read timeout (s)")->capture_default_str();
  cmd->add_option("--result-json", o->result_json, "Write config + every point as JSON");
  cmd->add_option("--result-csv", o->result_csv, "Write one CSV row per point");
  cmd->add_option("--plot", o->plot, "Write an SVG plot of the points (throughput and latency vs the swept variable)");
  cmd->add_option("--plot-from", o->plot_from, "Only write --plot, from the points of a saved --result-json file");
  cmd->add_option("--label", o->label, "Name shown in the plot and the JSON");
  cmd->add_flag("--quiet", o->quiet, "No progress bar");
  cmd->callback([o, &action] { action = [o] { return bench_serve(*o); }; });
}

}  // namespace dsv4::cli
