// The one-shot all-reduce kernel (PeerAllReduce, peer_allreduce.h).
#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kPeerThreads = 512;
constexpr int64_t kPeerFloatsPerBlock = 4096;

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// A peer that never arrives (its rank failed mid-step) ends in a trap, an error on this device
// that surfaces at the next synchronisation, instead of a hang.
constexpr uint64_t kPeerTimeoutNs = 20'000'000'000ull;

// Block b: its slice of data into this rank's buffer of the call's parity, then its flag (the
// block's barrier orders every thread's copies before thread 0's system-scope release); once
// every rank's flag b holds this epoch, the slice's sum over the ranks' buffers in rank order.
// A buffer is written again two calls later, when every peer has finished this call: a rank's
// next call waits for every peer's flag of that call, raised only after the peer's kernel of
// this call completed (each kernel waits for its predecessor, pdl_wait, and never lets its own
// successor start early).
__global__ void peer_all_reduce_kernel(PeerAllReduceArgs a, float* data, int64_t n) {
  pdl_wait();  // data is the previous kernel's output
  const int64_t per = (n + gridDim.x - 1) / gridDim.x;
  const int64_t lo = int64_t(blockIdx.x) * per, hi = lo + per < n ? lo + per : n;
  const int parity = int(a.epoch & 1);
  float* mine = a.buf[a.rank][parity];
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) mine[i] = data[i];
  __syncthreads();
  if (threadIdx.x == 0) store_release_sys(&a.flag[a.rank][blockIdx.x], a.epoch);
  if (int(threadIdx.x) < a.size) {
    const uint64_t* f = &a.flag[threadIdx.x][blockIdx.x];
    const uint64_t t0 = global_ns();
    while (load_acquire_sys(f) < a.epoch)
      if (global_ns() - t0 > kPeerTimeoutNs) __trap();
  }
  __syncthreads();
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float s = __ldcv(a.buf[0][parity] + i);  // uncached: a peer rewrites these lines every other call
    for (int q = 1; q < a.size; ++q) s += __ldcv(a.buf[q][parity] + i);
    data[i] = s;
  }
}

}  // namespace

void peer_all_reduce(const PeerAllReduceArgs& a, float* data, int64_t n, cudaStream_t s) {
  const int blocks = int(std::clamp<int64_t>((n + kPeerFloatsPerBlock - 1) / kPeerFloatsPerBlock, 1, kPeerMaxBlocks));
  launch_pdl(peer_all_reduce_kernel, dim3(unsigned(blocks)), kPeerThreads, 0, s, a, data, n);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
