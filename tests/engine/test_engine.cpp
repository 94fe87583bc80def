// The serving engine on the CPU backend with the tiny demo model: batch invariance,
// preemption, prefix caching (exactness, hit rates, eviction), aborts, stops, n > 1, seeds,
// sampling with Backend::sample vs the host sampler.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>

#include "engine/state_manager.h"
#include "engine_test_util.h"
#include "model/tiny.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

EngineConfig small_blocks(int64_t num_blocks = 256, bool caching = false) {
  EngineConfig c;
  c.block_size = 16;
  c.num_blocks = num_blocks;
  c.enable_prefix_caching = caching;
  c.max_running_requests = 32;
  c.max_batched_tokens = 64;
  return c;
}

void expect_pool_full(LLMEngine& e) {
  const EngineMetrics m = e.metrics();
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.waiting, 0);
  EXPECT_EQ(m.blocks_free + m.blocks_cached, m.blocks_total);
}

}  // namespace

// A request gets the same tokens and logits whether it runs alone or batched (one forward pass
// per step) among 31 others of different lengths (some crossing block boundaries, prefilled in
// chunks mixed with decodes) and sampling settings, with sampling on the host and on the device.
TEST(Engine, BatchInvariance) {
  const auto target = random_prompt(21, 1);
  for (bool device : {false, true}) {
    SCOPED_TRACE(device ? "device sampling" : "host sampling");
    std::vector<std::vector<float>> alone_logits;
    Output alone;
    EngineConfig c = small_blocks();
    c.device_sampling = device;
    {
      Harness h(c);
      h.submit(greedy("t", target, 6));
      h.wait();
      alone = h.output("t");
      alone_logits = h.logits("t");
    }
    ASSERT_EQ(alone.tokens.size(), 6u);
    EXPECT_EQ(alone.finish, FinishReason::Length);

    c.max_batched_tokens = 24;  // longer prompts prefill in chunks, mixed with decodes
    Harness h(c);
    Rng r(3);
    std::vector<std::string> others;
    for (int i = 0; i < 31; ++i) {
      if (i == 5) h.submit(greedy("t", target, 6));
      Request o = greedy("o" + std::to_string(i), random_prompt(2 + int64_t(r.below(40)), 100 + i), 1 + int32_t(r.below(8)));
      if (i % 3 == 1) {
        o.sampling.temperature = 0.9f;
        o.sampling.top_p = 0.9f;
        o.sampling.seed = uint64_t(i);
      } else if (i % 3 == 2) {
        o.sampling.temperature = 1.2f;
        o.sampling.top_k = 5;
        o.sampling.seed = uint64_t(i);
      }
      others.push_back(h.submit(std::move(o)));
    }
    h.wait();
    const Output batched = h.output("t");
    EXPECT_EQ(batched.tokens, alone.tokens);
    expect_rows_near(h.logits("t"), alone_logits, 1e-5f, "batched vs alone");
    for (const auto& id : others) EXPECT_EQ(h.output(id).finish, FinishReason::Length) << id;
    expect_pool_full(h.engine());
  }
}

TEST(Engine, PreemptionUnderTinyPoolKeepsOutputs) {
  Rng r(8);
  const std::vector<Request> reqs = random_greedy_requests(r, 5, "p", 200, {6, 14}, {4, 0});
  std::map<std::string, std::vector<int32_t>> ref;
  std::map<std::string, std::vector<std::vector<float>>> ref_logits;
  {
    Harness h(small_blocks());
    for (const auto& q : reqs) h.submit(q);
    h.wait();
    for (const auto& q : reqs) {
      ref[q.id] = h.output(q.id).tokens;
      ref_logits[q.id] = h.logits(q.id);
    }
  }
  for (bool caching : {false, true}) {
    // 2 blocks of 16 tokens: the largest request (19 + 4 tokens) needs both.
    EngineConfig c = small_blocks(2, caching);
    Harness h(c);
    for (const auto& q : reqs) h.submit(q);
    h.wait();
    for (const auto& q : reqs) {
      const Output o = h.output(q.id);
      EXPECT_EQ(o.finish, FinishReason::Length) << q.id;
      EXPECT_EQ(o.tokens, ref[q.id]) << q.id << " caching " << caching;
      expect_rows_near(h.logits(q.id), ref_logits[q.id], 1e-5f, q.id);
    }
    EXPECT_GT(h.engine().metrics().preemptions, 0);
    expect_pool_full(h.engine());
    // A prompt larger than the whole pool is rejected up front (the context is clamped to the pool).
    try {
      h.engine().submit(greedy("big", random_prompt(40, 9), 10), {});
      ADD_FAILURE() << "no error for a request larger than the pool";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--kv-memory"), std::string::npos) << e.what();
    }
  }
}

