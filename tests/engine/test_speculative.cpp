// Speculative decoding with the MTP block: rollback of rejected drafts, the rejection rule, and
// engine outputs with and without speculation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <map>

#include "backend/sampling.h"
#include "engine/mtp_drafter.h"
#include "engine/sampler.h"
#include "engine/state_manager.h"
#include "engine_test_util.h"
#include "model/tiny.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

std::vector<float> download(Backend& be, const Tensor& t) {
  std::vector<float> v(size_t(t.numel()));
  be.download(t, v.data());
  return v;
}

// Pearson's chi-square of observed token counts against n * probs: tokens expected at least 5
// times are bins of their own, the others one pooled bin. A token observed although its
// probability is 0 makes it infinite.
struct ChiSquare {
  double value = 0;
  int dof = 0;
  void add(const std::map<int32_t, int>& counts, std::span<const float> probs, int n) {
    double pooled_expected = 0;
    int pooled_observed = 0, bins = 0;
    for (size_t t = 0; t < probs.size(); ++t) {
      const double e = double(n) * double(probs[t]);
      const auto c = counts.find(int32_t(t));
      const int o = c == counts.end() ? 0 : c->second;
      if (probs[t] == 0 && o > 0) value = INFINITY;
      if (e >= 5) {
        value += (o - e) * (o - e) / e;
        ++bins;
      } else {
        pooled_expected += e;
        pooled_observed += o;
      }
    }
    if (pooled_expected > 0) {
      value += (pooled_observed - pooled_expected) * (pooled_observed - pooled_expected) / pooled_expected;
      ++bins;
    }
    dof += bins - 1;
  }
  // The 0.999 quantile of chi-square with dof degrees of freedom (Wilson-Hilferty; 31.3 for 11).
  double quantile_999() const {
    const double h = 2.0 / (9.0 * dof);
    return dof * std::pow(1 - h + 3.09 * std::sqrt(h), 3);
  }
};

}  // namespace

// Two sequences of one store get the same random tokens; one of them also feeds random drafts
// (k = 1..3) in every pass and keeps a random prefix of them, the other feeds only the kept
// tokens. Their logits must stay bit-identical over many passes that cross window (16),
// compressor (CSA 4, HCA 16) and block (32) boundaries: rejected drafts leave no trace, accepted
// ones are exactly as if fed normally. F32 and FP8 KV.
TEST(Speculative, RejectedDraftsLeaveNoTrace) {
  for (const std::string preset : {"tiny"}) {
    auto lm = tiny_model();
    const ModelConfig& c = lm->config();
    Backend& be = lm->model->backend();
    const int64_t V = c.vocab_size;
    for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
      SCOPED_TRACE(preset + " " + kv_format_name(kv));
      StateManager mgr(*lm->model, 32, 16, 2, 0, kv);
      auto spec = mgr.acquire(), plain = mgr.acquire();
      ASSERT_TRUE(mgr.reserve(spec, 8 * 32));
      ASSERT_TRUE(mgr.reserve(plain, 8 * 32));
      Rng rng(kv == KvFormat::F32 ? 5 : 6);
      const std::vector<int32_t> prompt = random_prompt(13, 21, V);
      for (SequenceState* st : {&spec.st, &plain.st}) lm->model->forward(*st, prompt);
      int64_t accepted_total = 0, rejected_total = 0;
      while (plain.st.num_tokens < 120) {
        const int64_t k = 1 + int64_t(rng.below(3)), keep = int64_t(rng.below(uint64_t(k + 1)));
        std::vector<int32_t> fed(size_t(k + 1));
        for (auto& t : fed) t = int32_t(2 + rng.below(uint64_t(V - 2)));
        const ForwardSeq sf{&spec.st, fed, k + 1, 0, k};
        ForwardOutput out = lm->model->forward(std::span(&sf, 1));
        const int64_t acc[] = {keep};
        lm->model->accept_drafts(out.drafts, acc);
        const std::vector<int32_t> kept(fed.begin(), fed.begin() + keep + 1);
        const Tensor ref = lm->model->forward(plain.st, kept);
        ASSERT_EQ(spec.st.num_tokens, plain.st.num_tokens);
        const std::vector<float> a = download(be, out.logits), b = download(be, ref);
        for (int64_t i = 0; i < (keep + 1) * V; ++i)
          ASSERT_EQ(a[size_t(i)], b[size_t(i)]) << "at " << plain.st.num_tokens << " row " << i / V;
        accepted_total += keep;
        rejected_total += k - keep;
      }
      EXPECT_GT(rejected_total, 30);
      EXPECT_GT(accepted_total, 30);
    }
  }
}

