// The engine driving a tensor/expert-parallel group (one scheduler, every rank in lock step over
// the thread communicator) gives the tokens of the unsharded engine: batched prefill chunks and
// decodes, prefix-cache hits (snapshots restored on every rank), n > 1 forks, preemption.
#include <gtest/gtest.h>

#include "engine_test_util.h"
#include "util/error.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

struct RunResult {
  std::map<std::string, std::vector<int32_t>> tokens;  // "id/index"
  std::map<std::string, std::vector<std::vector<float>>> logits;
  EngineMetrics metrics;
};

// Two rounds of requests: the second shares prompt prefixes with the first (prefix-cache hits);
// one request has two sampled samples (a fork); the pool is small enough to preempt.
RunResult run_rounds(std::shared_ptr<LoadedModel> model) {
  EngineConfig c;
  c.block_size = 16;
  c.num_blocks = 12;
  c.max_running_requests = 8;
  c.max_batched_tokens = 48;
  Harness h(c, std::move(model));
  RunResult out;
  std::vector<std::pair<std::string, int32_t>> ids;
  Rng r(5);
  std::vector<std::vector<int32_t>> prompts;
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 6; ++i) {
      std::vector<int32_t> p = random_prompt(5 + int64_t(r.below(60)), 300 + 10 * round + i);
      if (round == 1) {
        std::vector<int32_t> q = prompts[size_t(i)];
        q.insert(q.end(), p.begin(), p.begin() + 3);
        p = q;
      }
      prompts.push_back(p);
      Request q = greedy("r" + std::to_string(round) + "_" + std::to_string(i), p, 5 + int32_t(r.below(6)));
      if (i == 2) {
        q.sampling.n = 2;
        q.sampling.temperature = 0.8f;
        q.sampling.seed = 17;
      }
      for (int32_t k = 0; k < q.sampling.n; ++k) ids.emplace_back(q.id, k);
      h.submit(std::move(q));
    }
    h.wait();
  }
  out.metrics = h.engine().metrics();
  for (const auto& [id, k] : ids) {
    const Output o = h.output(id, k);
    EXPECT_EQ(o.finish, FinishReason::Length) << id << "/" << k;
    out.tokens[id + "/" + std::to_string(k)] = o.tokens;
    out.logits[id + "/" + std::to_string(k)] = h.logits(id, k);
  }
  return out;
}

}  // namespace

TEST(ParallelEngine, SameTokensAsOneRank) {
  const RunResult ref = run_rounds(LoadedModel::demo("tiny", 7));
  EXPECT_GT(ref.metrics.prefix_hit_rate, 0) << "the second round must hit the prefix cache";
  EXPECT_GT(ref.metrics.preemptions, 0) << "the pool must be small enough to preempt";
  for (const ParallelConfig par : {ParallelConfig{2, 1}, ParallelConfig{1, 2}, ParallelConfig{2, 2}}) {
    SCOPED_TRACE("tp " + std::to_string(par.tp) + " ep " + std::to_string(par.ep));
    const RunResult got = run_rounds(LoadedModel::demo("tiny", 7, par));
    EXPECT_EQ(got.tokens, ref.tokens);
    EXPECT_GT(got.metrics.prefix_hit_rate, 0);  // (how many preemptions depends on request arrival timing)
    for (const auto& [id, rows] : ref.logits) {
      float scale = 0;
      for (const auto& row : rows)
        for (float x : row) scale = std::max(scale, std::fabs(x));
      expect_rows_near(got.logits.at(id), rows, 1e-5f * scale, id);
    }
  }
}

// Speculative decoding in a group: rank 0 drafts (the MTP block runs on every rank, each on its
// shard), the verify pass runs on every rank and each rank commits or rolls back its own state,
// so greedy tokens equal the unsharded engine's without speculation, prefix-cache hits included.
TEST(ParallelEngine, SpeculativeSameTokensAsOneRank) {
  Rng rng(23);
  const std::vector<Request> reqs = random_greedy_requests(rng, 6, "s", 700, {3, 50}, {12, 20});
  EngineConfig c;
  c.block_size = 16;
  c.num_blocks = 64;
  c.max_batched_tokens = 48;
  EngineMetrics m;
  const std::vector<Output> ref = run_two_turns(c, LoadedModel::demo("tiny", 7), reqs, &m);
  for (const ParallelConfig par : {ParallelConfig{2, 1}, ParallelConfig{1, 2}, ParallelConfig{2, 2}}) {
    for (int32_t k : {1, 2}) {
      SCOPED_TRACE("tp " + std::to_string(par.tp) + " ep " + std::to_string(par.ep) + " k " + std::to_string(k));
      c.speculative_tokens = k;
      const std::vector<Output> got = run_two_turns(c, LoadedModel::demo("tiny", 7, par), reqs, &m);
      ASSERT_EQ(got.size(), ref.size());
      for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(got[i].tokens, ref[i].tokens) << "request " << i;
      EXPECT_GT(m.draft_tokens, 50);
      EXPECT_GT(m.prefix_hit_rate, 0);
    }
  }
}
