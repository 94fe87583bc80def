#include "backend/cuda/peer_allreduce.h"

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include "backend/cuda/kernels.h"
#include "util/error.h"

namespace dsv4 {

static_assert(PeerAllReduce::kMaxRanks == cuda::kPeerMaxRanks);

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("PeerAllReduce: {}: {}", what, cudaGetErrorString(e));
}

}  // namespace

struct PeerAllReduce::Shared {
  std::vector<int> devs;
  std::vector<float*> bufs;      // rank r: 2 x kMaxBytes on devs[r]
  std::vector<uint64_t*> flags;  // rank r: cuda::kPeerMaxBlocks on devs[r]
  ~Shared() {
    int cur = 0;
    cudaGetDevice(&cur);
    for (size_t r = 0; r < devs.size(); ++r) {
      cudaSetDevice(devs[r]);
      if (r < bufs.size()) cudaFree(bufs[r]);
      if (r < flags.size()) cudaFree(flags[r]);
    }
    cudaSetDevice(cur);
  }
};

std::vector<std::unique_ptr<PeerAllReduce>> PeerAllReduce::make_group(const std::vector<int>& devs) {
  const int n = int(devs.size());
  const char* env = std::getenv("DSV4_CUDA_PEER_ALLREDUCE");
  if (n < 2 || n > kMaxRanks || (env && std::string_view(env) == "0")) return {};
  for (int a : devs)
    for (int b : devs) {
      int ok = 0;
      if (a != b && (cudaDeviceCanAccessPeer(&ok, a, b) != cudaSuccess || !ok)) return {};
    }
  int cur = 0;
  check_cuda(cudaGetDevice(&cur), "current device");
  auto shared = std::make_shared<Shared>();
  shared->devs = devs;
  for (int r = 0; r < n; ++r) {
    const int dev = devs[size_t(r)];
    check_cuda(cudaSetDevice(dev), "set device");
    for (int b : devs) {
      if (b == dev) continue;
      const cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();  // enabled by an earlier group
      else check_cuda(e, "enable peer access");
    }
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, 2 * kMaxBytes), "buffers");
    shared->bufs.push_back(static_cast<float*>(p));
    check_cuda(cudaMalloc(&p, cuda::kPeerMaxBlocks * sizeof(uint64_t)), "flags");
    shared->flags.push_back(static_cast<uint64_t*>(p));
    check_cuda(cudaMemset(p, 0, cuda::kPeerMaxBlocks * sizeof(uint64_t)), "flags");
  }
  check_cuda(cudaSetDevice(cur), "set device");
  std::vector<std::unique_ptr<PeerAllReduce>> group;
  for (int r = 0; r < n; ++r) group.push_back(std::unique_ptr<PeerAllReduce>(new PeerAllReduce(r, shared)));
  return group;
}

PeerAllReduce::~PeerAllReduce() = default;

void PeerAllReduce::all_reduce_sum(float* data, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (size_t(n) * sizeof(float) > kMaxBytes) fail("PeerAllReduce: {} floats exceed the one-shot buffers ({} bytes)", n, kMaxBytes);
  cuda::PeerAllReduceArgs a;
  a.rank = rank_;
  a.size = int(shared_->devs.size());
  a.epoch = ++calls_;
  for (int q = 0; q < a.size; ++q) {
    a.buf[q][0] = shared_->bufs[size_t(q)];
    a.buf[q][1] = shared_->bufs[size_t(q)] + kMaxBytes / sizeof(float);
    a.flag[q] = shared_->flags[size_t(q)];
  }
  cuda::peer_all_reduce(a, data, n, stream);
}

}  // namespace dsv4