// The rejection rule reproduces the target distribution for any draft distribution: over 40,000
// draws on a 12-token vocabulary (random logits for the target and the draft, temperature 1, with
// top-p and top-k, with penalties), the chi-square statistic of the verified tokens against the
// exact filtered target is below its 0.999 quantile. The same statistic over the same number of
// draws rejects two wrong rules: accepting every draft, and drawing a rejected draft's
// replacement from the target instead of the residual max(0, p - q).
TEST(Speculative, RejectionRuleReproducesTarget) {
  const int32_t V = 12;
  Rng gen(99);
  for (int variant = 0; variant < 4; ++variant) {
    SCOPED_TRACE(variant);
    SamplingParams sp;
    sp.temperature = variant == 3 ? 0.7f : 1.0f;
    if (variant == 1) sp.top_p = 0.8f;
    if (variant == 2) sp.top_k = 6;
    if (variant == 3) sp.presence_penalty = 0.5f;
    std::vector<float> target_logits(V), draft_logits(V);
    for (auto& v : target_logits) v = gen.normal() * 1.5f;
    for (auto& v : draft_logits) v = gen.normal() * 1.5f;
    SamplerState s(1234 + uint64_t(variant));
    if (variant == 3) s.add_generated(3, V);
    const std::vector<float> p = sampling_probs(target_logits, sp, s);
    const int n = 40000;
    std::map<int32_t, int> counts, accept_all, resample_target;
    int accepted = 0;
    Rng wrong(7);
    for (int i = 0; i < n; ++i) {
      std::vector<float> q;
      const int32_t d = draft_token(draft_logits, sp, s, q);
      const DraftVerdict v = verify_draft(target_logits, d, q, sp, s);
      ++counts[v.token];
      accepted += v.accepted;
      ++accept_all[d];
      const bool keep = wrong.uniform() * double(q[size_t(d)]) < double(p[size_t(d)]);
      ++resample_target[keep ? d : draw_token(p, wrong.uniform_f32())];
    }
    ChiSquare right, all, target;
    right.add(counts, p, n);
    EXPECT_LT(right.value, right.quantile_999()) << right.dof << " degrees of freedom";
    all.add(accept_all, p, n);
    EXPECT_GT(all.value, all.quantile_999()) << "accepting every draft";
    target.add(resample_target, p, n);
    EXPECT_GT(target.value, target.quantile_999()) << "replacements drawn from the target";
    EXPECT_GT(accepted, n / 10);  // the drafts overlap the target: both branches are exercised
    EXPECT_LT(accepted, n - n / 10);
  }
}

// Greedy: the verdict is the target's greedy token, accepted exactly when the draft equals it.
TEST(Speculative, GreedyVerdictIsArgmax) {
  Rng gen(3);
  SamplingParams sp;
  sp.temperature = 0;
  SamplerState s(1);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> logits(50);
    for (auto& v : logits) v = gen.normal();
    const int32_t best = greedy_token(logits), draft = int32_t(gen.below(50));
    const DraftVerdict v = verify_draft(logits, draft, {}, sp, s);
    EXPECT_EQ(v.token, best);
    EXPECT_EQ(v.accepted, draft == best);
  }
}

