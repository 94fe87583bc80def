// Tensor and expert parallelism over the thread communicator: every split of the generated models
// gives the unsharded logits (prefill, chunks and token-by-token decode; main model and MTP block),
// and every rank of a group gives the same ones.
#include <gtest/gtest.h>

#include <exception>
#include <thread>

#include "agreement.h"
#include "collectives_check.h"
#include "backend/backend.h"
#include "backend/communicator.h"
#include "model/forward.h"
#include "model/parallel.h"
#include "model/tiny.h"
#include "util/error.h"
#include "util/random.h"

using namespace dsv4;

namespace {

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(r.below(uint64_t(vocab)));
  return t;
}

// A prefill chunk, a second chunk, then one token at a time (decode).
std::vector<int64_t> prefill_then_decode(int64_t prefill, int64_t chunk, int64_t decode) {
  std::vector<int64_t> s{prefill, chunk};
  s.insert(s.end(), size_t(decode), 1);
  return s;
}

// run_chunked on every rank of a group, one thread per rank; rank r runs with the shard of
// shard_of(r). Returns each rank's logits.
template <class ShardOf>
std::vector<std::vector<float>> run_group(const GeneratedModel& gm, const ParallelConfig& par, ShardOf shard_of,
                                          std::span<const int32_t> tokens, std::span<const int64_t> chunks, bool mtp) {
  const int n = par.world();
  auto comms = make_thread_group(n);
  std::vector<std::vector<float>> out(static_cast<size_t>(n));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        WeightShard shard(gm.config(), gm.weights(), par, shard_of(r));
        auto be = make_cpu_backend();
        Model model(gm.config(), shard.weights(), *be, ModelRank{par, comms[size_t(r)].get()});
        out[size_t(r)] = run_chunked(model, tokens, chunks, mtp);
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

std::vector<float> run_unsharded(const GeneratedModel& gm, std::span<const int32_t> tokens,
                                 std::span<const int64_t> chunks, bool mtp) {
  auto be = make_cpu_backend();
  Model model(gm.config(), gm.weights(), *be);
  return run_chunked(model, tokens, chunks, mtp);
}

struct Split {
  std::string preset;
  int tp, ep;
};
void PrintTo(const Split& s, std::ostream* os) { *os << s.preset << " --tp " << s.tp << " --ep " << s.ep; }

class ParallelForward : public ::testing::TestWithParam<Split> {};

}  // namespace

TEST_P(ParallelForward, EqualsUnshardedPrefillAndDecode) {
  const Split sp = GetParam();
  GeneratedModel gm(tiny_preset_config(sp.preset), 7);
  const ModelConfig& c = gm.config();
  const ParallelConfig par{sp.tp, sp.ep};
  const auto tokens = random_tokens(48, c.vocab_size, 11);
  const auto chunks = prefill_then_decode(29, 7, 12);
  for (bool mtp : {false, true}) {
    const std::string what = std::string(mtp ? "mtp" : "main") + " tp " + std::to_string(sp.tp) + " ep " +
                             std::to_string(sp.ep);
    const auto ref = run_unsharded(gm, tokens, chunks, mtp);
    const auto ranks = run_group(gm, par, [](int r) { return r; }, tokens, chunks, mtp);
    for (size_t r = 0; r < ranks.size(); ++r) {
      const test::Agreement a = test::agree(ref, ranks[r], c.vocab_size);
      EXPECT_LE(a.worst_rel, 1e-5f) << what << " rank " << r;
      EXPECT_EQ(a.argmax_same, a.rows) << what << " rank " << r;
      EXPECT_EQ(ranks[r], ranks[0]) << what << ": rank " << r << " differs from rank 0";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Splits, ParallelForward,
                         ::testing::Values(Split{"tiny", 2, 1}, Split{"tiny", 1, 2}, Split{"tiny", 1, 4},
                                           Split{"tiny", 2, 2}, Split{"tiny-fp8", 2, 1}, Split{"tiny-fp8", 1, 4},
                                           Split{"small", 4, 1}, Split{"small", 4, 4}),
                         [](const auto& info) {
                           std::string n = info.param.preset + "_tp" + std::to_string(info.param.tp) + "_ep" +
                                           std::to_string(info.param.ep);
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// The comparison is not vacuous: ranks that all hold rank 0's heads and experts (a wrong shard
// offset) give different logits.
TEST(ParallelForward, WrongShardsAreDetected) {
  GeneratedModel gm(tiny_preset_config("tiny"), 7);
  const auto tokens = random_tokens(24, gm.config().vocab_size, 3);
  const auto ref = run_unsharded(gm, tokens, {}, false);
  for (const ParallelConfig par : {ParallelConfig{2, 1}, ParallelConfig{1, 2}}) {
    const auto ranks = run_group(gm, par, [](int) { return 0; }, tokens, {}, false);
    EXPECT_GT(test::agree(ref, ranks[0], gm.config().vocab_size).worst_rel, 1e-3f) << par.tp << " " << par.ep;
  }
}

TEST(ParallelForward, ImpossibleSplitsNameTheFlag) {
  const ModelConfig c = GeneratedModel(tiny_preset_config("tiny"), 1).config();  // 4 heads, 2 groups, 8 experts
  auto message = [&](ParallelConfig p) {
    try {
      check_parallel(c, p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message({4, 1}).find("--tp 4"), std::string::npos) << message({4, 1});  // 2 output groups
  EXPECT_NE(message({1, 3}).find("--ep 3"), std::string::npos) << message({1, 3});
  EXPECT_NE(message({2, 4}).find("--tp 2 with --ep 4"), std::string::npos) << message({2, 4});
  EXPECT_NE(message({0, 1}).find("--tp"), std::string::npos);
  EXPECT_EQ(message({2, 2}), "");
}

// The thread communicator against a double-precision reference of the same random inputs.
TEST(ThreadCommunicator, CollectivesMatchReference) {
  for (int n : {1, 2, 3, 4}) {
    const int64_t len = 37;
    auto comms = make_thread_group(n);
    std::vector<std::vector<float>> in(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) {
      Rng rng(uint64_t(100 + r));
      for (int64_t i = 0; i < n * len; ++i) in[size_t(r)].push_back(rng.uniform_f32() * 2 - 1);
    }
    std::vector<test::CollectiveResults> out(static_cast<size_t>(n));
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r)
      threads.emplace_back([&, r] {
        auto be = make_cpu_backend();
        out[size_t(r)] = test::run_collectives(*be, *comms[size_t(r)], in[size_t(r)], n, len);
      });
    for (auto& t : threads) t.join();
    test::expect_collectives_match(in, out, len, 1e-6);
  }
}
