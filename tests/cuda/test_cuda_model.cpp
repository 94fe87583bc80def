// Whole-model checks on the GPU: CUDA vs CPU reference in exact mode on generated tiny models
// (any chunk schedule), and the production KV format (--kv fp8, packed rows) on both sides.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "backend/backend.h"
#include "../engine/batch_scenario.h"
#include "cuda_test_util.h"
#include "engine/state_manager.h"
#include "model/checkpoint.h"
#include "model/forward.h"
#include "model/placement.h"
#include "model/tiny.h"

namespace fs = std::filesystem;
using namespace dsv4;
using namespace dsv4::test;

// Exact mode: the GPU forward equals the CPU reference to the golden tolerance (1e-4 of the
// logit scale) for prefill, token-by-token and an uneven schedule, main model and MTP.
TEST(CudaModel, GeneratedTinyMatchesCpu) {
  DSV4_REQUIRE_GPU();
  for (const std::string& preset : tiny_preset_names()) {
    GeneratedModel gm(tiny_preset_config(preset), 5);
    const auto& cfg = gm.config();
    auto cpu = make_cpu_backend();
    auto gpu = poisoned_cuda_backend();
    Model mc(cfg, gm.weights(), *cpu), mg(cfg, gm.weights(), *gpu);
    const auto tok = test::rand_ints(70, cfg.vocab_size, 9);
    for (const auto& sched : std::vector<std::vector<int64_t>>{{}, std::vector<int64_t>(70, 1), {7, 1, 13, 20, 29}}) {
      for (bool mtp : {false, true}) {
        if (mtp && cfg.num_nextn_predict_layers == 0) continue;
        auto a = agree(run_chunked(mc, tok, sched, mtp), run_chunked(mg, tok, sched, mtp), cfg.vocab_size);
        std::printf("[model] %s chunks=%zu mtp=%d worst_rel=%.3e argmax=%lld/%lld\n", preset.c_str(), sched.size(), mtp,
                    a.worst_rel, (long long)a.argmax_same, (long long)a.rows);
        EXPECT_LE(a.worst_rel, 1e-4f) << preset;
        EXPECT_EQ(a.argmax_same, a.rows) << preset;
      }
    }
  }
}

// Routed experts in pinned host memory (Backend::set_host_resident, --offload-experts) are used
// from the device expert cache by the same kernels, and the embedding is gathered over the bus:
// the logits must be bit for bit those of the all-device placement (prefill, chunks, decode; main
// model and MTP block; exact and FP8 activations), as long as the all-device run is itself
// deterministic (two runs compared first; otherwise the golden tolerance). Two caches: one
// token's experts (prefill chunks take several passes, every layer evicts the previous one's
// experts) and every offloaded expert (later steps hit).
TEST(CudaModel, HostResidentExpertsMatchDevicePlacement) {
  DSV4_REQUIRE_GPU();
  for (const std::string& preset : tiny_preset_names()) {
    GeneratedModel gm(tiny_preset_config(preset), 41);
    const auto& cfg = gm.config();
    OffloadSpec spec;
    spec.kind = OffloadSpec::Kind::Layers;
    spec.layers = {0, cfg.num_hidden_layers - 1};
    if (cfg.num_nextn_predict_layers) spec.layers.push_back(cfg.num_hidden_layers);
    if (cfg.num_hidden_layers == 1) spec.layers.erase(spec.layers.begin());
    const ExpertOffloadPlan plan = plan_expert_offload(cfg, gm.weights(), spec, -1);
    ASSERT_TRUE(plan.embedding) << preset;
    ASSERT_EQ(plan.cache_bytes, plan.expert_bytes * cfg.num_experts_per_tok) << preset;
    const int64_t all_experts = plan.host_bytes - int64_t(gm.weights().embed->nbytes);
    for (const int64_t cache : {plan.cache_bytes, all_experts + (int64_t(1) << 20)}) {
      for (bool fp8 : {false, true}) {
        auto dev_be = poisoned_cuda_backend(), dev_again_be = poisoned_cuda_backend(),
             host_be = poisoned_cuda_backend();
        host_be->set_host_resident(plan.host_tensors, size_t(cache));
        Model md(cfg, gm.weights(), *dev_be), md_again(cfg, gm.weights(), *dev_again_be),
            mh(cfg, gm.weights(), *host_be);
        for (Model* m : {&md, &md_again, &mh}) m->set_fp8_activations(fp8);
        const auto tok = test::rand_ints(40, cfg.vocab_size, 43);
        const std::vector<int64_t> sched = {7, 1, 13, 1, 1, 17};
        for (bool mtp : {false, true}) {
          if (mtp && cfg.num_nextn_predict_layers == 0) continue;
          const auto ref = run_chunked(md, tok, sched, mtp), again = run_chunked(md_again, tok, sched, mtp),
                     got = run_chunked(mh, tok, sched, mtp);
          ASSERT_EQ(ref.size(), got.size());
          const bool deterministic = std::memcmp(ref.data(), again.data(), ref.size() * 4) == 0;
          int64_t differ = 0;
          for (size_t i = 0; i < ref.size(); ++i) differ += std::memcmp(&ref[i], &got[i], 4) != 0;
          const CudaExpertCacheStats st = cuda_expert_cache_stats(*host_be);
          std::printf("[model] %s cache %lld B (%lld slots) fp8=%d mtp=%d: %lld of %zu logits differ (device run %s); "
                      "cache hits %llu misses %llu\n",
                      preset.c_str(), (long long)cache, (long long)st.slots, fp8, mtp, (long long)differ, ref.size(),
                      deterministic ? "deterministic" : "not deterministic", (unsigned long long)st.hits,
                      (unsigned long long)st.misses);
          EXPECT_EQ(st.overflows, 0u) << preset;
          EXPECT_GT(st.misses, 0u) << preset;
          // A cache of every offloaded expert fetches each at most once; one token's worth refetches.
          if (cache > plan.cache_bytes) {
            EXPECT_GT(st.hits, 0u) << preset;
          }
          if (deterministic) {
            EXPECT_EQ(differ, 0) << preset << " mtp=" << mtp << " fp8=" << fp8;
          } else {
            const auto a = agree(ref, got, cfg.vocab_size);
            EXPECT_LE(a.worst_rel, 1e-4f) << preset;
          }
        }
      }
    }
  }
}