namespace {

struct Wave {
  std::vector<Output> outputs;
  EngineMetrics metrics;
};

// Runs the requests concurrently on a fresh engine; returns their outputs in order and the metrics.
Wave run_wave(EngineConfig cfg, std::shared_ptr<LoadedModel> model, const std::vector<Request>& reqs) {
  Harness h(cfg, std::move(model));
  std::vector<std::string> ids;
  for (const Request& r : reqs) ids.push_back(h.submit(r));
  h.wait();
  Wave w;
  for (const auto& id : ids) w.outputs.push_back(h.output(id));
  w.metrics = h.engine().metrics();
  return w;
}


}  // namespace

// Greedy outputs are token-identical with and without speculation (k = 1, 2, 3) on the random
// tiny model: 12 concurrent requests of random lengths (decodes mixed with prefill chunks, a small
// token budget), 16-token blocks (window 16, compress ratios 4 and 16), F32 and FP8 KV, a
// second turn whose prompts hit the prefix cache, and a pool so small that requests preempt each
// other (drafts dropped, state recomputed).
TEST(Speculative, GreedyOutputsIdenticalTinyModel) {
  Rng rng(17);
  const std::vector<Request> reqs = random_greedy_requests(rng, 12, "r", 100, {3, 60}, {20, 40});
  // (F32 KV, FP8 KV, and a pool of 14 blocks: the requests preempt each other.)
  for (const auto& [fp8, blocks] : {std::pair{false, 256}, std::pair{true, 256}, std::pair{false, 14}}) {
    SCOPED_TRACE(testing::Message() << (fp8 ? "fp8 " : "f32 ") << blocks << " blocks");
    EngineConfig cfg;
    cfg.block_size = 16;
    cfg.num_blocks = blocks;
    cfg.max_batched_tokens = 48;
    cfg.kv_fp8 = fp8;
    EngineMetrics m;
    const std::vector<Output> base = run_two_turns(cfg, tiny_model(), reqs, &m);
    EXPECT_EQ(m.draft_tokens, 0);
    for (int32_t k = 1; k <= 3; ++k) {
      if (blocks < 256 && k != 2) continue;  // preemption recomputes a lot: one k is enough
      SCOPED_TRACE(k);
      cfg.speculative_tokens = k;
      const std::vector<Output> spec = run_two_turns(cfg, tiny_model(), reqs, &m);
      ASSERT_EQ(spec.size(), base.size());
      for (size_t i = 0; i < base.size(); ++i) {
        EXPECT_EQ(spec[i].tokens, base[i].tokens) << "request " << i;
        EXPECT_EQ(spec[i].finish, FinishReason::Length) << spec[i].final.error;
      }
      EXPECT_GT(m.draft_tokens, 200);
      if (blocks == 256) EXPECT_GT(m.prefix_hit_rate, 0.2);
      else EXPECT_GT(m.preemptions, 0);
    }
  }
}

namespace {

std::shared_ptr<LoadedModel> demo_model() {
  static std::shared_ptr<LoadedModel> m = LoadedModel::load(std::string(DSV4_SOURCE_DIR) + "/models/demo-brown");
  return m;
}

// English prompts written for this test (not from the corpus the model was trained on).
std::vector<std::vector<int32_t>> demo_prompts() {
  const char* texts[] = {
      "The board of directors met on Tuesday to discuss the new budget, and the chairman said that",
      "When the rain stopped, the children ran out into the street and",
      "In the years after the war, the small town grew quickly as families moved in from the country.",
      "He opened the letter slowly. It was from his brother, who had not written in",
      "The report of the committee was read to the members, who",
      "Scientists have long believed that the ocean",
  };
  std::vector<std::vector<int32_t>> out;
  for (const char* t : texts) out.push_back(demo_model()->tokenizer->encode(t));
  return out;
}

}  // namespace

