// Sampling (Backend::sample): one block per logits row, no sort and no scratch memory.
// Greedy is one argmax pass. Otherwise the probabilities are computed in double like the host
// definition (backend/sampling.cpp) and recomputed in each pass rather than stored. The top-k
// and top-p cutoffs come from radix selection over the order-preserving bits of the logit
// (equal logits: lower id first), counting tokens for top-k and summing probability mass for
// top-p in 64-bit fixed point, which is exact, so the levels of the selection agree with each
// other whatever the summation order. min-p is a threshold; the draw is a block-wide scan of
// the kept probabilities in id order.
#include <climits>

#include <cub/block/block_scan.cuh>

#include "backend/cuda/common.cuh"
#include "backend/sampling.h"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;
constexpr int kIlp = 4;  // elements per thread per loop step: loads in flight
constexpr int kDigit = 8, kBuckets = 1 << kDigit;
// Probability 1 in fixed point. Every weight is <= 2^62 and a set's weights sum to ~2^62.
constexpr double kFixOne = 0x1.0p62;
constexpr unsigned kFull = 0xffffffffu;

using u64 = unsigned long long;

// Larger logit, larger key; -0 becomes +0 (equal on the host). Key 0 is a NaN's: below all logits.
__device__ __forceinline__ uint32_t logit_key(float v) {
  const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_logit(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ u64 fixed(double p) { return u64(p * kFixOne); }

// The tokens still in play: every key above `key`, plus the first `rank` tokens in id order whose
// key equals `key`. The default keeps everything.
struct Cut {
  uint32_t key = 0;
  int rank = 0;
};

struct Smem {
  cub::BlockScan<int, kThreads>::TempStorage iscan;
  cub::BlockScan<double, kThreads>::TempStorage dscan;
  unsigned count[kBuckets];
  u64 mass[kBuckets];
  double rd[kWarps];
  float rf[kWarps];
  int ri[kWarps];
  int sel;   // radix selection: the chosen bucket (-1: none)
  u64 need;  // weight still to be reached inside it
};

struct Row {
  const float* z;
  int V;
  double T, mx, S;
  // As filtered_probs computes it: exp(z / T - max) / sum.
  __device__ __forceinline__ double prob(float v) const { return exp(double(v) / T - mx) / S; }
};

// f(i, z[i]) for every id of the row, in steps of kThreads * kIlp; every thread makes the same
// number of calls (i >= V past the end) so that f may use warp collectives.
template <class F>
__device__ __forceinline__ void for_row(const Row& row, F&& f) {
  for (int base = 0; base < row.V; base += kThreads * kIlp) {
    float v[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int i = base + j * kThreads + int(threadIdx.x);
      v[j] = i < row.V ? __ldg(row.z + i) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) f(base + j * kThreads + int(threadIdx.x), v[j]);
  }
}

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Every thread gets the same result (one fixed combination order).
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();  // red is free again
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, red[w]);
  return r;
}

// The largest value, ties to the lowest id; every thread gets it.
__device__ __forceinline__ void block_argmax(float& v, int& id, Smem& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, id, o);
    if (ov > v || (ov == v && oi < id)) {
      v = ov;
      id = oi;
    }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    s.rf[threadIdx.x >> 5] = v;
    s.ri[threadIdx.x >> 5] = id;
  }
  __syncthreads();
  v = s.rf[0];
  id = s.ri[0];
  for (int w = 1; w < kWarps; ++w)
    if (s.rf[w] > v || (s.rf[w] == v && s.ri[w] < id)) {
      v = s.rf[w];
      id = s.ri[w];
    }
}

// Adds one token (bucket b, weight m) to the shared histogram; b < 0: nothing. Whole warps call
// it together. The leading digit of float keys takes few values, so lanes often share a bucket:
// when a warp holds at most 4 distinct buckets, each group is summed with shuffles and added
// by one lane instead of colliding on one shared address.
template <bool MASS>
__device__ __forceinline__ void hist_add(unsigned* count, u64* mass, int b, u64 m) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned peers = __match_any_sync(kFull, b);
  const bool leader = b >= 0 && lane == unsigned(__ffs(peers) - 1);
  const unsigned leaders = __ballot_sync(kFull, leader);
  if (__popc(leaders) > 4) {
    if (b >= 0) {
      atomicAdd(&count[b], 1u);
      if constexpr (MASS) atomicAdd(&mass[b], m);
    }
    return;
  }
  if constexpr (!MASS) {
    if (leader) atomicAdd(&count[b], unsigned(__popc(peers)));
  } else {
    for (unsigned todo = leaders; todo; todo &= todo - 1) {
      const int src = __ffs(todo) - 1;
      const int bb = __shfl_sync(kFull, b, src);
      u64 sum = b == bb ? m : 0ull;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
      if (lane == unsigned(src)) {
        atomicAdd(&count[bb], unsigned(__popc(peers)));
        atomicAdd(&mass[bb], sum);
      }
    }
  }
}