// A plan that moves only the token embedding (--offload-experts 0, or auto a little short of
// memory): no expert cache, the embedding rows gathered over the bus; the logits must equal the
// all-device placement's bit for bit (when two all-device runs agree; else the golden tolerance).
TEST(CudaModel, HostResidentEmbeddingMatchesDevicePlacement) {
  DSV4_REQUIRE_GPU();
  GeneratedModel gm(tiny_preset_config("tiny"), 41);
  const auto& cfg = gm.config();
  OffloadSpec spec;
  spec.kind = OffloadSpec::Kind::Count;
  spec.count = 0;
  const ExpertOffloadPlan plan = plan_expert_offload(cfg, gm.weights(), spec, -1);
  ASSERT_TRUE(plan.embedding);
  ASSERT_TRUE(plan.layers.empty());
  ASSERT_EQ(plan.cache_bytes, 0);
  auto dev_be = poisoned_cuda_backend(), dev_again_be = poisoned_cuda_backend(), host_be = poisoned_cuda_backend();
  host_be->set_host_resident(plan.host_tensors, size_t(plan.cache_bytes));
  Model md(cfg, gm.weights(), *dev_be), md_again(cfg, gm.weights(), *dev_again_be), mh(cfg, gm.weights(), *host_be);
  const auto tok = test::rand_ints(40, cfg.vocab_size, 43);
  const std::vector<int64_t> sched = {7, 1, 13, 1, 1, 17};
  const auto ref = run_chunked(md, tok, sched, true), again = run_chunked(md_again, tok, sched, true),
             got = run_chunked(mh, tok, sched, true);
  ASSERT_EQ(ref.size(), got.size());
  if (std::memcmp(ref.data(), again.data(), ref.size() * 4) == 0) {
    EXPECT_EQ(std::memcmp(ref.data(), got.data(), ref.size() * 4), 0);
  } else {
    EXPECT_LE(agree(ref, got, cfg.vocab_size).worst_rel, 1e-4f);
  }
  EXPECT_EQ(cuda_expert_cache_stats(*host_be).slots, 0);
}