// The trained demo model, whose MTP head agrees with the main model more than half the time:
// greedy outputs are token-identical with and without speculation (k = 1, 2, 3) while most
// drafts are accepted (a mean acceptance length above 1.3 at every k).
TEST(Speculative, GreedyOutputsIdenticalDemoModel) {
  std::vector<Request> reqs;
  int i = 0;
  for (auto& p : demo_prompts()) reqs.push_back(greedy("d" + std::to_string(i++), p, 64));
  EngineConfig cfg;
  cfg.block_size = 64;
  cfg.num_blocks = 64;
  cfg.max_batched_tokens = 40;
  const Wave base = run_wave(cfg, demo_model(), reqs);
  for (int32_t k = 1; k <= 3; ++k) {
    SCOPED_TRACE(k);
    cfg.speculative_tokens = k;
    const Wave spec = run_wave(cfg, demo_model(), reqs);
    for (size_t j = 0; j < reqs.size(); ++j)
      EXPECT_EQ(spec.outputs[j].tokens, base.outputs[j].tokens) << "request " << j << " " << spec.outputs[j].final.error;
    EXPECT_GT(spec.metrics.mean_acceptance_length, 1.3);
    EXPECT_GT(spec.metrics.accepted_draft_tokens, 0);
    EXPECT_LE(spec.metrics.accepted_draft_tokens, spec.metrics.draft_tokens);
  }
}

// Stops stay exact when a step accepts several tokens: stop token ids, stop strings (cut inside a
// multi-token step), max_tokens and logprobs (one per emitted token, the same values) are what
// the same greedy requests get without speculation, on the demo model where steps often accept
// 2-4 tokens. The stop token and stop string are taken from the middle of the plain output.
TEST(Speculative, StopsAndLogprobsExactWithSeveralTokensPerStep) {
  EngineConfig cfg;
  cfg.block_size = 64;
  cfg.num_blocks = 64;
  auto prompts = demo_prompts();
  prompts.resize(3);
  std::vector<Request> probe;
  for (size_t i = 0; i < prompts.size(); ++i) probe.push_back(greedy("p" + std::to_string(i), prompts[i], 40));
  const Wave plain = run_wave(cfg, demo_model(), probe);
  std::vector<Request> reqs;
  Rng rng(4);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Output& o = plain.outputs[i];
    ASSERT_GT(o.tokens.size(), 20u);
    Request stop_id = greedy("id" + std::to_string(i), prompts[i], 40);
    stop_id.sampling.stop_token_ids = {o.tokens[8 + rng.below(10)]};
    stop_id.sampling.logprobs = 2;
    reqs.push_back(stop_id);
    Request stop_str = greedy("str" + std::to_string(i), prompts[i], 40);
    const size_t at = o.text.size() / 3 + rng.below(o.text.size() / 3);
    stop_str.sampling.stop = {o.text.substr(at, 4)};
    reqs.push_back(stop_str);
    reqs.push_back(greedy("len" + std::to_string(i), prompts[i], 5 + int32_t(rng.below(20))));
  }
  const Wave base = run_wave(cfg, demo_model(), reqs);
  for (int32_t k = 1; k <= 3; k += 2) {
    SCOPED_TRACE(k);
    cfg.speculative_tokens = k;
    const Wave spec = run_wave(cfg, demo_model(), reqs);
    EXPECT_GT(spec.metrics.accepted_draft_tokens, 20);
    for (size_t j = 0; j < reqs.size(); ++j) {
      const Output &a = spec.outputs[j], &b = base.outputs[j];
      EXPECT_EQ(a.tokens, b.tokens) << reqs[j].id;
      EXPECT_EQ(a.text, b.text) << reqs[j].id;
      EXPECT_EQ(a.finish, b.finish) << reqs[j].id << " " << a.final.error;
      EXPECT_EQ(a.final.completion_tokens, b.final.completion_tokens) << reqs[j].id;
      ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << reqs[j].id;
      for (size_t t = 0; t < a.logprobs.size(); ++t) {
        EXPECT_EQ(a.logprobs[t].token, b.logprobs[t].token);
        EXPECT_NEAR(a.logprobs[t].logprob, b.logprobs[t].logprob, 1e-4);
      }
    }
  }
}

