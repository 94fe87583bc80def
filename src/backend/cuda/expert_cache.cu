// Expert cache: the routed experts of host-resident layers are copied into device slots (LRU over
// a fixed pool) right after the router picks them, so the expert GEMMs read HBM, and only the
// experts a pass needs and the pool lacks cross the bus. The plan and the copies run on the
// device from the router's output: no host synchronisation, CUDA graphs keep working.
#include <cub/block/block_radix_sort.cuh>

#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kPlanThreads = 256;

// One block. Stamps are pass numbers; a slot's LRU key is its age (this pass minus its stamp,
// modulo 2^32: the 32-bit counter may wrap), inverted so that the oldest sorts first, with empty
// slots first of all and this pass's hits (a shared bitmap) last: the misses take the first
// S - hits slots of the sorted order, never one this pass needs.
template <int kItems>
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(ExpertCacheArgs a) {
  pdl_prologue();
  using Sort = cub::BlockRadixSort<uint32_t, kPlanThreads, kItems, int32_t>;
  __shared__ typename Sort::TempStorage sort_tmp;
  __shared__ uint32_t hit_bits[kExpertCacheMaxSlots / 32];
  __shared__ uint32_t tick;
  __shared__ int n_miss, n_hit;
  if (threadIdx.x == 0) {
    tick = *a.tick + 1;
    *a.tick = tick;
    n_miss = n_hit = 0;
  }
  for (int i = threadIdx.x; i < (a.S + 31) / 32; i += kPlanThreads) hit_bits[i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.zmax; i += kPlanThreads) {
    const int32_t e = a.active[i];
    const bool mine = e >= 0 && i >= a.lo && i < a.hi;
    a.zmap[i] = mine ? e : -1;
    if (!mine) continue;
    const int32_t s = a.map[e];
    if (s >= 0) {
      a.stamp[s] = tick;
      atomicOr(&hit_bits[s >> 5], 1u << (s & 31));
      atomicAdd(&n_hit, 1);
    } else {
      const int m = atomicAdd(&n_miss, 1);
      if (m < a.S) a.job_expert[m] = e;  // beyond S: counted as overflow below
    }
  }
  __syncthreads();
  if (n_miss == 0) {
    if (threadIdx.x == 0) {
      *a.n_jobs = 0;
      atomicAdd(&a.stats[0], (unsigned long long)n_hit);
    }
    return;
  }
  uint32_t keys[kItems];
  int32_t slots[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int s = threadIdx.x * kItems + j;
    if (s >= a.S || ((hit_bits[s >> 5] >> (s & 31)) & 1u)) keys[j] = 0xffffffffu;  // padding, hits: last
    else if (!a.owner[s]) keys[j] = 0;                                           // empty: first
    else keys[j] = min(~(tick - a.stamp[s]), 0xfffffffeu);                      // oldest first
    slots[j] = s;
  }
  Sort(sort_tmp).Sort(keys, slots);  // blocked: thread t holds ranks t*kItems ..
#pragma unroll
  for (int j = 0; j < kItems; ++j)
    if (threadIdx.x * kItems + j < a.S) a.order[threadIdx.x * kItems + j] = slots[j];
  __syncthreads();
  const int free_slots = a.S - n_hit;
  for (int i = threadIdx.x; i < n_miss; i += kPlanThreads) {
    if (i >= free_slots) {  // more experts than slots: the host sized the pass wrong
      atomicAdd(&a.stats[2], 1ull);
      continue;
    }
    const int32_t s = a.order[i], e = a.job_expert[i];
    if (int32_t* prev = a.owner[s]) *prev = -1;
    a.owner[s] = a.map + e;
    a.map[e] = s;
    a.stamp[s] = tick;
    uint8_t* base = a.slots + int64_t(s) * a.layout.slot_bytes;
    for (int part = 0; part < 3; ++part) {
      WeightDesc d = a.home[int64_t(part) * a.E + e];
      d.w = base + a.layout.off[2 * part];
      if (a.layout.bytes[2 * part + 1]) d.s = base + a.layout.off[2 * part + 1];
      a.live[int64_t(part) * a.E + e] = d;
    }
    a.job_slot[i] = s;
  }
  if (threadIdx.x == 0) {
    *a.n_jobs = min(n_miss, free_slots);
    atomicAdd(&a.stats[0], (unsigned long long)n_hit);
    atomicAdd(&a.stats[1], (unsigned long long)n_miss);
  }
}

// Pieces of kPiece bytes of every part of every job, one per block iteration; each thread keeps
// kUnroll 16-byte loads in flight (the bus needs ~0.3 MB in flight per microsecond of latency).
constexpr int kCopyThreads = 256, kUnroll = 4;
constexpr int64_t kPiece = int64_t(kCopyThreads) * 16 * kUnroll * 4;  // 64 KiB

__global__ void __launch_bounds__(kCopyThreads) copy_kernel(ExpertCacheArgs a, int64_t pieces_per_job) {
  pdl_wait();
  const int64_t n = int64_t(*a.n_jobs) * pieces_per_job;
  for (int64_t task = blockIdx.x; task < n; task += gridDim.x) {
    const int64_t job = task / pieces_per_job;
    int64_t piece = task % pieces_per_job;
    int part = 0;
    for (; part < 6; ++part) {
      const int64_t p = (a.layout.bytes[part] + kPiece - 1) / kPiece;
      if (piece < p) break;
      piece -= p;
    }
    const int32_t e = a.job_expert[job];
    const WeightDesc& h = a.home[int64_t(part / 2) * a.E + e];
    const uint8_t* src = (part % 2 ? h.s : h.w) + piece * kPiece;
    uint8_t* dst = a.slots + int64_t(a.job_slot[job]) * a.layout.slot_bytes + a.layout.off[part] + piece * kPiece;
    const int64_t len = min(kPiece, a.layout.bytes[part] - piece * kPiece), vec = len / 16;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int64_t v0 = threadIdx.x; v0 < vec; v0 += int64_t(kCopyThreads) * kUnroll) {
      uint4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kCopyThreads;
        if (v < vec) r[u] = s4[v];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t(u) * kCopyThreads;
        if (v < vec) d4[v] = r[u];
      }
    }
    for (int64_t b = vec * 16 + threadIdx.x; b < len; b += kCopyThreads) dst[b] = src[b];
  }
  pdl_trigger();
}

}  // namespace

void expert_cache_fetch(const ExpertCacheArgs& a, cudaStream_t s) {
  if (a.zmax <= 0) return;
  if (a.S < 1 || a.S > kExpertCacheMaxSlots) {
    std::fprintf(stderr, "expert cache: %d slots (1..%lld)\n", a.S, (long long)kExpertCacheMaxSlots);
    std::abort();
  }
  if (a.S <= kPlanThreads) launch_pdl(plan_kernel<1>, 1, kPlanThreads, 0, s, a);
  else if (a.S <= 2 * kPlanThreads) launch_pdl(plan_kernel<2>, 1, kPlanThreads, 0, s, a);
  else if (a.S <= 4 * kPlanThreads) launch_pdl(plan_kernel<4>, 1, kPlanThreads, 0, s, a);
  else if (a.S <= 8 * kPlanThreads) launch_pdl(plan_kernel<8>, 1, kPlanThreads, 0, s, a);
  else launch_pdl(plan_kernel<16>, 1, kPlanThreads, 0, s, a);
  int64_t pieces = 0;
  for (int64_t b : a.layout.bytes) pieces += (b + kPiece - 1) / kPiece;
  launch_pdl(copy_kernel, unsigned(2 * sm_count()), kCopyThreads, 0, s, a, pieces);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
