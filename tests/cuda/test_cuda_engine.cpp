// The serving engine on the CUDA backend: concurrent requests sharing prefixes (so the second
// round is served from the prefix cache, blocks restored on the device) give the same greedy
// tokens as the engine on the CPU reference, and logits within the whole-model tolerance.
// Seeded sampling on the device (Backend::sample) gives the host sampler's tokens.
#include <gtest/gtest.h>

#include "../engine/engine_test_util.h"
#include "backend/cuda/cuda_backend.h"
#include "cuda_test_util.h"
#include "model/checkpoint.h"
#include "model/tiny.h"
#include "text/tiny_tokenizer.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

std::shared_ptr<LoadedModel> tiny_on_cuda(uint64_t seed) {
  auto m = std::make_shared<LoadedModel>();
  m->generated = std::make_unique<GeneratedModel>(tiny_preset_config("tiny"), seed);
  LoadedModel::Rank& rank = m->ranks.emplace_back();
  rank.backend = poisoned_cuda_backend();
  const ModelConfig& c = m->generated->config();
  rank.model = std::make_unique<Model>(c, m->generated->weights(), *rank.backend);
  m->model = rank.model.get();
  m->tokenizer = Tokenizer::from_json(tiny_tokenizer_json(c.vocab_size, c.bos_token_id, c.eos_token_id), "<tiny>");
  m->name = "tiny-cuda";
  return m;
}

struct RoundResult {
  std::vector<Output> outputs;
  std::vector<std::vector<std::vector<float>>> logits;
  int64_t cached = 0;
};

// Two rounds of 8 concurrent greedy requests whose prompts share a 2-block prefix.
std::vector<RoundResult> run_rounds(std::shared_ptr<LoadedModel> model, bool kv_fp8 = false,
                                    int32_t speculative_tokens = 0) {
  EngineConfig cfg;
  cfg.kv_fp8 = kv_fp8;
  cfg.speculative_tokens = speculative_tokens;
  cfg.block_size = 16;
  cfg.num_blocks = 256;
  cfg.max_batched_tokens = 48;  // forces chunked prefill mixed with decodes
  Harness h(cfg, std::move(model));
  const auto prefix = random_prompt(32, 99);
  std::vector<RoundResult> rounds;
  for (int round = 0; round < 2; ++round) {
    std::vector<std::string> ids;
    for (int i = 0; i < 8; ++i) {
      auto prompt = prefix;
      auto tail = random_prompt(3 + 5 * i, 1000 + i);
      prompt.insert(prompt.end(), tail.begin(), tail.end());
      ids.push_back(h.submit(greedy("r" + std::to_string(round) + "_" + std::to_string(i), prompt, 12)));
    }
    h.wait();
    RoundResult rr;
    for (const auto& id : ids) {
      rr.outputs.push_back(h.output(id));
      rr.logits.push_back(h.logits(id));
      rr.cached += rr.outputs.back().final.cached_prompt_tokens;
    }
    rounds.push_back(std::move(rr));
  }
  return rounds;
}

}  // namespace

TEST(CudaEngine, MatchesCpuEngineWithPrefixCacheAndChunkedPrefill) {
  DSV4_REQUIRE_GPU();
  auto cpu = run_rounds(LoadedModel::demo("tiny", 7));
  auto gpu = run_rounds(tiny_on_cuda(7));
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < cpu[round].outputs.size(); ++i) {
      const std::string what = "round " + std::to_string(round) + " request " + std::to_string(i);
      EXPECT_EQ(gpu[round].outputs[i].finish, FinishReason::Length) << what;
      EXPECT_EQ(gpu[round].outputs[i].tokens, cpu[round].outputs[i].tokens) << what;
      float scale = 0;
      for (const auto& row : cpu[round].logits[i])
        for (float x : row) scale = std::max(scale, std::fabs(x));
      // Whole-model CUDA vs CPU error is ~2e-6 of the logit scale (docs/PERF.md); 1e-4 leaves
      // room for the different chunking of the two runs' schedules.
      expect_rows_near(gpu[round].logits[i], cpu[round].logits[i], 1e-4f * scale, what);
    }
  }
  // The second round hits the prefix cache (2 shared blocks per request) on both backends.
  EXPECT_GE(gpu[1].cached, 8 * 32);
  EXPECT_EQ(gpu[1].cached, cpu[1].cached);
}