// --kv fp8 with packed storage (U8 rows, tensor/kv_format.h) on both sides: CUDA vs the CPU
// reference. Both quantise with identical math, but a 1-ulp difference upstream can move a value
// across an E4M3 rounding boundary (one FP8 step = 2^-3 relative), so the bound is 2e-2 of the
// logit scale with >= 99 % argmax agreement. On the GPU alone, the packed path must equal the F32
// simulation (KvFormat::FP8Simulated: quantize_kv in F32 storage) bit for bit: the same values
// reach attention (checked when the GPU forward is deterministic run to run, else to 2e-2).
TEST(CudaModel, KvFp8PackedMatchesCpu) {
  DSV4_REQUIRE_GPU();
  const fs::path root = fs::path(DSV4_SOURCE_DIR) / "tests" / "data" / "golden";
  int64_t rows = 0, same = 0;
  int configs = 0;
  for (const char* name : {"tiny", "tiny-fp8", "mini3"}) {
    if (!fs::exists(root / name / "config.json")) continue;
    ++configs;
    auto ck = Checkpoint::open((root / name).string());
    const auto& cfg = ck->config();
    auto cpu = make_cpu_backend();
    auto gpu = poisoned_cuda_backend();
    Model mc(cfg, ck->weights(), *cpu), mg(cfg, ck->weights(), *gpu), mg_sim(cfg, ck->weights(), *gpu);
    mc.set_kv_fp8(true);
    mg.set_kv_fp8(true);
    mg_sim.set_kv_format(KvFormat::FP8Simulated);
    {
      SequenceState st = mg.new_sequence(16);
      ASSERT_EQ(st.store->layers.at(0).window.type, ElemType::U8) << name << ": --kv fp8 state is not packed on the GPU";
      EXPECT_EQ(st.store->layers.at(0).window.cols(), kv_row_layout(cfg.head_dim, cfg.nope_dim()).bytes) << name;
    }
    const auto tok = test::rand_ints(80, cfg.vocab_size, 3);
    for (const auto& sched : std::vector<std::vector<int64_t>>{{}, std::vector<int64_t>(80, 1), {5, 1, 30, 2, 42}}) {
      auto ref = run_chunked(mc, tok, sched, false);
      const auto packed = run_chunked(mg, tok, sched, false);
      auto a = agree(ref, packed, cfg.vocab_size);
      std::printf("[model] kv-fp8 packed %s chunks=%zu worst_rel=%.3e argmax=%lld/%lld\n", name, sched.size(),
                  a.worst_rel, (long long)a.argmax_same, (long long)a.rows);
      EXPECT_LE(a.worst_rel, 2e-2f) << name << " chunks=" << sched.size() << ": CUDA packed vs CPU packed";
      rows += a.rows;
      same += a.argmax_same;
      // The format must actually change the logits (else the flag is not wired).
      Model plain(cfg, ck->weights(), *cpu);
      auto b = agree(ref, run_chunked(plain, tok, sched, false), cfg.vocab_size);
      EXPECT_GT(b.worst_rel, 1e-6f) << name << ": --kv fp8 had no effect";
      // GPU packed vs GPU simulation.
      const auto sim = run_chunked(mg_sim, tok, sched, false);
      const auto again = run_chunked(mg, tok, sched, false);
      const bool deterministic = std::memcmp(packed.data(), again.data(), packed.size() * 4) == 0;
      if (deterministic) {
        size_t first = packed.size();
        for (size_t i = 0; i < packed.size() && first == packed.size(); ++i)
          if (std::memcmp(&packed[i], &sim[i], 4) != 0) first = i;
        EXPECT_EQ(first, packed.size()) << name << " chunks=" << sched.size()
                                        << ": GPU packed storage differs from the GPU F32 simulation at logit " << first
                                        << " (row " << first / size_t(cfg.vocab_size) << "): packed "
                                        << (first < packed.size() ? packed[first] : 0.f) << ", simulated "
                                        << (first < sim.size() ? sim[first] : 0.f);
      } else {
        std::printf("[model] note: the GPU forward is not bitwise deterministic; packed vs simulated by tolerance\n");
        EXPECT_LE(agree(sim, packed, cfg.vocab_size).worst_rel, 2e-2f) << name << ": GPU packed vs GPU simulated";
      }
    }
  }
  ASSERT_GT(configs, 0) << "golden fixtures missing";
  EXPECT_GE(double(same), 0.99 * double(rows));
}

