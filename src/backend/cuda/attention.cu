// Attention family: sparse shared-KV attention with sinks over [window | selected compressed
// entries], the gated-pooling compressor (CSA overlap / HCA), and the Lightning Indexer's
// scoring plus per-row top-k.
#include "backend/cuda/common.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kHG = 8;       // query heads per block (they share the index list and the key rows)
constexpr int kTile = 64;    // keys per online-softmax step
constexpr int kMaxDpt = 4;   // head dims per thread (d <= 4 * 256)

// Block (t, head group): keys in tiles of kTile with an online softmax that starts from the sink
// (running max = sink logit, running sum = 1, zero value). smem: q [kHG][d] (dynamic).
__global__ void __launch_bounds__(256) attend_kernel(const float* q, int64_t H, int64_t d, const float* pool, int64_t N,
                                                     const int32_t* idx_a, int64_t Ka, const int32_t* idx_b,
                                                     int64_t Kb, Vec sinks, float scale, float* out) {
  extern __shared__ __align__(16) float qs[];
  __shared__ float ps[kHG][kTile];
  __shared__ int32_t ix[kTile];
  __shared__ float mrun[kHG], lrun[kHG], corr[kHG];
  __shared__ int bad;
  const int64_t K = Ka + Kb, t = blockIdx.x, h0 = int64_t(blockIdx.y) * kHG;
  const int nh = int(H - h0 < kHG ? H - h0 : kHG);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  for (int64_t i = tid; i < kHG * d; i += blockDim.x) {
    const int h = int(i / d);
    qs[i] = h < nh ? q[(t * H + h0 + h) * d + i % d] : 0.f;
  }
  if (tid < kHG) {
    mrun[tid] = tid < nh ? vec_at(sinks, h0 + tid) : 0.f;
    lrun[tid] = 1.f;
    corr[tid] = 1.f;
  }
  if (tid == 0) bad = 0;
  float acc[kMaxDpt][kHG];
#pragma unroll
  for (int j = 0; j < kMaxDpt; ++j)
#pragma unroll
    for (int h = 0; h < kHG; ++h) acc[j][h] = 0.f;
  __syncthreads();
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int nk = int(K - k0 < kTile ? K - k0 : kTile);
    if (tid < kTile) {
      int32_t v = -1;
      if (tid < nk) {
        const int64_t k = k0 + tid;
        v = k < Ka ? idx_a[t * Ka + k] : idx_b[t * Kb + (k - Ka)];
        if (v >= N) {
          bad = 1;
          v = -1;
        }
      }
      ix[tid] = v;
    }
    __syncthreads();
    for (int kk = warp; kk < nk; kk += nw) {
      const int32_t r = ix[kk];
      float a[kHG];
#pragma unroll
      for (int h = 0; h < kHG; ++h) a[h] = 0.f;
      if (r >= 0) {
        const float* row = pool + int64_t(r) * d;
        for (int64_t i = lane; i < d; i += 32) {
          const float v = row[i];
#pragma unroll
          for (int h = 0; h < kHG; ++h) a[h] = fmaf(qs[h * d + i], v, a[h]);
        }
      }
#pragma unroll
      for (int h = 0; h < kHG; ++h) {
        const float sc = warp_sum(a[h]);
        if (lane == 0) ps[h][kk] = r >= 0 ? sc * scale : -INFINITY;
      }
    }
    __syncthreads();
    for (int h = warp; h < nh; h += nw) {
      float mx = -INFINITY;
      for (int kk = lane; kk < nk; kk += 32) mx = fmaxf(mx, ps[h][kk]);
      mx = warp_max(mx);
      const float mnew = fmaxf(mrun[h], mx);
      float sum = 0.f;
      for (int kk = lane; kk < nk; kk += 32) {
        const float p = ix[kk] >= 0 ? expf(ps[h][kk] - mnew) : 0.f;
        ps[h][kk] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float c = expf(mrun[h] - mnew);
        corr[h] = c;
        lrun[h] = lrun[h] * c + sum;
        mrun[h] = mnew;
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kMaxDpt; ++j) {
      const int64_t i = tid + int64_t(j) * blockDim.x;
      if (i >= d) continue;
#pragma unroll
      for (int h = 0; h < kHG; ++h) acc[j][h] *= corr[h];
      for (int kk = 0; kk < nk; ++kk) {
        const int32_t r = ix[kk];
        if (r < 0) continue;
        const float v = pool[int64_t(r) * d + i];
#pragma unroll
        for (int h = 0; h < kHG; ++h) acc[j][h] = fmaf(ps[h][kk], v, acc[j][h]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kMaxDpt; ++j) {
    const int64_t i = tid + int64_t(j) * blockDim.x;
    if (i >= d) continue;
#pragma unroll
    for (int h = 0; h < kHG; ++h)
      if (h < nh) out[(t * H + h0 + h) * d + i] = bad ? __int_as_float(0x7fc00000) : acc[j][h] / lrun[h];
  }
}

// ---- compressor ----------------------------------------------------------------------------

struct Src {
  CompressArgs a;
  int64_t width, cur_ws;  // cur_ws: first position of the window open at the chunk's start
  // kv/gate (ape added) of position p at column col of the full row (col < d for state prev).
  __device__ void fetch(int64_t p, int64_t col, float& kv, float& g) const {
    const int64_t r = p % a.ratio;
    if (p >= a.start) {
      const int64_t i = (p - a.start) * width + col;
      kv = a.kv[i];
      g = a.gate[i] + vec_at(a.ape, r * width + col);
    } else if (p >= cur_ws) {
      kv = a.st_kv[r * width + col];
      g = a.st_gate[r * width + col];
    } else {
      kv = a.st_prev_kv[r * a.d + col];
      g = a.st_prev_gate[r * a.d + col];
    }
  }
};

__global__ void compress_entries_kernel(Src s, int64_t ws0) {
  const int64_t j = blockIdx.y, n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const CompressArgs& a = s.a;
  if (n >= a.d) return;
  const int64_t ws = ws0 + j * a.ratio;
  const bool prev = a.overlap && ws >= a.ratio;
  const int64_t own = a.overlap ? a.d : 0;
  float mx = -INFINITY, kv, g;
  if (prev)
    for (int64_t r = 0; r < a.ratio; ++r) {
      s.fetch(ws - a.ratio + r, n, kv, g);
      mx = fmaxf(mx, g);
    }
  for (int64_t r = 0; r < a.ratio; ++r) {
    s.fetch(ws + r, own + n, kv, g);
    mx = fmaxf(mx, g);
  }
  float den = 0.f, acc = 0.f;
  if (prev)
    for (int64_t r = 0; r < a.ratio; ++r) {
      s.fetch(ws - a.ratio + r, n, kv, g);
      const float p = expf(g - mx);
      den += p;
      acc += p * kv;
    }
  for (int64_t r = 0; r < a.ratio; ++r) {
    s.fetch(ws + r, own + n, kv, g);
    const float p = expf(g - mx);
    den += p;
    acc += p * kv;
  }
  a.entries[j * a.d + n] = acc / den;
}

// New first-half state of the last window completed in this chunk (reads only chunk + st_kv).
__global__ void compress_prev_kernel(Src s, int64_t ws_last) {
  const CompressArgs& a = s.a;
  const int64_t n_all = a.ratio * a.d;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n_all; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = g / a.d, n = g % a.d;
    float kv, gt;
    s.fetch(ws_last + r, n, kv, gt);
    a.st_prev_kv[g] = kv;
    a.st_prev_gate[g] = gt;
  }
}

// Pending rows: the last min(T, ratio) positions overwrite their slots.
__global__ void compress_slots_kernel(Src s, int64_t p0) {
  const CompressArgs& a = s.a;
  const int64_t n_all = (a.start + a.T - p0) * s.width;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < n_all; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = p0 + g / s.width, col = g % s.width, r = p % a.ratio;
    const int64_t i = (p - a.start) * s.width + col;
    a.st_kv[r * s.width + col] = a.kv[i];
    a.st_gate[r * s.width + col] = a.gate[i] + vec_at(a.ape, r * s.width + col);
  }
}

// ---- indexer -------------------------------------------------------------------------------

constexpr int kHC = 16;  // heads per register pass

// Block (key tile of 128, t). smem: q_t [H*d], w_t [H].
__global__ void __launch_bounds__(128) index_score_kernel(const float* q, const float* w, float w_scale, int64_t H,
                                                          int64_t d, const float* keys, int64_t N,
                                                          const int32_t* usable, float* scores) {
  extern __shared__ __align__(16) float sm[];
  const int64_t t = blockIdx.y, j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float* qs = sm;
  float* wsm = sm + H * d;
  for (int64_t i = threadIdx.x; i < H * d; i += blockDim.x) qs[i] = q[t * H * d + i];
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) wsm[i] = w[t * H + i];
  __syncthreads();
  if (j >= usable[t] || j >= N) return;
  const float* kj = keys + j * d;
  float total = 0.f;
  for (int64_t h0 = 0; h0 < H; h0 += kHC) {
    float acc[kHC];
#pragma unroll
    for (int h = 0; h < kHC; ++h) acc[h] = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float kv = kj[i];
#pragma unroll
      for (int h = 0; h < kHC; ++h)
        if (h0 + h < H) acc[h] = fmaf(qs[(h0 + h) * d + i], kv, acc[h]);
    }
#pragma unroll
    for (int h = 0; h < kHC; ++h)
      if (h0 + h < H) total += wsm[h0 + h] * fmaxf(0.f, acc[h]);
  }
  scores[t * N + j] = total * w_scale;
}