// Warp 0, one radix-selection level: the first bucket from the top (largest keys) at which the
// running total of val reaches s.need; s.need becomes what is left to reach inside it. With
// frac >= 0, s.need is first set to max(1, ceil(frac * total)) (top-p: a share of the set's mass).
template <class T>
__device__ void find_bucket(const T* val, Smem& s, double frac) {
  constexpr int kPer = kBuckets / 32;
  const int lane = int(threadIdx.x);
  u64 need = s.need;
  __syncwarp();               // every lane has read need before it is rewritten below
  if (lane == 0) s.sel = -1;  // stays so only if nothing is found
  __syncwarp();
  u64 part = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) part += u64(val[kBuckets - 1 - lane * kPer - j]);
  u64 incl = part;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (frac >= 0) {
    const u64 total = __shfl_sync(kFull, incl, 31);
    need = u64(ceil(frac * double(total)));
    if (need < 1) need = 1;
  }
  const unsigned hits = __ballot_sync(kFull, incl >= need);
  if (!hits) return;  // the target exceeds the total: not for exact integer weights
  if (lane == __ffs(hits) - 1) {
    u64 run = incl - part;
    for (int j = 0; j < kPer; ++j) {
      const int b = kBuckets - 1 - lane * kPer - j;
      if (run + u64(val[b]) >= need) {
        s.sel = b;
        s.need = need - run;
        break;
      }
      run += u64(val[b]);
    }
  }
}

