// MoE family: router (softmax / sigmoid / sqrt-softplus scores, bias-corrected top-k or hash
// table), grouping of token-expert assignments by expert, clamped SwiGLU and the weighted combine.
// The expert GEMMs themselves run through gemm() (linear.cu) with one problem per expert.
#include <cub/block/block_scan.cuh>

#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i) || (i < 0 && i2 >= 0)) {
    v = v2;
    i = i2;
  }
}

// Block per token; shared: score[E], biased[E], taken[E].
__global__ void route_kernel(RouteArgs a) {
  pdl_prologue();
  extern __shared__ float sm[];
  float* score = sm;
  float* biased = sm + a.E;
  int* taken = reinterpret_cast<int*>(sm + 2 * a.E);
  __shared__ float red[33];
  __shared__ float rv[32];
  __shared__ int ri[32];
  __shared__ int chosen[64];
  const int64_t t = blockIdx.x;
  const float* l = a.logits + t * a.E;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (a.scoring == 0) {
    float mx = -INFINITY;
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) mx = fmaxf(mx, l[e]);
    mx = block_max(mx, red);
    float s = 0.f;
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) s += (score[e] = expf(l[e] - mx));
    s = block_sum(s, red);
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) score[e] /= s;
  } else {
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) {
      const float x = l[e];
      score[e] = a.scoring == 1 ? 1.f / (1.f + expf(-x)) : sqrtf(x > 20.f ? x : log1pf(expf(x)));
    }
  }
  for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) taken[e] = 0;
  __syncthreads();
  if (a.tid2eid) {
    if (threadIdx.x < a.k) {
      const int64_t i = int64_t(a.tokens[t]) * a.k + threadIdx.x;
      chosen[threadIdx.x] = a.tid_i64 ? int(static_cast<const int64_t*>(a.tid2eid)[i])
                                      : static_cast<const int32_t*>(a.tid2eid)[i];
    }
  } else {
    for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x) biased[e] = score[e] + (a.bias.p ? vec_at(a.bias, e) : 0.f);
    __syncthreads();
    for (int64_t r = 0; r < a.k; ++r) {
      float v = -INFINITY;
      int i = -1;
      for (int64_t e = threadIdx.x; e < a.E; e += blockDim.x)
        if (!taken[e]) better(v, i, biased[e], int(e));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
      if (lane == 0) {
        rv[warp] = v;
        ri[warp] = i;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float bv = rv[0];
        int bi = ri[0];
        for (int w = 1; w < nw; ++w) better(bv, bi, rv[w], ri[w]);
        chosen[r] = bi;
        taken[bi] = 1;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int64_t i = 0; i < a.k; ++i) sum += score[chosen[i]];
    for (int64_t i = 0; i < a.k; ++i) {
      float g = score[chosen[i]];
      if (a.scoring != 0 && a.norm_topk) g /= (sum + 1e-20f);
      a.weights[t * a.k + i] = g * a.routed_scale;
      a.experts[t * a.k + i] = chosen[i];
    }
  }
}

__global__ void count_kernel(const int32_t* experts, int64_t n, int64_t first, int64_t E, int32_t* counts) {
  pdl_prologue();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = experts[i] - first;
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
}

// One block of kScanThreads: offsets = exclusive scan of counts, cursor = 0, active = the experts
// with tokens in ascending order (at most zmax, then -1), in chunks of kScanThreads experts (a
// serial loop over the 256 experts cost ~20 us per layer of a decode step). counts, offsets and
// cursor may be global or shared memory.
constexpr int kScanThreads = 256;
using ScanCounts = cub::BlockScan<int32_t, kScanThreads>;
__device__ void scan_counts(const int32_t* counts, int64_t E, int32_t* offsets, int32_t* cursor, int32_t* active,
                            int64_t zmax, ScanCounts::TempStorage& tmp) {
  int32_t rows_before = 0, active_before = 0;
  for (int64_t e0 = 0; e0 < E; e0 += kScanThreads) {
    const int64_t e = e0 + threadIdx.x;
    const int32_t c = e < E ? counts[e] : 0;
    int32_t off, rows, at, n_active;
    ScanCounts(tmp).ExclusiveSum(c, off, rows);
    __syncthreads();
    ScanCounts(tmp).ExclusiveSum(c > 0 ? 1 : 0, at, n_active);
    __syncthreads();
    if (e < E) {
      offsets[e] = rows_before + off;
      cursor[e] = 0;
      if (c > 0 && active_before + at < zmax) active[active_before + at] = int32_t(e);
    }
    rows_before += rows;
    active_before += n_active;
  }
  for (int64_t i = active_before + threadIdx.x; i < zmax; i += kScanThreads) active[i] = -1;
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(const int32_t* counts, int64_t E, int32_t* offsets,
                                                            int32_t* cursor, int32_t* active, int64_t zmax) {
  pdl_prologue();
  __shared__ ScanCounts::TempStorage tmp;
  scan_counts(counts, E, offsets, cursor, active, zmax, tmp);
}

// Assignment i (token i / k, its expert experts[i]): its row in the expert-sorted order (slot) and
// that row's token (perm). Assignments to another rank's experts get kRemoteSlot, invalid ids -1.
__device__ __forceinline__ void place_one(const int32_t* experts, int64_t i, int64_t k, int64_t first, int64_t E,
                                          int64_t total, const int32_t* offsets, int32_t* cursor, int32_t* perm,
                                          int32_t* slot) {
  const int32_t id = experts[i];
  const int64_t e = id - first;
  if (e < 0 || e >= E) {
    slot[i] = id >= 0 && id < total ? kRemoteSlot : -1;
    return;
  }
  const int32_t at = offsets[e] + atomicAdd(&cursor[e], 1);
  perm[at] = int32_t(i / k);
  slot[i] = at;
}

__global__ void place_kernel(const int32_t* experts, int64_t n, int64_t k, int64_t first, int64_t E, int64_t total,
                             const int32_t* offsets, int32_t* cursor, int32_t* perm, int32_t* slot) {
  pdl_prologue();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    place_one(experts, i, k, first, E, total, offsets, cursor, perm, slot);
}

// The whole grouping in one block when it is small (decode: a few hundred assignments): counts,
// scan and placement with the counts, offsets and cursors in shared memory, instead of a memset
// and three kernels (each a launch and a tail on a step's critical path).
constexpr int64_t kGroupOneBlockAssignments = 2048, kGroupOneBlockExperts = 1024;
__global__ void __launch_bounds__(kScanThreads) group_kernel(const int32_t* experts, int64_t n, int64_t k,
                                                             int64_t first, int64_t E, int64_t total, int32_t* counts,
                                                             int32_t* offsets, int32_t* perm, int32_t* slot,
                                                             int32_t* active, int64_t zmax) {
  pdl_prologue();
  __shared__ int32_t cnt[kGroupOneBlockExperts], off[kGroupOneBlockExperts], cur[kGroupOneBlockExperts];
  __shared__ ScanCounts::TempStorage tmp;
  for (int64_t e = threadIdx.x; e < E; e += kScanThreads) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += kScanThreads) {
    const int64_t e = experts[i] - first;
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  scan_counts(cnt, E, off, cur, active, zmax, tmp);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += kScanThreads) {
    counts[e] = cnt[e];
    offsets[e] = off[e];
  }
  for (int64_t i = threadIdx.x; i < n; i += kScanThreads) place_one(experts, i, k, first, E, total, off, cur, perm, slot);
}