// Logits of requests served from the prefix cache equal a cold run exactly, for prefixes on
// and off block boundaries, with concurrent requests sharing the prefix.
TEST(Engine, PrefixCacheIsExact) {
  for (int64_t P : {16, 37}) {
    const auto prefix = random_prompt(P, 300 + uint64_t(P));
    auto with = [&](uint64_t seed, int64_t n) {
      auto t = prefix;
      auto s = random_prompt(n, seed);
      t.insert(t.end(), s.begin(), s.end());
      return t;
    };
    const auto pa = with(1, 5), pb = with(2, 4), pc = with(3, 2);
    std::map<std::string, std::vector<std::vector<float>>> cold;
    std::map<std::string, std::vector<int32_t>> cold_tokens;
    {
      Harness h(small_blocks());
      for (auto& [id, p] : {std::pair{"b", pb}, std::pair{"c", pc}}) h.submit(greedy(id, p, 2));
      h.wait();
      for (const char* id : {"b", "c"}) {
        cold[id] = h.logits(id);
        cold_tokens[id] = h.output(id).tokens;
      }
    }
    Harness h(small_blocks(256, true));
    h.submit(greedy("a", pa, 2));
    h.wait();
    // b and c at once: all hit the blocks a left behind.
    for (auto& [id, p] : {std::pair{"b", pb}, std::pair{"c", pc}}) h.submit(greedy(id, p, 2));
    h.wait();
    for (const char* id : {"b", "c"}) {
      const Output o = h.output(id);
      EXPECT_EQ(o.final.cached_prompt_tokens, P / 16 * 16) << "P=" << P << " " << id;
      EXPECT_EQ(o.tokens, cold_tokens[id]) << "P=" << P << " " << id;
      const auto warm = h.logits(id);
      ASSERT_EQ(warm.size(), cold[id].size());
      for (size_t r = 0; r < warm.size(); ++r) EXPECT_TRUE(warm[r] == cold[id][r]) << "P=" << P << " " << id << " row " << r;
    }
    expect_pool_full(h.engine());
  }
}

TEST(Engine, PrefixHitRatesFrom1To16Blocks) {
  const auto base = random_prompt(16 * 16 + 3, 400);
  Harness h(small_blocks(256, true));
  h.submit(greedy("base", base, 1));
  h.wait();
  for (int k = 1; k <= 16; ++k) {
    auto p = std::vector<int32_t>(base.begin(), base.begin() + 16 * k);
    auto tail = random_prompt(3, 500 + uint64_t(k));
    p.insert(p.end(), tail.begin(), tail.end());
    h.submit(greedy("k" + std::to_string(k), p, 1));
  }
  h.wait();
  int64_t cached = 0, total = int64_t(base.size());
  for (int k = 1; k <= 16; ++k) {
    const Output o = h.output("k" + std::to_string(k));
    EXPECT_EQ(o.final.cached_prompt_tokens, 16 * k) << k << " shared blocks";
    cached += o.final.cached_prompt_tokens;
    total += 16 * k + 3;
  }
  const EngineMetrics m = h.engine().metrics();
  EXPECT_NEAR(m.prefix_hit_rate, double(cached) / double(total), 1e-9);
  expect_pool_full(h.engine());
}

