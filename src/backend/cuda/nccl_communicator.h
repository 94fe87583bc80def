#pragma once
// NCCL collectives for an in-process tensor/expert-parallel group: one GPU and one thread per
// rank (docs/ENGINE.md, "Several GPUs"). NCCL's own environment variables apply; NVLink
// multicast (NVLS) is off unless NCCL_NVLS_ENABLE is set. All-reduces up to
// PeerAllReduce::kMaxBytes take the one-shot kernel over peer memory where every pair of the
// group's GPUs has peer access (DSV4_CUDA_PEER_ALLREDUCE=0: NCCL always).
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"

namespace dsv4 {

// Ranks 0..n-1 on devices 0..n-1 (CUDA_VISIBLE_DEVICES picks them); element r is rank r.
std::vector<std::unique_ptr<Communicator>> make_nccl_group(int n);
// Rank c's collectives run on the stream of `be` (its device's CUDA backend), so they are ordered
// with the ops around them without a host synchronisation. Call before the first collective.
void nccl_bind_stream(Communicator& c, Backend& be);

}  // namespace dsv4