// --kv fp8 on the device: packed window rings, prefix snapshots and entry pools in the CUDA arena.
// FP8 rounding lets CPU and GPU token streams part after a near tie, so this compares the first
// logits row of every request (the prompt's last position: computed cold in round 0, from
// restored packed snapshots and shared packed blocks in round 1) with the CPU engine's --kv fp8
// run, to the whole-model FP8 bound (2e-2 of the logit scale), and the prefix-cache hits.
// Speculative decoding on the device (drafts verified in the batched pass, rollback through
// gather_rows/store_rows): the same greedy tokens as without it, F32 and FP8 KV, k = 1..3, both
// rounds (the second one from the prefix cache, MTP state included in the snapshots).
TEST(CudaEngine, SpeculativeGreedyMatchesPlain) {
  DSV4_REQUIRE_GPU();
  for (bool fp8 : {false, true}) {
    const auto plain = run_rounds(tiny_on_cuda(7), fp8);
    for (int32_t k = 1; k <= 3; ++k) {
      SCOPED_TRACE(testing::Message() << (fp8 ? "fp8" : "f32") << " k=" << k);
      const auto spec = run_rounds(tiny_on_cuda(7), fp8, k);
      for (size_t r = 0; r < plain.size(); ++r)
        for (size_t i = 0; i < plain[r].outputs.size(); ++i)
          EXPECT_EQ(spec[r].outputs[i].tokens, plain[r].outputs[i].tokens) << "round " << r << " request " << i;
      EXPECT_EQ(spec[1].cached, plain[1].cached);
    }
  }
}

// `dsv4 serve --cuda-graphs on|off`: the engine's all-decode steps replayed as CUDA graphs give
// the same greedy tokens as the plain per-batch plan, and logits within 1e-5 of their scale
// (the padded plan's kernels may split their work differently), both rounds. F32 KV: with FP8
// KV such a difference may cross an E4M3 rounding step and part the token streams
// (gpu.CudaModel.DecodeGraphsMatchEagerSteps compares FP8 runs fed the same tokens).
TEST(CudaEngine, GreedyIdenticalWithAndWithoutGraphs) {
  DSV4_REQUIRE_GPU();
  std::vector<RoundResult> plain;
  {  // freed before the second engine sizes its arena from the free device memory
    auto off = tiny_on_cuda(7);
    off->model->set_decode_graphs(false);
    plain = run_rounds(std::move(off));
  }
  auto on = tiny_on_cuda(7);
  ASSERT_TRUE(on->model->decode_graphs());
  Backend& on_be = on->model->backend();
  const Model& on_model = *on->model;
  const auto graphed = run_rounds(on);
  for (size_t r = 0; r < plain.size(); ++r)
    for (size_t i = 0; i < plain[r].outputs.size(); ++i) {
      const std::string what = "round " + std::to_string(r) + " request " + std::to_string(i);
      EXPECT_EQ(graphed[r].outputs[i].tokens, plain[r].outputs[i].tokens) << what;
      float scale = 0;
      for (const auto& row : plain[r].logits[i])
        for (float x : row) scale = std::max(scale, std::fabs(x));
      expect_rows_near(graphed[r].logits[i], plain[r].logits[i], 1e-5f * scale, what);
    }
  const CudaGraphStats g = cuda_graph_stats(on_be);
  std::printf("[diag] engine decode graphs: %lld fixed-shape steps, %lld captures, %lld replays, %lld kernels per step\n",
              (long long)on_model.fixed_decode_steps(), (long long)g.captures, (long long)g.replays,
              (long long)g.kernels);
  EXPECT_GT(g.captures, 0);
  EXPECT_GT(g.replays, 0);
}

TEST(CudaEngine, KvFp8MatchesCpuEngine) {
  DSV4_REQUIRE_GPU();
  auto cpu = run_rounds(LoadedModel::demo("tiny", 7), true);
  auto gpu = run_rounds(tiny_on_cuda(7), true);
  int64_t tokens_same = 0, tokens_total = 0;
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < cpu[round].outputs.size(); ++i) {
      const std::string what = "kv fp8 round " + std::to_string(round) + " request " + std::to_string(i);
      EXPECT_EQ(gpu[round].outputs[i].finish, FinishReason::Length) << what;
      ASSERT_FALSE(gpu[round].logits[i].empty()) << what;
      ASSERT_FALSE(cpu[round].logits[i].empty()) << what;
      const auto& c0 = cpu[round].logits[i][0];
      const auto& g0 = gpu[round].logits[i][0];
      ASSERT_EQ(c0.size(), g0.size()) << what;
      float scale = 0, err = 0;
      for (size_t k = 0; k < c0.size(); ++k) {
        scale = std::max(scale, std::fabs(c0[k]));
        err = std::max(err, std::isnan(g0[k]) ? INFINITY : std::fabs(c0[k] - g0[k]));
      }
      std::printf("[engine] %s first-row rel err %.3e\n", what.c_str(), err / std::max(scale, 1e-30f));
      EXPECT_LE(err, 2e-2f * scale) << what << ": first logits row, CUDA vs CPU engine with --kv fp8";
      EXPECT_EQ(gpu[round].outputs[i].tokens.at(0), cpu[round].outputs[i].tokens.at(0)) << what << ": first token";
      const auto& a = cpu[round].outputs[i].tokens;
      const auto& b = gpu[round].outputs[i].tokens;
      for (size_t k = 0; k < std::min(a.size(), b.size()); ++k) tokens_same += a[k] == b[k];
      tokens_total += int64_t(a.size());
    }
  }
  std::printf("[engine] kv fp8 greedy tokens equal: %lld/%lld\n", (long long)tokens_same, (long long)tokens_total);
  EXPECT_GE(gpu[1].cached, 8 * 32);
  EXPECT_EQ(gpu[1].cached, cpu[1].cached);
}