TEST(Engine, EvictionUnderPressure) {
  // 6 blocks: new prompts evict older cached blocks, least recently used first.
  EngineConfig c = small_blocks(6, true);
  c.num_snapshots = 6;
  Harness h(c);
  const auto x = random_prompt(33, 600);
  h.submit(greedy("x", x, 1));
  h.wait();
  EXPECT_EQ(h.engine().metrics().blocks_cached, 2);
  std::vector<std::vector<int32_t>> ys;
  for (int i = 0; i < 3; ++i) {
    ys.push_back(random_prompt(33, 610 + uint64_t(i)));
    h.submit(greedy("y" + std::to_string(i), ys.back(), 2));
    h.wait();
    EXPECT_EQ(h.output("y" + std::to_string(i)).finish, FinishReason::Length);
    EXPECT_LE(h.engine().metrics().blocks_cached, 6);
  }
  h.submit(greedy("x2", x, 1));  // evicted long ago
  h.wait();
  EXPECT_EQ(h.output("x2").final.cached_prompt_tokens, 0);
  h.submit(greedy("y2b", ys[2], 1));  // the most recent one is still there
  h.wait();
  EXPECT_EQ(h.output("y2b").final.cached_prompt_tokens, 32);
  expect_pool_full(h.engine());
  h.engine().clear_prefix_cache();
  EXPECT_EQ(h.engine().metrics().blocks_free, 6);
}

TEST(Engine, AbortMidPrefillAndMidDecodeFreesEverything) {
  for (bool caching : {false, true}) {
    EngineConfig c = small_blocks(64, caching);
    c.max_batched_tokens = 8;
    Harness h(c);
    std::atomic<int> decode_events{0};
    // y decodes while x prefills 8 tokens a step; y's first token aborts x mid-prefill.
    h.submit(greedy("y", random_prompt(5, 700), 4), [&](const Event& e) {
      if (e.tokens.size() && e.index == 0 && h.output("y").tokens.size() == 1) h.engine().abort("x");
    });
    h.submit(greedy("x", random_prompt(70, 701), 4));
    // z is aborted by its own sink after its second token (mid-decode).
    h.submit(greedy("z", random_prompt(6, 702), 50), [&](const Event& e) {
      if (!e.tokens.empty() && ++decode_events == 2) h.engine().abort("z");
    });
    h.wait();
    EXPECT_EQ(h.output("x").finish, FinishReason::Abort);
    EXPECT_TRUE(h.output("x").tokens.empty());
    EXPECT_EQ(h.output("y").finish, FinishReason::Length);
    EXPECT_EQ(h.output("z").finish, FinishReason::Abort);
    EXPECT_GE(h.output("z").tokens.size(), 2u);
    EXPECT_LT(h.output("z").tokens.size(), 10u);
    EXPECT_EQ(h.engine().metrics().requests_aborted, 2);
    expect_pool_full(h.engine());
    h.engine().clear_prefix_cache();
    EXPECT_EQ(h.engine().metrics().blocks_free, 64);
    h.engine().abort("unknown");  // ignored
  }
}

