#include "backend/cuda/nccl_communicator.h"

#include <cstdlib>
#include <numeric>

#include <cuda_runtime.h>
#include <nccl.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/peer_allreduce.h"
#include "util/error.h"

namespace dsv4 {

namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail("NCCL {}: {}", what, ncclGetErrorString(r));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, std::unique_ptr<PeerAllReduce> peer)
      : comm_(comm), rank_(rank), size_(size), peer_(std::move(peer)) {}
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void bind(cudaStream_t s) { stream_ = s; }

  // Small messages (decode) take the one-shot kernel over peer memory where the group has one;
  // every rank decides from the same size, so all take the same path.
  void all_reduce_sum(const Tensor& t) override {
    if (peer_ && size_t(t.numel()) * sizeof(float) <= PeerAllReduce::kMaxBytes) {
      peer_->all_reduce_sum(t.f32(), t.numel(), stream());
      return;
    }
    check_nccl(ncclAllReduce(t.f32(), t.f32(), size_t(t.numel()), ncclFloat, ncclSum, comm_, stream()), "all-reduce");
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    DSV4_CHECK(out.numel() == in.numel() * size_);
    check_nccl(ncclAllGather(in.f32(), out.f32(), size_t(in.numel()), ncclFloat, comm_, stream()), "all-gather");
  }
  void reduce_scatter_sum(const Tensor& in, const Tensor& out) override {
    DSV4_CHECK(in.numel() == out.numel() * size_);
    check_nccl(ncclReduceScatter(in.f32(), out.f32(), size_t(out.numel()), ncclFloat, ncclSum, comm_, stream()),
               "reduce-scatter");
  }

 private:
  cudaStream_t stream() const {
    if (!stream_) fail("NCCL rank {}: no stream bound (nccl_bind_stream)", rank_);
    return stream_;
  }
  ncclComm_t comm_;
  int rank_, size_;
  std::unique_ptr<PeerAllReduce> peer_;  // null: NCCL for every size
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_nccl_group(int n) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (n > devices) fail("--tp/--ep: {} ranks need {} GPUs, {} visible", n, n, devices);
  // Multicast over NVLink needs fabric-manager support that the machines here do not lend.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  std::vector<ncclComm_t> comms(static_cast<size_t>(n));
  std::vector<int> devs(static_cast<size_t>(n));
  std::iota(devs.begin(), devs.end(), 0);
  check_nccl(ncclCommInitAll(comms.data(), n, devs.data()), "init");
  auto peers = PeerAllReduce::make_group(devs);  // empty without peer access between every pair
  std::vector<std::unique_ptr<Communicator>> v;
  for (int r = 0; r < n; ++r)
    v.push_back(std::make_unique<NcclCommunicator>(comms[size_t(r)], r, n,
                                                   peers.empty() ? nullptr : std::move(peers[size_t(r)])));
  return v;
}

void nccl_bind_stream(Communicator& c, Backend& be) {
  auto* nc = dynamic_cast<NcclCommunicator*>(&c);
  if (!nc) fail("nccl_bind_stream: not an NCCL communicator");
  if (cuda_device(be) != c.rank()) fail("nccl_bind_stream: rank {} with the backend of device {}", c.rank(), cuda_device(be));
  nc->bind(static_cast<cudaStream_t>(cuda_stream(be)));
}

}  // namespace dsv4
