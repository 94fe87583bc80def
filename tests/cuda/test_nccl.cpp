// The NCCL communicator and the sharded forward pass on GPUs: one rank per device, one thread per
// rank (docs/ENGINE.md, "Several GPUs"). A single GPU runs the group of one; the sharded forward
// needs two devices or more (skipped otherwise). The one-shot all-reduce over peer memory runs its
// protocol on a group emulated on one device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include "backend/cuda/nccl_communicator.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/peer_allreduce.h"
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

// The one-shot all-reduce's protocol (flags, alternating buffers, slices per block, rank-order
// sums) for groups of 2..4 ranks emulated on one device, one stream a rank. All calls are queued
// back to back (one input buffer a call), so ranks run up to a call apart and a buffer reused
// before every peer has read it, a wrong parity or a missing wait shows as a wrong sum: every
// rank's result must equal the rank-order float sum bit for bit, over sizes that change the
// slicing from call to call.
TEST(PeerAllReduce, EmulatedGroupSumsInRankOrder) {
  DSV4_REQUIRE_GPU();
  const std::vector<int64_t> sizes{1, 4096, 4097, 131072, 3, 20000, 131072, 777, 65536, 5000, 1, 131071};
  int sms = 0, threads_per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0);
  for (int n = 2; n <= 4; ++n) {
    // Every rank's kernel of a call must be resident at once (32 blocks of 512 threads each).
    if (int64_t(sms) * (threads_per_sm / 512) < int64_t(n) * cuda::kPeerMaxBlocks)
      GTEST_SKIP() << "too few SMs to hold " << n << " emulated ranks' kernels at once";
    auto group = PeerAllReduce::make_group(std::vector<int>(static_cast<size_t>(n), 0));
    if (group.empty()) GTEST_SKIP() << "DSV4_CUDA_PEER_ALLREDUCE=0";
    ASSERT_EQ(group.size(), size_t(n));
    std::vector<cudaStream_t> streams(static_cast<size_t>(n));
    for (auto& st : streams) ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    const size_t calls = 2 * sizes.size();
    std::vector<std::vector<std::vector<float>>> in(calls);  // [call][rank]
    std::vector<std::vector<float*>> data(calls, std::vector<float*>(static_cast<size_t>(n)));
    uint64_t seed = 700 + uint64_t(n);
    for (size_t c = 0; c < calls; ++c) {
      const int64_t len = sizes[c % sizes.size()];
      for (int r = 0; r < n; ++r) {
        in[c].push_back(normal(len, ++seed));
        ASSERT_EQ(cudaMalloc(&data[c][size_t(r)], size_t(len) * 4), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(data[c][size_t(r)], in[c][size_t(r)].data(), size_t(len) * 4, cudaMemcpyHostToDevice),
                  cudaSuccess);
      }
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // inputs landed before any rank's stream starts
    for (size_t c = 0; c < calls; ++c)
      for (int r = 0; r < n; ++r)
        group[size_t(r)]->all_reduce_sum(data[c][size_t(r)], sizes[c % sizes.size()], streams[size_t(r)]);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (size_t c = 0; c < calls; ++c) {
      const int64_t len = sizes[c % sizes.size()];
      std::vector<float> want(static_cast<size_t>(len));
      for (int64_t i = 0; i < len; ++i) {
        float s = in[c][0][size_t(i)];
        for (int r = 1; r < n; ++r) s += in[c][size_t(r)][size_t(i)];
        want[size_t(i)] = s;
      }
      for (int r = 0; r < n; ++r) {
        std::vector<float> got(static_cast<size_t>(len));
        ASSERT_EQ(cudaMemcpy(got.data(), data[c][size_t(r)], size_t(len) * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        int64_t wrong = 0;
        for (int64_t i = 0; i < len; ++i) wrong += got[size_t(i)] != want[size_t(i)];
        EXPECT_EQ(wrong, 0) << "ranks " << n << " rank " << r << " call " << c << " len " << len;
        cudaFree(data[c][size_t(r)]);
      }
    }
    for (auto st : streams) cudaStreamDestroy(st);
  }
}

// Calls beyond the one-shot buffers are refused with the sizes named (the communicator sends
// them to NCCL instead).
TEST(PeerAllReduce, OversizedCallIsRefused) {
  DSV4_REQUIRE_GPU();
  auto group = PeerAllReduce::make_group({0, 0});
  if (group.empty()) GTEST_SKIP() << "DSV4_CUDA_PEER_ALLREDUCE=0";
  const int64_t n = int64_t(PeerAllReduce::kMaxBytes / 4) + 1;
  try {
    group[0]->all_reduce_sum(nullptr, n, nullptr);
    FAIL() << "an oversized call ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(n)), std::string::npos) << e.what();
  }
}