TEST(Engine, StopsAndLimits) {
  Harness h(small_blocks());
  const auto p = random_prompt(10, 800);
  h.submit(greedy("ref", p, 12));
  h.wait();
  const Output ref = h.output("ref");
  ASSERT_EQ(ref.tokens.size(), 12u);
  EXPECT_EQ(ref.final.completion_tokens, 12);
  EXPECT_EQ(ref.final.prompt_tokens, 10);
  // Stop token id: the third generated token ends the request without being emitted.
  Request a = greedy("tok", p, 12);
  a.sampling.stop_token_ids = {ref.tokens[2]};
  const size_t first = size_t(std::find(ref.tokens.begin(), ref.tokens.end(), ref.tokens[2]) - ref.tokens.begin());
  h.submit(a);
  // Stop string: a piece of the reference text.
  const auto& tok = *tiny_model()->tokenizer;
  const std::string full = tok.decode(ref.tokens, true);
  EXPECT_EQ(ref.text, full);
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(full.size() / 2, 3);
  Request b = greedy("str", p, 12);
  b.sampling.stop = {stop, "\x01never"};
  h.submit(b);
  h.wait();
  const Output oa = h.output("tok");
  EXPECT_EQ(oa.finish, FinishReason::Stop);
  EXPECT_EQ(oa.tokens, std::vector<int32_t>(ref.tokens.begin(), ref.tokens.begin() + long(first)));
  const Output ob = h.output("str");
  EXPECT_EQ(ob.finish, FinishReason::Stop);
  EXPECT_EQ(ob.text, full.substr(0, full.find(stop)));
  // Bad requests are rejected with the parameter named.
  auto rejects = [&](Request r, const char* what) {
    try {
      h.engine().submit(std::move(r), {});
      ADD_FAILURE() << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  Request bad = greedy("", {}, 3);
  rejects(bad, "prompt");
  bad.prompt = {5, 5000};
  rejects(bad, "prompt");
  bad.prompt = {5};
  bad.sampling.top_p = 0;
  rejects(bad, "top_p");
  expect_pool_full(h.engine());
}

TEST(Engine, SeededSamplingAndParallelSamples) {
  auto sampled = [](std::string id, std::vector<int32_t> p, int32_t n) {
    Request r;
    r.id = std::move(id);
    r.prompt = std::move(p);
    r.sampling.temperature = 1.5f;
    r.sampling.top_k = 50;
    r.sampling.seed = 1234;
    r.sampling.max_tokens = 5;
    r.sampling.n = n;
    r.sampling.ignore_eos = true;
    r.sampling.logprobs = 2;
    return r;
  };
  const auto p = random_prompt(19, 900);
  Output alone;
  std::vector<std::vector<float>> alone_logits;
  {
    Harness h(small_blocks(256, true));
    h.submit(sampled("s", p, 1));
    h.wait();
    alone = h.output("s");
    alone_logits = h.logits("s");
  }
  ASSERT_EQ(alone.tokens.size(), 5u);
  ASSERT_EQ(alone.logprobs.size(), 5u);
  Harness h(small_blocks(256, true));
  for (int i = 0; i < 3; ++i) h.submit(greedy("m" + std::to_string(i), random_prompt(7 + i, 910 + i), 4));
  h.submit(sampled("s", p, 3));
  h.wait();
  // Sample 0 of n = 3 is the n = 1 request (same seed, batch mates irrelevant).
  EXPECT_EQ(h.output("s", 0).tokens, alone.tokens);
  expect_rows_near(h.logits("s", 0), alone_logits, 0, "sample 0");
  // The others share the prompt state: their first logits row is sample 0's.
  std::set<std::vector<int32_t>> distinct;
  for (int i = 0; i < 3; ++i) {
    const Output o = h.output("s", i);
    EXPECT_EQ(o.finish, FinishReason::Length);
    EXPECT_EQ(o.tokens.size(), 5u);
    EXPECT_EQ(o.final.prompt_tokens, 19);
    ASSERT_FALSE(h.logits("s", i).empty());
    EXPECT_TRUE(h.logits("s", i)[0] == alone_logits[0]) << "sample " << i;
    distinct.insert(o.tokens);
  }
  EXPECT_EQ(distinct.size(), 3u);
  // Greedy samples are all equal to the greedy single request.
  Request g = greedy("g", p, 4);
  g.sampling.n = 2;
  h.submit(g);
  h.submit(greedy("g1", p, 4));
  h.wait();
  EXPECT_EQ(h.output("g", 0).tokens, h.output("g1").tokens);
  EXPECT_EQ(h.output("g", 1).tokens, h.output("g1").tokens);
  expect_pool_full(h.engine());
  const EngineMetrics m = h.engine().metrics();
  EXPECT_EQ(m.requests_finished, 6);
  EXPECT_GT(m.generation_tokens_total, 20);
}

// --kv fp8 through the engine: packed window rings in slots and prefix-cache snapshots, packed
// entry pools shared by prefix hits, copied by forks (n > 1) and scattered by preemption, fed in
// chunks: every sampled logits row and token equals a self-contained Model run with --kv fp8
// (one prefill, then token by token), bit for bit.
TEST(Engine, KvFp8MatchesSelfContainedModel) {
  auto lm = tiny_model();
  const ModelConfig& mc = lm->config();
  Backend& be = lm->model->backend();
  const int64_t V = mc.vocab_size;
  // Reference models on the same weights (the engine's own Model is left alone).
  Model fp8(mc, lm->generated->weights(), be), exact(mc, lm->generated->weights(), be);
  fp8.set_kv_fp8(true);
  struct Ref {
    std::vector<int32_t> tokens;
    std::vector<std::vector<float>> rows;
  };
  auto reference = [&](Model& m, const std::vector<int32_t>& prompt, int32_t n) {
    Ref r;
    SequenceState st = m.new_sequence(int64_t(prompt.size()) + n);
    Tensor lg = m.forward(st, prompt);
    for (int32_t i = 0; i < n; ++i) {
      std::vector<float> row(static_cast<size_t>(V));
      be.download(lg.rows_view(lg.dim(0) - 1, lg.dim(0)), row.data());
      const int32_t t = int32_t(std::max_element(row.begin(), row.end()) - row.begin());
      r.rows.push_back(std::move(row));
      r.tokens.push_back(t);
      if (i + 1 < n) lg = m.forward(st, std::span(&t, 1));
    }
    return r;
  };
  auto expect_matches = [&](Harness& h, const std::string& id, int32_t index, const Ref& ref, const std::string& what) {
    const Output o = h.output(id, index);
    EXPECT_EQ(o.finish, FinishReason::Length) << what << " " << id;
    EXPECT_EQ(o.tokens, ref.tokens) << what << " " << id << "/" << index;
    const auto rows = h.logits(id, index);
    ASSERT_EQ(rows.size(), ref.rows.size()) << what << " " << id;
    for (size_t r = 0; r < rows.size(); ++r)
      EXPECT_TRUE(rows[r] == ref.rows[r]) << what << " " << id << "/" << index << ": logits row " << r
                                          << " differs from the self-contained --kv fp8 run";
  };

  // Prefix cache (37-token shared prefix: 2 full blocks of 16) + chunked prefill (12 tokens per
  // step) + a fork of a partial block (n = 2).
  const auto prefix = random_prompt(37, 1300);
  std::map<std::string, std::vector<int32_t>> prompts;
  for (int i = 0; i < 4; ++i) {
    auto p = prefix;
    auto t = random_prompt(3 + i, 1310 + uint64_t(i));
    p.insert(p.end(), t.begin(), t.end());
    prompts["f" + std::to_string(i)] = p;
  }
  std::map<std::string, Ref> refs;
  for (const auto& [id, p] : prompts) refs[id] = reference(fp8, p, 4);
  const Ref plain = reference(exact, prompts["f0"], 4);
  EXPECT_FALSE(plain.rows[0] == refs["f0"].rows[0]) << "--kv fp8 had no effect on the reference";
  {
    EngineConfig c = small_blocks(256, true);
    c.kv_fp8 = true;
    c.max_batched_tokens = 12;
    Harness h(c);
    EXPECT_EQ(h.engine().block_bytes(), state_layout(mc, 16, KvFormat::FP8).block_bytes);
    EXPECT_LT(h.engine().block_bytes(), state_layout(mc, 16, KvFormat::F32).block_bytes);
    h.submit(greedy("f0", prompts["f0"], 4));
    h.wait();
    for (const char* id : {"f1", "f2"}) h.submit(greedy(id, prompts[id], 4));
    Request forked = greedy("f3", prompts["f3"], 4);
    forked.sampling.n = 2;
    h.submit(forked);
    h.wait();
    for (const char* id : {"f0", "f1", "f2", "f3"}) expect_matches(h, id, 0, refs[id], "prefix cache");
    expect_matches(h, "f3", 1, refs["f3"], "fork");
    for (const char* id : {"f1", "f2", "f3"}) EXPECT_EQ(h.output(id).final.cached_prompt_tokens, 32) << id;
    expect_pool_full(h.engine());
  }

  // Preemption: 2 blocks of 16 tokens for 5 requests of up to 19 + 4 tokens.
  Rng r(18);
  const std::vector<Request> reqs = random_greedy_requests(r, 5, "p", 1400, {6, 14}, {4, 0});
  for (const auto& q : reqs) refs[q.id] = reference(fp8, q.prompt, 4);
  for (bool caching : {false, true}) {
    EngineConfig c = small_blocks(2, caching);
    c.kv_fp8 = true;
    Harness h(c);
    for (const auto& q : reqs) h.submit(q);
    h.wait();
    for (const auto& q : reqs) expect_matches(h, q.id, 0, refs[q.id], caching ? "preemption+cache" : "preemption");
    EXPECT_GT(h.engine().metrics().preemptions, 0);
    expect_pool_full(h.engine());
  }
}

// Backend::sample in the engine, forced on for the CPU backend: seeded requests of every filter
// kind give exactly the host sampler's tokens (the uniforms come from the same per-sample RNGs),
// while penalties, logprobs and the first token of n > 1 stay on the host.
TEST(Engine, DeviceSamplingMatchesHostSampling) {
  std::vector<Request> reqs;
  int64_t host_only = 0;  // tokens that must be sampled on the host
  auto add = [&](float t, int32_t k, float p, float m, std::optional<uint64_t> seed) -> Request& {
    Request r;
    r.id = "q" + std::to_string(reqs.size());
    r.prompt = random_prompt(5 + int64_t(reqs.size()) * 3, 700 + reqs.size());
    r.sampling.temperature = t;
    r.sampling.top_k = k;
    r.sampling.top_p = p;
    r.sampling.min_p = m;
    r.sampling.seed = seed;
    r.sampling.max_tokens = 6;
    r.sampling.ignore_eos = true;
    reqs.push_back(r);
    return reqs.back();
  };
  add(1.f, 0, 1.f, 0.f, 1);
  add(0.7f, 0, 0.9f, 0.f, 2);
  add(1.2f, 20, 1.f, 0.f, 3);
  add(1.f, 0, 1.f, 0.1f, 4);
  add(0.9f, 40, 0.8f, 0.05f, 5);
  add(0.f, 0, 1.f, 0.f, 6);                 // greedy
  add(1.5f, 0, 0.95f, 0.f, std::nullopt);   // seeded by the engine
  add(1.f, 0, 0.9f, 0.f, 8).sampling.n = 3;  // sample 0's first token: host (forks share the row)
  add(1.f, 10, 1.f, 0.f, 9).sampling.presence_penalty = 0.5f;
  add(1.f, 0, 0.9f, 0.f, 10).sampling.logprobs = 1;
  host_only = 2 * 6 + 3;
  auto run = [&](bool device) {
    EngineConfig c = small_blocks();
    c.device_sampling = device;
    c.seed = 77;
    Harness h(c);
    for (const auto& r : reqs) h.submit(r);
    h.wait();
    std::map<std::pair<std::string, int32_t>, std::vector<int32_t>> out;
    for (const auto& r : reqs)
      for (int32_t i = 0; i < r.sampling.n; ++i) {
        const Output o = h.output(r.id, i);
        EXPECT_EQ(o.finish, FinishReason::Length) << r.id << " sample " << i;
        out[{r.id, i}] = o.tokens;
      }
    return std::make_pair(out, h.engine().metrics());
  };
  const auto [host, host_m] = run(false);
  const auto [dev, dev_m] = run(true);
  for (const auto& [key, tokens] : host) {
    EXPECT_EQ(tokens.size(), 6u) << key.first << " sample " << key.second;
    EXPECT_EQ(dev.at(key), tokens) << key.first << " sample " << key.second;
  }
  EXPECT_EQ(host_m.device_sampled_tokens, 0);
  EXPECT_EQ(dev_m.generation_tokens_total, host_m.generation_tokens_total);
  EXPECT_EQ(dev_m.device_sampled_tokens, dev_m.generation_tokens_total - host_only);
}

TEST(Engine, RejectsGpuMemoryUtilizationOutsideZeroToOne) {
  for (double u : {0.0, -0.5, 1.5, std::nan("")}) {
    EngineConfig c = small_blocks();
    c.gpu_memory_utilization = u;
    c.log_startup = false;
    try {
      make_engine(c, tiny_model());
      ADD_FAILURE() << "no error for " << u;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--gpu-memory-utilization"), std::string::npos) << e.what();
    }
  }
}

TEST(Engine, GenerateCommand) {
  const std::string cmd = std::string(DSV4_BINARY) + " generate --prompt 'Hello there' --max-tokens 5 --seed 3 > " +
                          ::testing::TempDir() + "gen.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const std::string fp8 = std::string(DSV4_BINARY) + " generate --kv fp8 --prompt 'Hello there' --max-tokens 5 --seed 3 > " +
                          ::testing::TempDir() + "gen_fp8.txt 2>&1";
  ASSERT_EQ(std::system(fp8.c_str()), 0) << fp8;
  // -n -1 is a command-line error naming -n (it was an uncaught std::length_error).
  const std::string out = ::testing::TempDir() + "gen_bad_n.txt";
  const std::string bad = std::string(DSV4_BINARY) + " generate --prompt hi -n -1 > " + out + " 2>&1";
  EXPECT_NE(std::system(bad.c_str()), 0) << bad;
  std::ifstream f(out);
  const std::string msg((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_NE(msg.find("-n"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("length"), std::string::npos) << msg;
}

// Prompt logprobs (echo scoring) equal log-softmax of a whole-prompt forward pass of the same
// weights, computed in double here; the prompt is scored whole even when the prefix cache holds
// it, in chunks mixed with other requests, with max_tokens 0 (scoring only) and with generation.
TEST(Engine, PromptLogprobsMatchWholePromptForward) {
  auto lm = tiny_model();
  const ModelConfig& mc = lm->config();
  Backend& be = lm->model->backend();
  const int64_t V = mc.vocab_size;
  Model ref(mc, lm->generated->weights(), be);
  const auto prompt = random_prompt(150, 4242);
  SequenceState st = ref.new_sequence(int64_t(prompt.size()));
  Tensor lg = ref.forward(st, prompt);
  std::vector<float> all(size_t(lg.dim(0) * V));
  be.download(lg, all.data());
  constexpr int32_t k = 3;
  auto check = [&](const std::vector<TokenLogprob>& got, const std::string& what) {
    ASSERT_EQ(got.size(), prompt.size() - 1) << what;
    for (size_t p = 0; p + 1 < prompt.size(); ++p) {
      const float* row = &all[p * size_t(V)];
      double mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(row[v]));
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      const double lse = mx + std::log(sum);
      const int32_t want_tok = prompt[p + 1];
      EXPECT_EQ(got[p].token, want_tok) << what << " position " << p + 1;
      EXPECT_NEAR(got[p].logprob, double(row[want_tok]) - lse, 1e-5) << what << " position " << p + 1;
      ASSERT_EQ(got[p].top.size(), size_t(k)) << what;
      // The best alternative is the row's argmax (lowest id among ties).
      const int32_t best = int32_t(std::max_element(row, row + V) - row);
      EXPECT_EQ(got[p].top[0].first, best) << what << " position " << p + 1;
      for (int i = 1; i < k; ++i) EXPECT_LE(got[p].top[i].second, got[p].top[i - 1].second) << what;
    }
  };
  Harness h(small_blocks(256, true));
  h.submit(greedy("warm", prompt, 1));  // fills the prefix cache with this prompt's blocks
  h.wait();
  Request only = greedy("score", prompt, 0);
  only.sampling.prompt_logprobs = k;
  Request gen = greedy("score+gen", prompt, 4);
  gen.sampling.prompt_logprobs = k;
  gen.sampling.n = 2;
  h.submit(only);
  h.submit(gen);
  for (int i = 0; i < 6; ++i) h.submit(greedy("other" + std::to_string(i), random_prompt(20 + 17 * i, 90 + i), 5));
  h.wait();
  const Output o = h.output("score");
  EXPECT_EQ(o.finish, FinishReason::Length);
  EXPECT_TRUE(o.tokens.empty());
  EXPECT_EQ(o.final.completion_tokens, 0);
  EXPECT_EQ(o.final.cached_prompt_tokens, 0);
  check(o.prompt_logprobs, "max_tokens 0");
  for (int32_t i = 0; i < 2; ++i) {
    const Output g = h.output("score+gen", i);
    EXPECT_EQ(g.tokens.size(), 4u);
    check(g.prompt_logprobs, "with generation, sample " + std::to_string(i));
  }
  EXPECT_EQ(h.output("score+gen", 1).tokens, h.output("score+gen", 0).tokens);  // greedy samples agree
  Request bad = greedy("bad", prompt, 0);
  EXPECT_THROW(h.engine().submit(bad, {}), EngineError);  // max_tokens 0 without scoring
  expect_pool_full(h.engine());
}

// The context is clamped to what the state pool holds: a prompt that fits the model's context
// but not the pool is refused at submit (typed, naming the prompt), before any work.
TEST(Engine, MaxModelLenClampedToThePool) {
  Harness h(small_blocks(8));  // 8 blocks of 16 tokens
  EXPECT_EQ(h.engine().metrics().max_model_len, 128);
  EXPECT_LT(128, tiny_model()->config().max_position_embeddings);
  try {
    h.engine().submit(greedy("long", random_prompt(130, 5), 1), {});
    ADD_FAILURE() << "a 130-token prompt was accepted by a 128-token pool";
  } catch (const EngineError& e) {
    EXPECT_EQ(e.kind, EngineError::Kind::ContextLength);
    EXPECT_EQ(e.param, "prompt");
  }
  h.submit(greedy("fits", random_prompt(120, 6), 8));
  h.wait();
  EXPECT_EQ(h.output("fits").tokens.size(), 8u);
  expect_pool_full(h.engine());
}
