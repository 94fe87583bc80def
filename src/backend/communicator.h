#pragma once
// Collectives between the ranks of a tensor/expert-parallel group (docs/ENGINE.md, "Several GPUs").
// Every rank calls the same collectives in the same order, each from its own thread, on tensors of
// its own backend (F32, contiguous). Results are identical on every rank (the sum is taken in one
// fixed order), so ranks that compute replicated values from them stay bit-identical.
#include <memory>
#include <vector>

#include "backend/tensor.h"

namespace dsv4 {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // t = sum over ranks of t, in place.
  virtual void all_reduce_sum(const Tensor& t) = 0;
  // out [size * n] = the ranks' in [n], in rank order.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // out [n] = block `rank` ([rank * n, (rank + 1) * n)) of the sum over ranks of in [size * n].
  virtual void reduce_scatter_sum(const Tensor& in, const Tensor& out) = 0;
};

// An in-process group of `size` ranks over threads and host memory (the CPU backend): rank r of
// the group is element r. Collectives meet at a barrier; a rank that stops calling them (an
// exception) leaves the others waiting, so callers run every rank to completion or abort all.
std::vector<std::unique_ptr<Communicator>> make_thread_group(int size);

}  // namespace dsv4