// Narrows `in` to the tokens (in key order, equal keys by id) up to and including the one at
// which the running weight reaches the target: with MASS the weights are fixed-point
// probabilities and the target is max(1, ceil(frac * their total)) (top-p); otherwise every
// token weighs 1 and the target is s.need, set by the caller (top-k). Four 8-bit levels; the
// tokens of `in` at in.key (only the first in.rank count) are added to their bucket virtually.
template <bool MASS>
__device__ Cut radix_select(const Row& row, Cut in, Smem& s, double frac) {
  uint32_t prefix = 0, mask = 0;
  const u64 tie_w = MASS && in.rank > 0 ? fixed(row.prob(key_logit(in.key))) : 0;
  int sel = -1;
  for (int shift = 32 - kDigit; shift >= 0; shift -= kDigit) {
    __syncthreads();  // the previous level's (or caller's) readers of the histogram are done
    for (int b = int(threadIdx.x); b < kBuckets; b += kThreads) {
      s.count[b] = 0;
      if constexpr (MASS) s.mass[b] = 0;
    }
    __syncthreads();
    for_row(row, [&](int i, float v) {
      int b = -1;
      u64 w = 0;
      if (i < row.V) {
        const uint32_t key = logit_key(v);
        if (key > in.key && (key & mask) == prefix) {
          b = int((key >> shift) & (kBuckets - 1));
          if constexpr (MASS) w = fixed(row.prob(v));
        }
      }
      hist_add<MASS>(s.count, s.mass, b, w);
    });
    __syncthreads();
    if (threadIdx.x == 0 && in.rank > 0 && (in.key & mask) == prefix) {
      const int b = int((in.key >> shift) & (kBuckets - 1));
      s.count[b] += unsigned(in.rank);
      if constexpr (MASS) s.mass[b] += u64(in.rank) * tie_w;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      if constexpr (MASS) find_bucket(s.mass, s, shift == 32 - kDigit ? frac : -1.0);
      else find_bucket(s.count, s, -1.0);
    }
    __syncthreads();
    sel = s.sel;
    if (sel < 0) return in;
    prefix |= uint32_t(sel) << shift;
    mask |= uint32_t(kBuckets - 1) << shift;
  }
  // prefix is the key of the token reaching the target; every token with it has the same weight.
  Cut out;
  out.key = prefix;
  const u64 need = s.need, n = s.count[sel];
  u64 rank = need;
  if constexpr (MASS) {
    const u64 w = fixed(row.prob(key_logit(prefix)));
    rank = w ? (need + w - 1) / w : n;
  }
  out.rank = int(rank < 1 ? 1 : rank > n ? n : rank);
  return out;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, int V, const float* params, const float* uniforms, int32_t* tokens) {
  pdl_prologue();
  __shared__ Smem s;
  const int64_t r = blockIdx.x;
  const float* pr = params + r * kSampleParams;
  const float temp = pr[0], kf = pr[1], top_p = pr[2], min_p = pr[3];
  Row row{logits + r * int64_t(V), V, temp > 0.f ? double(temp) : 1.0, 0.0, 0.0};

  float best = -INFINITY;
  int arg = INT_MAX;
  for_row(row, [&](int i, float v) {
    if (i < V && (v > best || (v == best && i < arg))) {
      best = v;
      arg = i;
    }
  });
  block_argmax(best, arg, s);
  if (temp <= 0.f) {
    if (threadIdx.x == 0) tokens[r] = arg;
    return;
  }

  row.mx = double(best) / row.T;
  double acc = 0;
  for_row(row, [&](int i, float v) {
    if (i < V) acc += exp(double(v) / row.T - row.mx);
  });
  row.S = block_reduce(acc, Sum{}, s.rd);

  Cut cut;
  if (kf >= 1.f && kf < float(V)) {
    if (threadIdx.x == 0) s.need = u64(kf);
    cut = radix_select<false>(row, cut, s, -1.0);
  }
  if (top_p < 1.f) cut = radix_select<true>(row, cut, s, double(top_p));

  // min-p against the largest probability, exp(0) / sum.
  const double pmin = min_p > 0.f ? double(min_p) * (1.0 / row.S) : 0.0;
  acc = 0;
  for_row(row, [&](int i, float v) {
    if (i < V && logit_key(v) > cut.key) {
      const double p = row.prob(v);
      if (!(p < pmin)) acc += p;
    }
  });
  double kept = block_reduce(acc, Sum{}, s.rd);
  if (cut.rank > 0) {
    const double p = row.prob(key_logit(cut.key));
    if (!(p < pmin)) kept += double(cut.rank) * p;
  }

  // Inverse CDF in id order over chunks of kThreads * kIlp ids, kIlp consecutive ids per thread.
  const double u = double(uniforms[r]);
  double carry = 0;
  int ties_seen = 0, found = INT_MAX, last = -1;
  for (int base = 0; base < V; base += kThreads * kIlp) {
    const int i0 = base + int(threadIdx.x) * kIlp;
    float v[kIlp];
    uint32_t key[kIlp];
    int nties = 0;
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      v[j] = i0 + j < V ? row.z[i0 + j] : 0.f;
      key[j] = logit_key(v[j]);
      nties += (i0 + j < V && cut.rank > 0 && key[j] == cut.key) ? 1 : 0;
    }
    int tie_before = 0, chunk_ties = 0;
    cub::BlockScan<int, kThreads>(s.iscan).ExclusiveSum(nties, tie_before, chunk_ties);
    int rank = ties_seen + tie_before;
    float q[kIlp];
    double local = 0;
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      q[j] = 0.f;
      if (i0 + j >= V) continue;
      bool in = key[j] > cut.key;
      if (cut.rank > 0 && key[j] == cut.key) in = rank++ < cut.rank;
      if (in) {
        const double p = row.prob(v[j]);
        if (!(p < pmin)) q[j] = float(p / kept);
      }
      local += double(q[j]);
    }
    double before = 0, chunk = 0;
    cub::BlockScan<double, kThreads>(s.dscan).ExclusiveSum(local, before, chunk);
    double cum = carry + before;
    int hit = INT_MAX, mine = -1;
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      if (!(q[j] > 0.f)) continue;
      cum += double(q[j]);
      mine = i0 + j;
      if (hit == INT_MAX && u < cum) hit = i0 + j;
    }
    found = block_reduce(hit, Min{}, s.ri);
    last = max(last, block_reduce(mine, Max{}, s.ri));
    carry += chunk;
    ties_seen += chunk_ties;
    if (found != INT_MAX) break;
  }
  if (threadIdx.x == 0) tokens[r] = found != INT_MAX ? found : last;
}

}  // namespace

void sample(const float* logits, int64_t B, int64_t V, const float* params, const float* uniforms, int32_t* tokens,
            cudaStream_t s) {
  if (B <= 0 || V <= 0) return;
  launch_pdl(sample_kernel, unsigned(B), kThreads, 0, s, logits, int(V), params, uniforms, tokens);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
