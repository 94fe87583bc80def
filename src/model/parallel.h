#pragma once
// Tensor and expert parallelism (docs/ENGINE.md, "Several GPUs"): how the weights of one model are
// split over the ranks of a group, and which ranks compute what.
//
// A group has world = max(tp, ep) ranks; tp and ep are each 1 or the world size.
//  * tp > 1: every attention layer's heads are split (wq_b rows, the sinks, wo_a's output groups
//    and wo_b's input columns: 64 heads / tp, 8 groups / tp); the ranks' wo_b outputs are partial
//    sums, added by one all-reduce. Everything else of attention (wq_a, wkv, compressors,
//    indexer) and the whole per-sequence state is replicated: V4 has one shared key/value head.
//  * ep > 1: the routed experts are split by expert (256 / ep, rank r holds [r * 256 / ep, ...));
//    every rank routes every token (the router is replicated) and runs the assignments of its
//    own experts, so dispatch needs no communication.
//  * ep = 1 < tp: every routed expert is split along its intermediate dimension instead.
//  * world > 1: the shared expert is split along its intermediate dimension, and the routed and
//    shared outputs of all ranks are added by one all-reduce (the combine).
// Norms, mHC, router, embedding and head are replicated. TP = EP = 1 is the unsharded model.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

struct ParallelConfig {
  int tp = 1, ep = 1;
  int world() const { return tp > ep ? tp : ep; }
};

// Throws an Error naming --tp or --ep when this model cannot be split so.
void check_parallel(const ModelConfig& cfg, const ParallelConfig& par);

// Rank `rank`'s share of the weights. Row slices are views of the full tensors (of the mmapped
// checkpoint: only the shard's pages are ever read); column slices (wo_b, expert w2) are copied
// out row by row. With materialize = false the copies are not made (their data is null): the
// shard then only describes shapes and bytes (`dsv4 inspect --tp`).
class WeightShard {
 public:
  WeightShard(const ModelConfig& cfg, const ModelWeights& full, const ParallelConfig& par, int rank,
              bool materialize = true);
  WeightShard(const WeightShard&) = delete;
  WeightShard& operator=(const WeightShard&) = delete;
  const ModelWeights& weights() const { return w_; }
  // Stored bytes of the shard's distinct tensors (scales included).
  int64_t bytes() const;

 private:
  TensorData& view_rows(const TensorData& t, int64_t r0, int64_t r1);
  TensorData& copy_cols(const TensorData& t, int64_t c0, int64_t c1);
  Linear slice_rows(const Linear& l, int64_t r0, int64_t r1, const char* flag);
  Linear slice_cols(const Linear& l, int64_t c0, int64_t c1, const char* flag);
  void shard_block(BlockWeights& b);

  const ModelConfig& cfg_;
  ParallelConfig par_;
  int rank_;
  bool materialize_;
  std::deque<TensorData> tensors_;
  std::deque<std::vector<uint8_t>> owned_;
  ModelWeights w_;
};

// The threads of an in-process group: rank 0 is the caller's thread, ranks 1..n-1 each have a
// thread of their own for the group's lifetime (a CUDA device is current per thread, so a rank's
// backend is created and called on its thread). run(fn) calls fn(r) for every rank at once and
// returns when all have finished, rethrowing the first error. The ranks' collectives meet each other, so fn must
// make the same collective calls on every rank (a rank that throws half-way leaves the others
// waiting: validate before the first collective, as Model::plan does).
class RankThreads {
 public:
  explicit RankThreads(int n);
  ~RankThreads();
  RankThreads(const RankThreads&) = delete;
  RankThreads& operator=(const RankThreads&) = delete;
  int size() const { return int(threads_.size()) + 1; }
  void run(const std::function<void(int)>& fn);

 private:
  void work(int rank);

  std::mutex mu_;
  std::condition_variable start_, finished_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::exception_ptr> errors_;
  std::vector<std::thread> threads_;
};

}  // namespace dsv4