// The batched forward pass on the GPU: a mixed batch (decodes, prefill chunks, a chunk crossing a
// block boundary, forked sequences sharing prefix blocks, scattered block tables) run in one
// pass on CUDA gives each sequence what the CPU reference gives it alone: 1e-4 of the logit
// scale in exact storage; with FP8 KV 2e-2 (one row a preset may be out) and >= 99 % argmax agreement.
TEST(CudaModel, MixedBatchMatchesCpuAlone) {
  DSV4_REQUIRE_GPU();
  for (const std::string& preset : tiny_preset_names()) {
    GeneratedModel gm(tiny_preset_config(preset), 17);
    const auto& cfg = gm.config();
    auto cpu = make_cpu_backend();
    auto gpu = poisoned_cuda_backend();
    Model mc(cfg, gm.weights(), *cpu), mg(cfg, gm.weights(), *gpu);
    for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
      const test::BatchScenario r = test::run_batch_scenario(mg, mc, kv, 5);
      ASSERT_EQ(r.batched.size(), r.alone.size());
      const auto a = agree(r.alone, r.batched, cfg.vocab_size);
      std::printf("[model] batch %s kv=%s rows=%lld worst_rel=%.3e argmax=%lld/%lld\n", preset.c_str(),
                  kv_format_name(kv), (long long)r.rows, a.worst_rel, (long long)a.argmax_same, (long long)a.rows);
      if (kv == KvFormat::F32) {
        EXPECT_LE(a.worst_rel, 1e-4f) << preset;
        EXPECT_EQ(a.argmax_same, a.rows) << preset;
      } else {
        // An E4M3 rounding flip of one cached entry, or a routing/indexer choice it tips over,
        // moves its row past the bound (the FP8 fixtures' rule, tests/model/fp8_fixtures.h):
        // at most one such row a preset (measured: 0 with the FP32 mHC mixing, one of 106 rows
        // of `small` at 0.105 with the tensor-core one, whose mixing differs in summation order
        // only); a wrong kernel or wiring fails the rows of a whole sequence.
        const auto outside = std::count_if(a.row_rel.begin(), a.row_rel.end(), [](float r) { return !(r <= 2e-2f); });
        if (outside) std::printf("[model] batch %s kv=fp8: %lld rows outside 2e-2\n", preset.c_str(), (long long)outside);
        EXPECT_LE(outside, 1) << preset;
        EXPECT_GE(double(a.argmax_same), 0.99 * double(a.rows)) << preset;
      }
    }
  }
}