// Sampling through the engine: with speculation (k = 2) the sampled tokens follow the distribution
// sampling draws from without speculation. Seeded requests of n = 100 samples on the demo model,
// whose drafts are often accepted (1,200 samples per setting by default, ~40 s of CPU for both;
// DSV4_SPEC_CHI2_REQUESTS=200 gives the 20,000 per setting), at temperature 1, then with
// top-p 0.9: the tokens at positions 1..3 (the first is sampled before any draft; the next are
// drafts verified by the rejection rule, residual draws and the extra token after accepted
// drafts) are grouped by the tokens before them, and each group of at least 100 samples is
// compared with the exact distribution of its prefix (a fresh pass of the model,
// sampling_probs). The summed chi-square stays below its 0.999 quantile; the same statistic
// rejects wrong acceptance rules (RejectionRuleReproducesTarget).
TEST(Speculative, SampledTokensFollowTheNonSpeculativeDistribution) {
  const auto lm = demo_model();
  // The first token is " America" 97 % of the time: most samples share the prefix of position 1,
  // whose distribution is broad (its top token has 27 %).
  const std::vector<int32_t> prompt = lm->tokenizer->encode("The United States of");
  // DSV4_SPEC_CHI2_REQUESTS=200: the 20,000 samples per setting (minutes on a CPU).
  const char* env = std::getenv("DSV4_SPEC_CHI2_REQUESTS");
  const int requests = env ? std::atoi(env) : 12, n = 100, min_group = 100;
  for (const float top_p : {1.0f, 0.9f}) {
    SCOPED_TRACE(top_p);
    SamplingParams sp;
    sp.temperature = 1;
    sp.top_p = top_p;
    sp.max_tokens = 4;
    sp.ignore_eos = true;
    sp.n = n;
    std::vector<std::vector<int32_t>> samples;
    EngineMetrics m;
    {
      EngineConfig cfg;
      cfg.block_size = 64;
      cfg.num_blocks = 1024;
      cfg.max_running_requests = 512;
      cfg.max_batched_tokens = 4096;
      cfg.speculative_tokens = 2;
      Harness h(cfg, lm, /*record_logits=*/false);
      for (int r = 0; r < requests; ++r) {
        Request q;
        q.id = "s" + std::to_string(r);
        q.prompt = prompt;
        q.sampling = sp;
        q.sampling.seed = uint64_t(r);
        h.submit(q);
      }
      h.wait();
      for (int r = 0; r < requests; ++r)
        for (int32_t i = 0; i < n; ++i) samples.push_back(h.output("s" + std::to_string(r), i).tokens);
      m = h.engine().metrics();
    }
    EXPECT_GT(m.accepted_draft_tokens, requests * n / 2) << "drafts accepted " << m.accepted_draft_tokens;
    EXPECT_LT(m.accepted_draft_tokens, m.draft_tokens * 9 / 10) << "drafts rejected too";
    for (size_t pos = 1; pos < 4; ++pos) {
      SCOPED_TRACE(pos);
      std::map<std::vector<int32_t>, std::map<int32_t, int>> groups;  // prefix -> token -> count
      for (const auto& t : samples) {
        ASSERT_EQ(t.size(), 4u);
        ++groups[std::vector<int32_t>(t.begin(), t.begin() + int64_t(pos))][t[pos]];
      }
      ChiSquare chi;
      int tested = 0;
      for (const auto& [prefix, counts] : groups) {
        int size = 0;
        for (const auto& [tok, c] : counts) size += c;
        if (size < min_group) continue;
        std::vector<int32_t> ids = prompt;
        ids.insert(ids.end(), prefix.begin(), prefix.end());
        SequenceState st = lm->model->new_sequence(int64_t(ids.size()));
        const std::vector<float> logits = download(lm->model->backend(), lm->model->forward(st, ids));
        const auto last = std::span(logits).last(size_t(lm->config().vocab_size));
        chi.add(counts, sampling_probs(last, sp, SamplerState(0)), size);
        tested += size;
      }
      // Position 1 follows " America" in 97 % of the samples; position 2 is spread wider.
      if (pos < 3) {
        EXPECT_GE(tested, requests * n / (pos == 1 ? 2 : 5)) << "samples in groups of at least " << min_group;
      }
      if (chi.dof == 0) continue;
      EXPECT_LT(chi.value, chi.quantile_999()) << chi.dof << " degrees of freedom, " << tested << " samples";
    }
  }
}