// The CUDA engine samples on the device by default; with device_sampling off it downloads each
// row and samples on the host. Same CUDA logits (one prefill chunk per prompt: no schedule
// dependence), same per-request RNGs: the tokens must be identical, for every filter kind,
// batched several rows per sample call. The penalty request is sampled on the host either way.
TEST(CudaEngine, DeviceSamplingMatchesHostSampling) {
  DSV4_REQUIRE_GPU();
  auto model = tiny_on_cuda(7);
  struct F {
    float t;
    int32_t k;
    float p, m;
  };
  const std::vector<F> filters = {{1.f, 0, 1.f, 0.f},  {0.7f, 0, 0.9f, 0.f},    {1.2f, 20, 1.f, 0.f},
                                  {1.f, 0, 1.f, 0.1f}, {0.9f, 40, 0.8f, 0.05f}, {0.f, 0, 1.f, 0.f},
                                  {2.f, 0, 0.99f, 0.f}, {1.f, 5, 0.5f, 0.f}};
  auto run = [&](bool device) {
    EngineConfig cfg;
    cfg.block_size = 16;
    cfg.num_blocks = 256;
    cfg.max_batched_tokens = 4096;
    cfg.device_sampling = device;
    Harness h(cfg, model);
    std::vector<std::string> ids;
    for (size_t i = 0; i <= filters.size(); ++i) {
      Request r;
      r.id = "s" + std::to_string(i);
      r.prompt = random_prompt(9 + 7 * int64_t(i), 500 + i);
      const F f = i < filters.size() ? filters[i] : F{1.f, 0, 1.f, 0.f};
      r.sampling.temperature = f.t;
      r.sampling.top_k = f.k;
      r.sampling.top_p = f.p;
      r.sampling.min_p = f.m;
      r.sampling.seed = 40 + i;
      r.sampling.max_tokens = 16;
      r.sampling.ignore_eos = true;
      if (i == filters.size()) r.sampling.frequency_penalty = 0.5f;  // host path
      ids.push_back(h.submit(r));
    }
    h.wait();
    std::vector<std::pair<Output, std::vector<std::vector<float>>>> out;
    for (const auto& id : ids) out.emplace_back(h.output(id), h.logits(id));
    return std::make_pair(out, h.engine().metrics());
  };
  const auto [host, host_m] = run(false);
  const auto [dev, dev_m] = run(true);
  for (size_t i = 0; i < host.size(); ++i) {
    const std::string what = "request " + std::to_string(i);
    // Identical logits first: otherwise a token difference would not be the sampler's.
    expect_rows_near(dev[i].second, host[i].second, 0.f, what + " logits (device vs host sampling run)");
    EXPECT_EQ(dev[i].first.tokens.size(), 16u) << what;
    EXPECT_EQ(dev[i].first.tokens, host[i].first.tokens) << what << ": device sampling chose other tokens";
  }
  EXPECT_EQ(host_m.device_sampled_tokens, 0);
  EXPECT_EQ(dev_m.device_sampled_tokens, dev_m.generation_tokens_total - 16);
}

// No --kv-memory on CUDA: the engine takes gpu_memory_utilization of the device memory free after
// the weights, as one arena for the state pool plus the activation headroom (docs/ENGINE.md,
// "Device memory"), and a request runs in it.
TEST(CudaEngine, GpuMemoryUtilizationSizesThePool) {
  DSV4_REQUIRE_GPU();
  auto model = tiny_on_cuda(7);
  const double u = 0.05;
  const double free_before = double(cuda_device_info(0).free_bytes);
  EngineConfig cfg;
  cfg.block_size = 16;
  cfg.gpu_memory_utilization = u;
  Harness h(cfg, model);
  const double usable = u * free_before, state = usable - std::min(8.0 * (1 << 30), usable / 2);
  const double blocks = double(h.engine().metrics().blocks_total) * double(h.engine().block_bytes());
  std::printf("[engine] free %.2f GiB, usable %.2f GiB, state %.2f GiB, blocks %.2f GiB\n", free_before / (1 << 30),
              usable / (1 << 30), state / (1 << 30), blocks / (1 << 30));
  EXPECT_LE(blocks, state);
  EXPECT_GE(blocks, 0.75 * state);  // the rest: slots and prefix snapshots (15%)
  const double taken = free_before - double(cuda_device_info(0).free_bytes);
  EXPECT_GE(taken, 0.95 * usable);  // one arena for state + headroom
  EXPECT_LE(taken, 1.05 * usable);
  h.submit(greedy("a", random_prompt(40, 3), 8));
  h.wait();
  EXPECT_EQ(h.output("a").finish, FinishReason::Length);
  EXPECT_EQ(h.output("a").tokens.size(), 8u);
}