// CUDA graphs of decode steps (Model::set_decode_graphs, Backend::run_graph): three runs of the
// same greedy decode (every run fed the tokens the graph run picks): graphs (captured, then
// replayed), the same fixed-shape steps without graphs, and the plain per-batch plan. Five
// sequences at different offsets decode 320 steps through window, compression and block
// boundaries; the batch shrinks to three and one sequence and grows back (row buckets 8, 4, 1)
// and the block tables grow: every bucket change is a new capture. Replays must equal the eager
// fixed-shape steps bit for bit (they run the same kernels on the same addresses). The plain plan
// splits attention differently (narrower lists): F32 KV gives the same greedy tokens and logits
// within 1e-5 of their scale; with FP8 KV a rounding difference can cross an E4M3 step, so there
// the bound is the whole-model FP8 one (2e-2, >= 99 % of the greedy tokens).
TEST(CudaModel, DecodeGraphsMatchEagerSteps) {
  DSV4_REQUIRE_GPU();
  for (const std::string preset : {"tiny", "small"}) {
    GeneratedModel gm(tiny_preset_config(preset), 31);
    const ModelConfig& c = gm.config();
    const int64_t V = c.vocab_size, steps = 320;
    CudaOptions no_graphs;
    no_graphs.graphs = false;
    auto graphed_be = poisoned_cuda_backend(), eager_be = poisoned_cuda_backend(no_graphs),
         plain_be = poisoned_cuda_backend();
    for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
      SCOPED_TRACE(preset + " " + kv_format_name(kv));
      const CudaGraphStats before = cuda_graph_stats(*graphed_be);
      struct Run {
        std::unique_ptr<Model> model;
        std::unique_ptr<StateManager> mgr;
        std::vector<StateManager::Seq> seqs;
        std::vector<int32_t> next;  // each sequence's next token (its own greedy choice)
        std::vector<float> logits;  // of the last step
      };
      std::vector<Run> runs(3);
      Backend* bes[3] = {graphed_be.get(), eager_be.get(), plain_be.get()};
      const std::vector<int64_t> prompts = {1, 5, c.sliding_window + 3, 40, 77};
      const int64_t S = int64_t(prompts.size());
      for (int i = 0; i < 3; ++i) {
        Run& r = runs[size_t(i)];
        r.model = std::make_unique<Model>(c, gm.weights(), *bes[i]);
        r.model->set_decode_graphs(i < 2);
        const int64_t B = r.model->block_granularity();
        r.mgr = std::make_unique<StateManager>(*r.model, B, S * ((prompts.back() + steps) / B + 2), S, 0, kv);
        for (int64_t s = 0; s < S; ++s) {
          r.seqs.push_back(r.mgr->acquire());
          const auto prompt = rand_ints(prompts[size_t(s)], V, 100 + uint64_t(s));
          ASSERT_TRUE(r.mgr->reserve(r.seqs.back(), prompts[size_t(s)]));
          const Tensor lg = r.model->forward(r.seqs.back().st, prompt);
          std::vector<float> last(static_cast<size_t>(V));
          bes[i]->download(lg.rows_view(lg.rows() - 1, lg.rows()), last.data());
          r.next.push_back(int32_t(std::max_element(last.begin(), last.end()) - last.begin()));
        }
      }
      float scale = 0, worst = 0;
      int64_t same_token = 0, rows = 0;
      for (int64_t step = 0; step < steps; ++step) {
        std::vector<int64_t> active;
        for (int64_t s = 0; s < S; ++s)
          if (step < 100 || step >= 200 || (step < 150 ? s % 2 == 0 : s == 2)) active.push_back(s);
        for (Run& r : runs) {
          std::vector<ForwardSeq> batch;
          for (int64_t s : active) {
            auto& q = r.seqs[size_t(s)];
            ASSERT_TRUE(r.mgr->reserve(q, q.st.num_tokens + 1));
            batch.push_back({&q.st, std::span(r.next).subspan(size_t(s), 1), 1, 0});
          }
          const ForwardOutput out = r.model->forward(batch);
          r.logits.resize(size_t(out.logits.numel()));
          r.model->backend().download(out.logits, r.logits.data());
          for (size_t b = 0; b < active.size(); ++b) {
            const float* row = r.logits.data() + b * size_t(V);
            r.next[size_t(active[b])] = int32_t(std::max_element(row, row + V) - row);
          }
        }
        for (int64_t s : active) {
          same_token += runs[0].next[size_t(s)] == runs[2].next[size_t(s)];
          ++rows;
        }
        runs[1].next = runs[2].next = runs[0].next;
        for (size_t i = 0; i < runs[0].logits.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(runs[0].logits[i]), std::bit_cast<uint32_t>(runs[1].logits[i]))
              << "step " << step << " logit " << i << ": graph replay " << runs[0].logits[i] << ", eager "
              << runs[1].logits[i];
        for (size_t i = 0; i < runs[0].logits.size(); ++i) {
          scale = std::max(scale, std::fabs(runs[2].logits[i]));
          worst = std::max(worst, std::fabs(runs[0].logits[i] - runs[2].logits[i]));
        }
      }
      const CudaGraphStats g = cuda_graph_stats(*graphed_be);
      std::printf("[diag] decode graphs %s kv=%s: %lld captures, %lld replays, %lld kernels per step (%lld nodes); "
                  "graphs vs plain plan worst %.3e of the logit scale, greedy tokens %lld/%lld\n",
                  preset.c_str(), kv_format_name(kv), (long long)(g.captures - before.captures),
                  (long long)(g.replays - before.replays), (long long)g.kernels, (long long)g.nodes,
                  double(worst / scale), (long long)same_token, (long long)rows);
      EXPECT_GT(scale, 0.1f);
      if (kv == KvFormat::F32) {
        EXPECT_LE(worst, 1e-5f * scale);
        EXPECT_EQ(same_token, rows) << "greedy tokens of graphs and the plain plan differ";
      } else {
        EXPECT_LE(worst, 2e-2f * scale);
        EXPECT_GE(double(same_token), 0.99 * double(rows));
      }
      // Row buckets 8, 4, 1 and the growing block tables: several captures; every fixed-shape step
      // ran eagerly (a bucket's first), was captured or was replayed, most of them replays.
      const int64_t captures = g.captures - before.captures, replays = g.replays - before.replays;
      EXPECT_GE(captures, 4);
      EXPECT_EQ(g.eager - before.eager + captures + replays, runs[0].model->fixed_decode_steps());
      EXPECT_GE(replays, steps * 3 / 4);
      EXPECT_GT(g.kernels, 10 * c.num_hidden_layers);
      EXPECT_EQ(cuda_graph_stats(*eager_be).captures, 0);
      EXPECT_EQ(runs[1].model->fixed_decode_steps(), runs[0].model->fixed_decode_steps());
      EXPECT_EQ(runs[2].model->fixed_decode_steps(), 0);
    }
  }
}
