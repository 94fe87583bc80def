// The NCCL communicator and the sharded forward pass on GPUs: one rank per device, one thread per
// rank (docs/ENGINE.md, "Several GPUs"). A single GPU runs the group of one; the sharded forward
// needs two devices or more (skipped otherwise).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include "backend/cuda/nccl_communicator.h"
#include "../model/collectives_check.h"
#include "cuda_test_util.h"
#include "model/forward.h"
#include "model/parallel.h"
#include "model/tiny.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace

// Every collective against a double-precision reference of random inputs, for groups of 1..4.
TEST(Nccl, CollectivesMatchReference) {
  DSV4_REQUIRE_GPU();
  for (int n = 1; n <= std::min(4, device_count()); ++n) {
    const int64_t len = 4099;
    auto comms = make_nccl_group(n);
    std::vector<std::vector<float>> in(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) in[size_t(r)] = normal(n * len, uint64_t(40 + r));
    std::vector<test::CollectiveResults> out(static_cast<size_t>(n));
    RankThreads threads(n);
    threads.run([&](int r) {
      auto be = make_cuda_backend(r, {});
      nccl_bind_stream(*comms[size_t(r)], *be);
      out[size_t(r)] = test::run_collectives(*be, *comms[size_t(r)], in[size_t(r)], n, len);
    });
    test::expect_collectives_match(in, out, len, 1e-5);
  }
}

// TP and EP over every visible GPU (up to 4) against the unsharded CUDA pass on device 0: prefill,
// a chunk and decodes, main model and MTP block.
TEST(Nccl, ShardedForwardMatchesUnsharded) {
  DSV4_REQUIRE_GPU();
  const int n = std::min(4, device_count());
  if (n < 2) GTEST_SKIP() << "no CUDA device pair (the sharded pass needs 2 GPUs or more)";
  GeneratedModel gm(tiny_preset_config("small"), 5);
  const ModelConfig& c = gm.config();
  const auto tokens = rand_ints(48, c.vocab_size, 9);
  const std::vector<int64_t> chunks{29, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  for (bool mtp : {false, true}) {
    std::vector<float> ref;
    {
      auto be = make_cuda_backend(0, {});
      Model m(c, gm.weights(), *be);
      ref = run_chunked(m, tokens, chunks, mtp);
    }
    for (const ParallelConfig par : {ParallelConfig{n, 1}, ParallelConfig{1, n}, ParallelConfig{n, n}}) {
      auto comms = make_nccl_group(n);
      std::vector<std::vector<float>> out(static_cast<size_t>(n));
      RankThreads threads(n);
      threads.run([&](int r) {
        WeightShard shard(c, gm.weights(), par, r);
        auto be = make_cuda_backend(r, {});
        nccl_bind_stream(*comms[size_t(r)], *be);
        Model m(c, shard.weights(), *be, ModelRank{par, comms[size_t(r)].get()});
        out[size_t(r)] = run_chunked(m, tokens, chunks, mtp);
      });
      for (int r = 0; r < n; ++r) {
        const Agreement a = agree(ref, out[size_t(r)], c.vocab_size);
        std::printf("[nccl] tp %d ep %d mtp %d rank %d worst_rel=%.3e argmax=%lld/%lld\n", par.tp, par.ep, mtp, r,
                    a.worst_rel, (long long)a.argmax_same, (long long)a.rows);
        EXPECT_LE(a.worst_rel, 1e-4f) << "tp " << par.tp << " ep " << par.ep << " rank " << r;
      }
    }
  }
}
