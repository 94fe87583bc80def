#pragma once
// One-shot all-reduce over peer memory for the small messages of decode (docs/ENGINE.md, "Small
// all-reduces for decode"): a decode step all-reduces T x 16 KiB twice per layer, where NCCL's
// latency per call, not bandwidth, is the cost. Each rank copies its rows into a buffer of its own
// that every peer reads directly, raises a flag, waits for its peers' flags and sums the ranks'
// buffers in rank order: one kernel a call, the same bytes on every rank.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include <cuda_runtime.h>

namespace dsv4 {

class PeerAllReduce {
 public:
  static constexpr int kMaxRanks = 8;
  // Messages up to this many bytes take the one-shot path (NCCL above: its ring is then faster).
  static constexpr size_t kMaxBytes = size_t(512) << 10;

  // A group of ranks on devices devs[r] (rank r is element r). Ranks may share a device: the tests
  // emulate a group on one GPU with one stream a rank. Empty when some pair of distinct devices has
  // no peer access, a setup step fails (logged), or DSV4_CUDA_PEER_ALLREDUCE=0.
  static std::vector<std::unique_ptr<PeerAllReduce>> make_group(const std::vector<int>& devs);
  ~PeerAllReduce();
  PeerAllReduce(const PeerAllReduce&) = delete;
  PeerAllReduce& operator=(const PeerAllReduce&) = delete;

  // data[0, n) = the sum over ranks of their data[0, n), in rank order, on `stream` of this rank's
  // device. Every rank makes the same calls in the same order (n * 4 <= kMaxBytes; not inside
  // graph capture); a call's kernel waits on the device until every rank's kernel of that call
  // has copied its rows (a rank missing for 20 s traps the kernel rather than hang).
  void all_reduce_sum(float* data, int64_t n, cudaStream_t stream);

 private:
  struct Shared;  // the group's buffers and flags, held by every rank's object
  PeerAllReduce(int rank, std::shared_ptr<Shared> shared) : rank_(rank), shared_(std::move(shared)) {}
  int rank_;
  std::shared_ptr<Shared> shared_;
  uint64_t calls_ = 0;  // this rank's calls so far: the epoch of its next flags
};

}  // namespace dsv4
