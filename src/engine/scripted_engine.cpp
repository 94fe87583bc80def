#include "engine/scripted_engine.h"

#include <algorithm>
#include <cmath>

#include "engine/output_processor.h"
#include "util/error.h"
#include "util/random.h"

namespace dsv4 {

struct ScriptedEngine::Sample {
  int32_t index = 0;
  std::vector<int32_t> generated;
  std::unique_ptr<OutputProcessor> output;
  bool done = false;
};

struct ScriptedEngine::Live {
  Request req;
  EventSink sink;
  uint64_t prompt_hash = 0;
  uint64_t seed = 0;
  std::vector<Sample> samples;
  bool prefilled = false;
};

namespace {
uint64_t mix(uint64_t a, uint64_t b) {
  Rng r(a ^ (b * 0x9e3779b97f4a7c15ull));
  return r.next_u64();
}
}  // namespace

ScriptedEngine::ScriptedEngine(Tokenizer tok, Options opts) : tok_(std::move(tok)), opts_(opts) {
  for (int32_t id = 0; id < tok_.vocab_size(); ++id) {
    if (!tok_.contains(id) || tok_.is_special(id) || tok_.is_added(id)) continue;
    // Printable ASCII tokens only, so the scripted text is readable and splits on tokens.
    auto b = tok_.token_bytes(id);
    bool ok = !b.empty() && std::all_of(b.begin(), b.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
    if (ok) plain_.push_back(id);
  }
  if (plain_.empty()) fail("scripted engine: the tokenizer has no printable tokens");
  eos_ = tok_.eos_id();
  m_.blocks_total = opts_.blocks_total;
  m_.blocks_free = opts_.blocks_total;
  m_.capacity_tokens = opts_.blocks_total * opts_.block_size;
  thread_ = std::thread([this] { loop(); });
}

ScriptedEngine::~ScriptedEngine() { shutdown(false); }

std::string ScriptedEngine::submit(Request req, EventSink sink) {
  const SamplingParams& s = req.sampling;
  if (req.prompt.empty()) reject(EngineError::Kind::InvalidRequest, "prompt", "must not be empty");
  if (int64_t(req.prompt.size()) + s.max_tokens > opts_.context)
    reject(EngineError::Kind::ContextLength, "max_tokens", "prompt ({} tokens) + max_tokens ({}) exceeds the context ({})", req.prompt.size(), s.max_tokens,
         opts_.context);
  if (s.n < 1) reject(EngineError::Kind::InvalidRequest, "n", "must be >= 1");
  if (s.max_tokens < 0 || (s.max_tokens == 0 && s.prompt_logprobs < 0))
    reject(EngineError::Kind::InvalidRequest, "max_tokens", "must be >= 1 (0 only for prompt scoring), got {}", s.max_tokens);
  for (const auto& st : s.stop)
    if (st.empty()) reject(EngineError::Kind::InvalidRequest, "stop", "stop strings must not be empty");
  for (int32_t t : req.prompt)
    if (!tok_.contains(t)) reject(EngineError::Kind::InvalidRequest, "prompt", "token id {} is not in the vocabulary", t);
  auto live = std::make_shared<Live>();
  uint64_t h = 0xcbf29ce484222325ull;
  for (int32_t t : req.prompt) h = (h ^ uint32_t(t)) * 0x100000001b3ull;
  live->prompt_hash = h;
  std::lock_guard<std::mutex> lk(mu_);
  if (!accepting_) reject(EngineError::Kind::Unavailable, "", "engine: shutting down");
  if (req.id.empty()) req.id = "req-" + std::to_string(++next_id_);
  live->seed = s.seed ? *s.seed : (s.temperature == 0 ? 0 : mix(++next_id_, 77));
  live->req = std::move(req);
  live->sink = std::move(sink);
  for (int32_t i = 0; i < live->req.sampling.n; ++i) {
    Sample smp;
    smp.index = i;
    std::vector<int32_t> eos;
    if (eos_) eos.push_back(*eos_);
    smp.output = std::make_unique<OutputProcessor>(&tok_, live->req.sampling, eos, live->req.sampling.max_tokens);
    live->samples.push_back(std::move(smp));
  }
  std::string id = live->req.id;
  waiting_.push_back(std::move(live));
  cv_.notify_all();
  return id;
}

void ScriptedEngine::abort(const std::string& id) {
  std::lock_guard<std::mutex> lk(mu_);
  aborts_.push_back(id);
  cv_.notify_all();
}

EngineMetrics ScriptedEngine::metrics() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineMetrics m = m_;
  m.waiting = int64_t(waiting_.size());
  m.running = int64_t(running_.size());
  int64_t used = 0;
  for (const auto& r : running_) {
    int64_t toks = int64_t(r->req.prompt.size());
    for (const auto& s : r->samples) toks += int64_t(s.generated.size());
    used += (toks + opts_.block_size - 1) / opts_.block_size;
  }
  m.blocks_free = std::max<int64_t>(0, m.blocks_total - used);
  return m;
}

void ScriptedEngine::shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    accepting_ = false;
    if (!drain) drain_ = false;
    stop_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
}

