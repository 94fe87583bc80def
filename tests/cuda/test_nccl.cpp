// The NCCL communicator and the sharded forward pass on GPUs: one rank per device, one thread per
// rank (docs/ENGINE.md, "Several GPUs"). A single GPU runs the group of one; the sharded forward
// needs two devices or more (skipped otherwise).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include "backend/cuda/nccl_communicator.h"
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
    std::vector<std::vector<float>> in(static_cast<size_t>(n)), reduced(static_cast<size_t>(n)), gathered(static_cast<size_t>(n)), scattered(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) in[size_t(r)] = normal(n * len, uint64_t(40 + r));
    RankThreads threads(n);
    threads.run([&](int r) {
      auto be = make_cuda_backend(r, {});
      Communicator& comm = *comms[size_t(r)];
      nccl_bind_stream(comm, *be);
      Tensor t = be->alloc({n * len}), g = be->alloc({n, len}), s = be->alloc({len});
      be->upload(t, in[size_t(r)].data());
      comm.reduce_scatter_sum(t, s);
      comm.all_gather(t.rows_view(0, len), g);
      comm.all_reduce_sum(t);
      for (auto [v, x] : {std::pair{&reduced, t}, {&gathered, g}, {&scattered, s}}) {
        (*v)[size_t(r)].resize(size_t(x.numel()));
        be->download(x, (*v)[size_t(r)].data());
      }
    });
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(reduced[size_t(r)], reduced[0]) << n << " ranks: all-reduce results differ between ranks";
      for (int64_t i = 0; i < n * len; ++i) {
        double sum = 0;
        for (int q = 0; q < n; ++q) sum += in[size_t(q)][size_t(i)];
        ASSERT_NEAR(reduced[size_t(r)][size_t(i)], sum, 1e-5) << n << " ranks, element " << i;
        if (i / len == r) {
          ASSERT_NEAR(scattered[size_t(r)][size_t(i % len)], sum, 1e-5) << n << " ranks, " << i;
        }
      }
      for (int q = 0; q < n; ++q)
        for (int64_t i = 0; i < len; ++i)
          ASSERT_EQ(gathered[size_t(r)][size_t(q * len + i)], in[size_t(q)][size_t(i)]) << n << " ranks";
    }
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
