#pragma once
// Shared helpers for the engine tests: one demo model per binary, an engine wrapper that
// records events and logits rows, random prompts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>

#include "engine/llm_engine.h"
#include "util/random.h"

namespace dsv4::test {

inline std::shared_ptr<LoadedModel> tiny_model() {
  static std::shared_ptr<LoadedModel> m = LoadedModel::demo("tiny", 7);
  return m;
}

inline std::vector<int32_t> random_prompt(int64_t n, uint64_t seed, int64_t vocab = 1024) {
  Rng r(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(2 + r.below(uint64_t(vocab - 2)));  // no BOS/EOS
  return t;
}

struct Output {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason finish = FinishReason::None;
  Event final;
  int events = 0;
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt_logprobs;
};

class Harness {
 public:
  // record_logits: keep every sampled row for logits() (off for runs of many thousand samples).
  explicit Harness(EngineConfig c, std::shared_ptr<LoadedModel> m = tiny_model(), bool record_logits = true) {
    c.log_startup = false;
    if (record_logits)
      c.on_logits = [this](const std::string& id, int32_t index, int64_t, std::span<const float> row) {
        std::lock_guard lk(mu_);
        logits_[{id, index}].emplace_back(row.begin(), row.end());
      };
    engine_ = make_engine(c, std::move(m));
  }
  ~Harness() { engine_->shutdown(false); }

  LLMEngine& engine() { return *engine_; }

  // on_event runs on the engine thread after the event is recorded.
  std::string submit(Request r, std::function<void(const Event&)> on_event = {}) {
    return engine_->submit(std::move(r), [this, on_event](const Event& e) {
      {
        std::lock_guard lk(mu_);
        Output& o = out_[{e.request_id, e.index}];
        ++o.events;
        o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
        o.text += e.text;
        o.logprobs.insert(o.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
        if (!e.prompt_logprobs.empty()) {
          EXPECT_TRUE(o.prompt_logprobs.empty()) << "prompt logprobs twice for " << e.request_id;
          o.prompt_logprobs = e.prompt_logprobs;
        }
        if (e.finish != FinishReason::None) {
          EXPECT_EQ(o.finish, FinishReason::None) << "two final events for " << e.request_id;
          o.finish = e.finish;
          o.final = e;
        }
      }
      if (on_event) on_event(e);
    });
  }
  void wait() { engine_->wait_idle(); }
  Output output(const std::string& id, int32_t index = 0) {
    std::lock_guard lk(mu_);
    return out_[{id, index}];
  }
  std::vector<std::vector<float>> logits(const std::string& id, int32_t index = 0) {
    std::lock_guard lk(mu_);
    return logits_[{id, index}];
  }

 private:
  std::mutex mu_;
  std::map<std::pair<std::string, int32_t>, Output> out_;
  std::map<std::pair<std::string, int32_t>, std::vector<std::vector<float>>> logits_;
  std::unique_ptr<LLMEngine> engine_;
};

inline Request greedy(std::string id, std::vector<int32_t> prompt, int32_t max_tokens) {
  Request r;
  r.id = std::move(id);
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  return r;
}

// Lengths of random_greedy_requests: min + a draw in [0, spread) (spread 0: exactly min).
struct LengthRange {
  int64_t min = 1, spread = 0;
};
// n greedy requests "<prefix>0", "<prefix>1", ... with random prompts (request i: seed + i) of
// `prompt` tokens and `new_tokens` to generate, lengths drawn from rng in request order (the
// prompt's first).
inline std::vector<Request> random_greedy_requests(Rng& rng, int n, const std::string& prefix, uint64_t seed,
                                                   LengthRange prompt, LengthRange new_tokens) {
  auto draw = [&](LengthRange l) { return l.min + (l.spread > 0 ? int64_t(rng.below(uint64_t(l.spread))) : 0); };
  std::vector<Request> reqs;
  for (int i = 0; i < n; ++i) {
    const int64_t len = draw(prompt);
    const int64_t max_new = draw(new_tokens);
    reqs.push_back(greedy(prefix + std::to_string(i), random_prompt(len, seed + uint64_t(i)), int32_t(max_new)));
  }
  return reqs;
}

inline void expect_rows_near(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
                             float tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t r = 0; r < a.size(); ++r) {
    ASSERT_EQ(a[r].size(), b[r].size()) << what;
    float err = 0;  // a NaN on either side counts as an infinite error (std::max would drop it)
    for (size_t i = 0; i < a[r].size(); ++i) {
      const float x = a[r][i], y = b[r][i];
      const float e = std::isnan(x) || std::isnan(y) ? std::numeric_limits<float>::infinity()
                      : x == y                       ? 0.f
                                                     : std::fabs(x - y);
      err = std::max(err, e);
    }
    EXPECT_LE(err, tol) << what << " row " << r;
  }
}

// Two waves on one engine: the second extends every first-wave prompt with its output (a
// multi-turn follow-up), so its prompts hit the prefix cache, snapshots included.
inline std::vector<Output> run_two_turns(EngineConfig cfg, std::shared_ptr<LoadedModel> model, std::vector<Request> reqs,
                                  EngineMetrics* metrics) {
  Harness h(cfg, std::move(model));
  std::vector<Output> all;
  for (int turn = 0; turn < 2; ++turn) {
    std::vector<std::string> ids;
    for (const Request& r : reqs) ids.push_back(h.submit(r));
    h.wait();
    for (size_t i = 0; i < ids.size(); ++i) {
      Output o = h.output(ids[i]);
      all.push_back(o);
      reqs[i].id += "-next";
      reqs[i].prompt.insert(reqs[i].prompt.end(), o.tokens.begin(), o.tokens.end());
      reqs[i].prompt.push_back(int32_t(2 + i));
    }
  }
  *metrics = h.engine().metrics();
  return all;
}

}  // namespace dsv4::test