// A deterministic stand-in logprob of `tok` at `position`, with k alternatives (tok first).
TokenLogprob ScriptedEngine::scripted_logprob(int32_t tok, uint64_t position, int32_t k) const {
  TokenLogprob lp{tok, -float(mix(uint64_t(tok), position) % 1000) / 250.0f, {}};
  for (int32_t i = 0; i < k; ++i)
    lp.top.emplace_back(i == 0 ? tok : plain_[(size_t(tok) + size_t(i) * 7) % plain_.size()], lp.logprob - 0.5f * float(i));
  return lp;
}

// Stand-ins for the prompt's logprobs (position p scores prompt[p]).
std::vector<TokenLogprob> ScriptedEngine::scripted_prompt_logprobs(const Request& req) const {
  std::vector<TokenLogprob> lps;
  for (size_t p = 1; p < req.prompt.size(); ++p)
    lps.push_back(scripted_logprob(req.prompt[p], p, req.sampling.prompt_logprobs));
  return lps;
}

int32_t ScriptedEngine::pick(const Live& r, const Sample& s, uint64_t salt) const {
  uint64_t h = mix(mix(r.prompt_hash, r.seed), mix(uint64_t(s.index) + 1, s.generated.size() + salt * 1000003));
  return plain_[h % plain_.size()];
}

void ScriptedEngine::loop() {
  for (;;) {
    std::vector<std::pair<std::shared_ptr<Live>, Event>> out;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait_for(lk, opts_.step_time, [&] { return stop_ || !aborts_.empty(); });
      auto finish_abort = [&](const std::shared_ptr<Live>& r) {
        for (auto& s : r->samples) {
          if (s.done) continue;
          s.done = true;
          Event e;
          e.request_id = r->req.id;
          e.index = s.index;
          e.finish = FinishReason::Abort;
          e.prompt_tokens = int32_t(r->req.prompt.size());
          e.completion_tokens = int32_t(s.generated.size());
          out.emplace_back(r, std::move(e));
        }
        ++m_.requests_aborted;
      };
      if (stop_ && !drain_) {
        for (auto& r : running_) finish_abort(r);
        for (auto& r : waiting_) finish_abort(r);
        running_.clear();
        waiting_.clear();
      }
      for (const auto& id : aborts_) {
        for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
          if ((*it)->req.id == id) {
            finish_abort(*it);
            waiting_.erase(it);
            break;
          }
        for (auto it = running_.begin(); it != running_.end(); ++it)
          if ((*it)->req.id == id) {
            finish_abort(*it);
            running_.erase(it);
            break;
          }
      }
      aborts_.clear();
      if (stop_ && running_.empty() && waiting_.empty() && out.empty()) return;
      while (!waiting_.empty() && int32_t(running_.size()) < opts_.max_running) {
        running_.push_back(waiting_.front());
        waiting_.pop_front();
      }
      for (auto& r : running_) {
        const SamplingParams& sp = r->req.sampling;
        if (!r->prefilled) {
          r->prefilled = true;
          m_.prompt_tokens_total += int64_t(r->req.prompt.size());
        }
        for (auto& s : r->samples) {
          if (s.done) continue;
          Event e;
          e.request_id = r->req.id;
          e.index = s.index;
          if (s.generated.empty() && sp.prompt_logprobs >= 0) e.prompt_logprobs = scripted_prompt_logprobs(r->req);
          if (sp.max_tokens == 0) {  // prompt scoring only
            s.done = true;
            e.finish = FinishReason::Length;
            e.prompt_tokens = int32_t(r->req.prompt.size());
            out.emplace_back(r, std::move(e));
            continue;
          }
          int32_t tok = pick(*r, s, 0);
          bool eos = false;
          if (!sp.ignore_eos && eos_ && sp.max_tokens > 1) {
            uint64_t h = mix(mix(r->prompt_hash, r->seed), mix(uint64_t(s.index) + 7, s.generated.size()));
            eos = double(h % 1000000) / 1e6 < opts_.eos_probability;
          }
          if (eos) tok = *eos_;
          ++m_.generation_tokens_total;
          s.generated.push_back(tok);
          if (sp.logprobs >= 0) e.logprobs.push_back(scripted_logprob(tok, s.generated.size(), sp.logprobs));
          OutputProcessor::Delta d = s.output->append(std::span(&tok, 1));
          e.tokens = std::move(d.tokens);
          e.text = std::move(d.text);
          e.finish = d.finish;
          if (e.finish != FinishReason::None) {
            s.done = true;
            e.prompt_tokens = int32_t(r->req.prompt.size());
            e.completion_tokens = int32_t(s.generated.size());
          }
          out.emplace_back(r, std::move(e));
        }
      }
      auto done = [](const std::shared_ptr<Live>& r) {
        return std::all_of(r->samples.begin(), r->samples.end(), [](const Sample& s) { return s.done; });
      };
      for (auto& r : running_)
        if (done(r)) ++m_.requests_finished;
      running_.erase(std::remove_if(running_.begin(), running_.end(), done), running_.end());
    }
    for (auto& [r, e] : out) r->sink(e);
  }
}

}  // namespace dsv4
