#include "backend/cuda/peer_allreduce.h"

#include <algorithm>

#include "backend/cuda/kernels.h"
#include "util/env.h"
#include "util/error.h"
#include "util/log.h"

namespace dsv4 {

static_assert(PeerAllReduce::kMaxRanks == cuda::kPeerMaxRanks);

namespace {

// Restores the calling thread's current device on every way out.
class DeviceGuard {
 public:
  DeviceGuard() { cudaGetDevice(&dev_); }
  ~DeviceGuard() { cudaSetDevice(dev_); }

 private:
  int dev_ = 0;
};

}  // namespace

struct PeerAllReduce::Shared {
  std::vector<int> devs;
  std::vector<float*> bufs;      // rank r: 2 x kMaxBytes on devs[r]
  std::vector<uint64_t*> flags;  // rank r: cuda::kPeerMaxBlocks on devs[r]
  ~Shared() {
    DeviceGuard guard;
    for (size_t r = 0; r < devs.size(); ++r) {
      cudaSetDevice(devs[r]);
      if (r < bufs.size()) cudaFree(bufs[r]);
      if (r < flags.size()) cudaFree(flags[r]);
    }
    cudaGetLastError();  // a failed free must not surface as a later launch's error
  }
};

std::vector<std::unique_ptr<PeerAllReduce>> PeerAllReduce::make_group(const std::vector<int>& devs) {
  const int n = int(devs.size());
  if (n < 2 || n > kMaxRanks || !env_flag_default_on("DSV4_CUDA_PEER_ALLREDUCE")) return {};
  DeviceGuard guard;
  // Any failure leaves NCCL for every size: the group is an optimisation, never a requirement.
  auto fallback = [](const char* what, cudaError_t e) {
    cudaGetLastError();
    log_info("one-shot all-reduce off ({}: {}); NCCL takes every all-reduce", what, cudaGetErrorString(e));
    return std::vector<std::unique_ptr<PeerAllReduce>>{};
  };
  for (int a : devs)
    for (int b : devs) {
      int ok = 0;
      if (a == b) continue;
      if (const cudaError_t e = cudaDeviceCanAccessPeer(&ok, a, b); e != cudaSuccess) return fallback("peer query", e);
      if (!ok) return {};  // no peer access between two of the GPUs (e.g. across PCIe roots)
    }
  auto shared = std::make_shared<Shared>();
  shared->devs = devs;
  for (int r = 0; r < n; ++r) {
    const int dev = devs[size_t(r)];
    if (const cudaError_t e = cudaSetDevice(dev); e != cudaSuccess) return fallback("set device", e);
    for (int b : devs) {
      if (b == dev) continue;
      const cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();  // enabled by an earlier group
      else if (e != cudaSuccess) return fallback("enable peer access", e);
    }
    void* p = nullptr;
    if (const cudaError_t e = cudaMalloc(&p, 2 * kMaxBytes); e != cudaSuccess) return fallback("buffers", e);
    shared->bufs.push_back(static_cast<float*>(p));
    if (const cudaError_t e = cudaMalloc(&p, cuda::kPeerMaxBlocks * sizeof(uint64_t)); e != cudaSuccess)
      return fallback("flags", e);
    shared->flags.push_back(static_cast<uint64_t*>(p));
    // Zero flags (memory may hold an earlier group's call numbers), landed before any rank's
    // first call on whatever stream it uses.
    if (const cudaError_t e = cudaMemset(p, 0, cuda::kPeerMaxBlocks * sizeof(uint64_t)); e != cudaSuccess)
      return fallback("flags", e);
    if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return fallback("flags", e);
  }
  std::vector<std::unique_ptr<PeerAllReduce>> group;
  for (int r = 0; r < n; ++r) group.push_back(std::unique_ptr<PeerAllReduce>(new PeerAllReduce(r, shared)));
  return group;
}

PeerAllReduce::~PeerAllReduce() = default;

void PeerAllReduce::all_reduce_sum(float* data, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (size_t(n) * sizeof(float) > kMaxBytes) fail("PeerAllReduce: {} floats exceed the one-shot buffers ({} bytes)", n, kMaxBytes);
  // Call numbers come from the host: a captured call would replay a stale one and sum old rows.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture != cudaStreamCaptureStatusNone)
    fail("PeerAllReduce: an all-reduce inside CUDA graph capture (grouped steps run without graphs)");
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