__device__ __forceinline__ uint32_t ordered(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block per row: bitonic sort (descending) of (score, -j) keys in shared memory, first K kept.
__global__ void __launch_bounds__(1024) topk_kernel(const float* scores, int64_t N, const int32_t* usable, int64_t K,
                                                    int64_t P, int32_t* idx) {
  extern __shared__ unsigned long long keys[];
  const int64_t t = blockIdx.x, n = usable[t] < N ? usable[t] : N;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x)
    keys[i] = i < n ? (uint64_t(ordered(scores[t * N + i])) << 32) | uint64_t(0xffffffffu - uint32_t(i)) : 0ull;
  __syncthreads();
  for (int64_t k = 2; k <= P; k <<= 1)
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
        const int64_t l = i ^ j;
        if (l > i) {
          const unsigned long long a = keys[i], b = keys[l];
          if (((i & k) == 0) ? (a < b) : (a > b)) {
            keys[i] = b;
            keys[l] = a;
          }
        }
      }
      __syncthreads();
    }
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
    idx[t * K + i] = i < n ? int32_t(0xffffffffu - uint32_t(keys[i] & 0xffffffffu)) : -1;
}

}  // namespace

void attend(const float* q, int64_t T, int64_t H, int64_t d, const float* pool, int64_t N, const int32_t* idx_a,
            int64_t Ka, const int32_t* idx_b, int64_t Kb, Vec sinks, float scale, float* out, cudaStream_t s) {
  if (T <= 0 || H <= 0) return;
  if (d > kMaxDpt * 256) {
    std::fprintf(stderr, "attend: head_dim %lld exceeds %d\n", (long long)d, kMaxDpt * 256);
    std::abort();
  }
  const size_t smem = size_t(kHG * d) * 4;
  if (smem > 48 * 1024) cudaFuncSetAttribute(attend_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  dim3 grid(unsigned(T), unsigned((H + kHG - 1) / kHG));
  attend_kernel<<<grid, 256, smem, s>>>(q, H, d, pool, N, idx_a, Ka, idx_b, Kb, sinks, scale, out);
  DSV4_LAUNCH_CHECK();
}

void compress(const CompressArgs& a, cudaStream_t s) {
  Src src{a, (a.overlap ? 2 : 1) * a.d, a.start - a.start % a.ratio};
  // First window completed in the chunk ends at the first p >= start with p % ratio == ratio - 1.
  const int64_t first_end = a.start + (a.ratio - 1 - a.start % a.ratio);
  const int64_t ws0 = first_end - a.ratio + 1;
  if (a.n > 0) {
    dim3 grid(unsigned((a.d + 127) / 128), unsigned(a.n));
    compress_entries_kernel<<<grid, 128, 0, s>>>(src, ws0);
    DSV4_LAUNCH_CHECK();
    if (a.overlap) {
      compress_prev_kernel<<<blocks_for(a.ratio * a.d), 256, 0, s>>>(src, ws0 + (a.n - 1) * a.ratio);
      DSV4_LAUNCH_CHECK();
    }
  }
  const int64_t p0 = a.T > a.ratio ? a.start + a.T - a.ratio : a.start;
  compress_slots_kernel<<<blocks_for((a.start + a.T - p0) * src.width), 256, 0, s>>>(src, p0);
  DSV4_LAUNCH_CHECK();
}

void index_topk(const float* q, const float* w, float w_scale, int64_t T, int64_t H, int64_t d, const float* keys,
                int64_t N, const int32_t* usable, int64_t K, float* scratch, int32_t* idx, cudaStream_t s) {
  if (T <= 0) return;
  if (N > 0) {
    const size_t smem = size_t(H * d + H) * 4;
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(index_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    dim3 grid(unsigned((N + 127) / 128), unsigned(T));
    index_score_kernel<<<grid, 128, smem, s>>>(q, w, w_scale, H, d, keys, N, usable, scratch);
    DSV4_LAUNCH_CHECK();
  }
  int64_t P = 1;
  while (P < N) P <<= 1;
  const size_t smem = size_t(P) * 8;
  if (smem > 48 * 1024) cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  topk_kernel<<<unsigned(T), 1024, smem, s>>>(scratch, N, usable, K, P, idx);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