__global__ void swiglu_kernel(float* h1, const float* h3, int64_t n, float limit) {
  pdl_prologue();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    h1[i] = swiglu_value(h1[i], h3[i], limit);
  }
}

// Thread (V adjacent channels c, token blockIdx.y + gridDim.y i; channel_launch): the token's k
// weighted expert rows summed in the CPU twin's order (assignments ascending), then the shared
// expert's output.
template <int V>
__global__ void combine_kernel(const float* Y, const int32_t* slot, const float* w, const float* shared, int64_t T,
                               int64_t k, int64_t D, float* out) {
  pdl_prologue();
  using Vec = ChannelVec<V>;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= D) return;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    float s[V];
#pragma unroll
    for (int e = 0; e < V; ++e) s[e] = 0.f;
#pragma unroll 8
    for (int64_t i = 0; i < k; ++i) {
      const int32_t r = slot[t * k + i];
      const float wi = w[t * k + i];
      float y[V];
      if (r >= 0) *reinterpret_cast<Vec*>(y) = *reinterpret_cast<const Vec*>(Y + int64_t(r) * D + c);
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] += r >= 0 ? wi * y[e] : r == kRemoteSlot ? 0.f : __int_as_float(0x7fc00000);
    }
    if (shared) {
      float sh[V];
      *reinterpret_cast<Vec*>(sh) = *reinterpret_cast<const Vec*>(shared + t * D + c);
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] += sh[e];
    }
    *reinterpret_cast<Vec*>(out + t * D + c) = *reinterpret_cast<const Vec*>(s);
  }
}

}  // namespace

void route(const RouteArgs& a, cudaStream_t s) {
  if (a.T <= 0) return;
  const size_t smem = size_t(3 * a.E) * 4;
  launch_pdl(route_kernel, unsigned(a.T), 256, smem, s, a);
  DSV4_LAUNCH_CHECK();
}

void moe_group(const int32_t* experts, int64_t T, int64_t k, int64_t first, int64_t E, int64_t total, int32_t* counts,
               int32_t* offsets, int32_t* cursor, int32_t* perm, int32_t* slot, int32_t* active, int64_t zmax,
               cudaStream_t s) {
  const int64_t n = T * k;
  if (n <= kGroupOneBlockAssignments && E <= kGroupOneBlockExperts) {
    launch_pdl(group_kernel, 1, kScanThreads, 0, s, experts, n, k, first, E, total, counts, offsets, perm, slot, active,
               zmax);
    DSV4_LAUNCH_CHECK();
    return;
  }
  cudaMemsetAsync(counts, 0, size_t(E) * 4, s);
  launch_pdl(count_kernel, blocks_for(n), 256, 0, s, experts, n, first, E, counts);
  launch_pdl(scan_kernel, 1, kScanThreads, 0, s, counts, E, offsets, cursor, active, zmax);
  launch_pdl(place_kernel, blocks_for(n), 256, 0, s, experts, n, k, first, E, total, offsets, cursor, perm, slot);
  DSV4_LAUNCH_CHECK();
}

void swiglu(float* h1, const float* h3, int64_t n, float limit, cudaStream_t s) {
  if (n <= 0) return;
  launch_pdl(swiglu_kernel, blocks_for(n), 256, 0, s, h1, h3, n, limit);
  DSV4_LAUNCH_CHECK();
}

void moe_combine(const float* Y, const int32_t* slot, const float* weights, const float* shared, int64_t T, int64_t k,
                 int64_t D, float* out, cudaStream_t s) {
  if (T * D <= 0) return;
  const ChannelLaunch l = channel_launch(T, D, {Y, shared, out});
  l.by4 ? launch_pdl(combine_kernel<4>, l.grid, 256, 0, s, Y, slot, weights, shared, T, k, D, out)
        : launch_pdl(combine_kernel<1>, l.grid, 256, 0, s, Y, slot, weights, shared, T, k, D, out);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
