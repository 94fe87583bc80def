// Attention family: sparse shared-KV attention with sinks over stored rows (window ring, this
// step's fresh keys, paged compressed entries; F32 or packed production rows decoded on the fly;
// FP32 split-K kernel for decode, BF16 tensor cores for prefill-sized batches of packed rows),
// the gated-pooling compressor (CSA overlap / HCA) over a flattened batch of sequences with
// slot-indexed state, and the Lightning Indexer's paged scoring plus per-row top-k.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "backend/cuda/kv.cuh"
#include "backend/cuda/mma.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kHG = 8;          // query heads per block (they share the index list and the key rows)
constexpr int kTileKeys = 32;   // keys per online-softmax step (16 for d > 512: shared memory)
constexpr int kMaxDpt = 4;      // head dims per thread (d <= 4 * 256)

int tile_keys(int64_t d) { return d <= 512 ? kTileKeys : kTileKeys / 2; }

// Rows [n, L.dim] of one store: F32 values, or packed production rows decoded V values at a time.
template <bool kPacked>
struct Rows {
  const void* p;
  int64_t n;
  KvRowLayout L;
  // Values c .. c + V - 1 of row r (V = 4: c % 4 == 0, d % 4 == 0 and, packed, nope % 4 == 0, so
  // the group lies in one part of the row and its bytes are 4-aligned; same decode as kv_decode).
  template <int V>
  __device__ __forceinline__ void group(int64_t r, int64_t c, float* v) const {
    if constexpr (kPacked) {
      const uint8_t* row = static_cast<const uint8_t*>(p) + r * L.bytes;
      if constexpr (V == 4) {
        if (c < L.nope) {
          const uint32_t codes = *reinterpret_cast<const uint32_t*>(row + c);
          const float scale = e8m0_to_float(row[L.scale_offset + c / kKvScaleBlock]);
#pragma unroll
          for (int i = 0; i < 4; ++i) v[i] = e4m3_to_float(uint8_t(codes >> (8 * i))) * scale;
        } else {
          const uint32_t* h = reinterpret_cast<const uint32_t*>(row + L.rope_offset + 2 * (c - L.nope));
          const uint32_t lo = h[0], hi = h[1];
          v[0] = bf16_bits_to_float(uint16_t(lo));
          v[1] = bf16_bits_to_float(uint16_t(lo >> 16));
          v[2] = bf16_bits_to_float(uint16_t(hi));
          v[3] = bf16_bits_to_float(uint16_t(hi >> 16));
        }
      } else {
        v[0] = kv_decode(row, L, c);
      }
    } else {
      const float* row = static_cast<const float*>(p) + r * L.dim;
      if constexpr (V == 4) {
        const float4 f = *reinterpret_cast<const float4*>(row + c);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
      } else {
        v[0] = row[c];
      }
    }
  }
};

// Where a tile's key lives: which store (0 window, 1 fresh, 2 entries) and its row there.
enum : int8_t { kWindow, kFresh, kEntries };

// The keys of one attend call; kPacked: window and entries hold packed rows (fresh is F32).
template <bool kPacked>
struct KeySources {
  Rows<kPacked> window;
  Rows<false> fresh;
  Rows<kPacked> entries;
  template <int V>
  __device__ __forceinline__ void group(int8_t src, int32_t r, int64_t c, float* v) const {
    if (src == kWindow) window.template group<V>(r, c, v);
    else if (src == kFresh) fresh.template group<V>(r, c, v);
    else entries.template group<V>(r, c, v);
  }
};

// Entry k of query t's key list: idx_a's k-th (window ring rows, then this step's fresh rows past
// the ring), idx_b's (k - Ka)-th (entries), -1 past the list.
__device__ __forceinline__ int32_t key_entry(const int32_t* idx_a, int64_t Ka, const int32_t* idx_b, int64_t Kb,
                                             int64_t t, int64_t k) {
  return k < Ka ? idx_a[t * Ka + k] : k < Ka + Kb ? idx_b[t * Kb + (k - Ka)] : -1;
}

// Key k's list entry v as (store row, -1 when missing) and src; a row past its store sets *bad
// and counts as missing.
template <bool kPacked>
__device__ __forceinline__ void resolve_key(const KeySources<kPacked>& ks, int64_t Ka, int64_t k, int32_t v,
                                            int32_t& ix, int8_t& src, int* bad) {
  int8_t where = kWindow;
  bool outside = false;
  if (k < Ka) {
    if (v >= ks.window.n) {
      where = kFresh;
      v -= int32_t(ks.window.n);
      outside = v >= ks.fresh.n;
    }
  } else {
    where = kEntries;
    outside = v >= ks.entries.n;
  }
  if (outside) {
    *bad = 1;
    v = -1;
  }
  ix = v;
  src = where;
}

// Threads tid < tk resolve keys k0 + tid (tid < nk) of query t into ix and src; tid >= nk writes
// a missing key.
template <bool kPacked>
__device__ __forceinline__ void resolve_keys(const KeySources<kPacked>& ks, const int32_t* idx_a, int64_t Ka,
                                             const int32_t* idx_b, int64_t Kb, int64_t t, int64_t k0, int nk, int tk,
                                             int32_t* ix, int8_t* src, int* bad) {
  const int tid = threadIdx.x;
  if (tid >= tk) return;
  const int32_t v = tid < nk ? key_entry(idx_a, Ka, idx_b, Kb, t, k0 + tid) : -1;
  resolve_key(ks, Ka, k0 + tid, v, ix[tid], src[tid], bad);
}

// Decodes the nk resolved rows of a tile (missing keys as zeros), kU groups of V values per
// thread in flight at once (the latency paid once per kU groups), handing each group to
// put(key, column, values).
template <bool kPacked, int V, int kU, class Put>
__device__ __forceinline__ void stage_keys(const KeySources<kPacked>& ks, const int32_t* ix, const int8_t* src, int nk,
                                           int64_t d, Put put) {
  const int64_t groups = d / V, slots = int64_t(nk) * groups;
  for (int64_t s0 = threadIdx.x; s0 < slots; s0 += int64_t(blockDim.x) * kU) {
    float v[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t slot = s0 + int64_t(u) * blockDim.x;
#pragma unroll
      for (int e = 0; e < V; ++e) v[u][e] = 0.f;
      if (slot < slots) {
        const int kk = int(slot / groups);
        if (ix[kk] >= 0) ks.template group<V>(src[kk], ix[kk], (slot % groups) * V, v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t slot = s0 + int64_t(u) * blockDim.x;
      if (slot < slots) put(int(slot / groups), (slot % groups) * V, v[u]);
    }
  }
}

// Block (t, head group): keys in tiles of tk with an online softmax that starts from the sink
// (running max = sink logit, running sum = 1, zero value). Each tile's rows are decoded into
// shared memory once, every thread issuing its loads together (latency paid once per tile, not
// once per element), then read by the QK and PV loops of all kHG heads. smem (dynamic): q [kHG][d],
// keys [tk][d]. An index past its store makes the block's outputs NaN. V: values per decoded group.
//
// Decode has few query rows (T x H/kHG blocks: 8 for one token), so the keys are split over
// gridDim.z blocks (flash-decoding): split z takes tiles [z*tps, (z+1)*tps), starts from an
// empty softmax (max -inf, sum 0) and writes its unnormalised partial (o [d], m, l, bad) to
// `part`; attend_combine_kernel merges the splits with the sink. gridDim.z == 1: the block writes
// the output itself.
template <bool kPacked, int V>
__global__ void __launch_bounds__(256) attend_kernel(const float* q, int64_t H, int64_t d, int tk,
                                                     KeySources<kPacked> ks, const int32_t* idx_a, int64_t Ka,
                                                     const int32_t* idx_b, int64_t Kb, Vec sinks, float scale,
                                                     float* out, float* part) {
  pdl_prologue();
  extern __shared__ __align__(16) float qs[];
  float* kvs = qs + kHG * d;
  __shared__ float ps[kHG][kTileKeys];
  __shared__ int32_t ix[kTileKeys];
  __shared__ int8_t src[kTileKeys];
  __shared__ float mrun[kHG], lrun[kHG], corr[kHG];
  __shared__ int bad;
  const int64_t t = blockIdx.x, h0 = int64_t(blockIdx.y) * kHG;
  const bool split = gridDim.z > 1;
  const int64_t tiles = (Ka + Kb + tk - 1) / tk, tps = (tiles + gridDim.z - 1) / gridDim.z;
  const int64_t kbeg = int64_t(blockIdx.z) * tps * tk;
  const int64_t K = (int64_t(blockIdx.z) + 1) * tps * tk < Ka + Kb ? (int64_t(blockIdx.z) + 1) * tps * tk : Ka + Kb;
  const int nh = int(H - h0 < kHG ? H - h0 : kHG);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  block_copy_to_smem(qs, q + (t * H + h0) * d, nh * d);
  for (int64_t i = nh * d + tid; i < kHG * d; i += blockDim.x) qs[i] = 0.f;
  if (tid < kHG) {
    mrun[tid] = split ? -INFINITY : tid < nh ? vec_at(sinks, h0 + tid) : 0.f;
    lrun[tid] = split ? 0.f : 1.f;
    corr[tid] = 1.f;
  }
  if (tid == 0) bad = 0;
  __syncthreads();  // bad = 0 before any thread's resolve_keys may set it
  float acc[kMaxDpt][kHG];
#pragma unroll
  for (int j = 0; j < kMaxDpt; ++j)
#pragma unroll
    for (int h = 0; h < kHG; ++h) acc[j][h] = 0.f;
  for (int64_t k0 = kbeg; k0 < K; k0 += tk) {
    const int nk = int(K - k0 < tk ? K - k0 : tk);
    resolve_keys(ks, idx_a, Ka, idx_b, Kb, t, k0, nk, tk, ix, src, &bad);
    __syncthreads();  // also: the previous tile's PV loop is done with kvs
    stage_keys<kPacked, V, V == 4 ? 4 : 8>(ks, ix, src, nk, d, [&](int key, int64_t c, const float* v) {
      float* dst = kvs + int64_t(key) * d + c;
      if constexpr (V == 4) *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      else dst[0] = v[0];
    });
    __syncthreads();
    for (int kk = warp; kk < nk; kk += nw) {
      const int32_t r = ix[kk];
      const float* kr = kvs + int64_t(kk) * d;
      float a[kHG];
#pragma unroll
      for (int h = 0; h < kHG; ++h) a[h] = 0.f;
      if (r >= 0) {
        for (int64_t i = lane; i < d; i += 32) {
          const float v = kr[i];
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
      const float mx = warp_max(lane < nk ? ps[h][lane] : -INFINITY);
      const float mnew = fmaxf(mrun[h], mx);  // -inf only in a split whose keys so far are all -1
      const bool none = mnew == -INFINITY;
      const float p = lane < nk && ix[lane] >= 0 && !none ? expf(ps[h][lane] - mnew) : 0.f;
      if (lane < nk) ps[h][lane] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float c = none ? 1.f : expf(mrun[h] - mnew);
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
        const float v = kvs[int64_t(kk) * d + i];  // zero for missing keys, whose p is zero too
#pragma unroll
        for (int h = 0; h < kHG; ++h) acc[j][h] = fmaf(ps[h][kk], v, acc[j][h]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxDpt; ++j) {
    const int64_t i = tid + int64_t(j) * blockDim.x;
    if (i >= d) continue;
#pragma unroll
    for (int h = 0; h < kHG; ++h) {
      if (h >= nh) continue;
      if (split) part[((t * H + h0 + h) * gridDim.z + blockIdx.z) * (d + 3) + i] = acc[j][h];
      else out[(t * H + h0 + h) * d + i] = bad ? __int_as_float(0x7fc00000) : acc[j][h] / lrun[h];
    }
  }
  __syncthreads();  // bad and the running sums are final
  if (split && tid < nh) {
    float* ml = part + ((t * H + h0 + tid) * gridDim.z + blockIdx.z) * (d + 3) + d;
    ml[0] = mrun[tid];
    ml[1] = lrun[tid];
    ml[2] = float(bad);
  }
}

// Block (t, h): merges the S splits of attend_kernel with the sink (max = sink, sum = 1, zero
// value), as the unsplit kernel starts its softmax. The splits' (m, l, bad) are read in parallel
// into shared memory; each split's weight exp(m - M) is computed once.
constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = 512;
__global__ void __launch_bounds__(kCombineThreads) attend_combine_kernel(const float* part, int64_t H, int64_t d,
                                                                         int64_t S, Vec sinks, float* out) {
  pdl_prologue();
  __shared__ float f[kMaxSplits];
  __shared__ float total;
  __shared__ int bad;
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const float* ph = part + (t * H + h) * S * (d + 3);
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  for (int64_t z = threadIdx.x; z < S; z += blockDim.x) {
    f[z] = ph[z * (d + 3) + d];
    if (ph[z * (d + 3) + d + 2] != 0.f) bad = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float sink = vec_at(sinks, h);
    float M = sink;
    for (int64_t z = 0; z < S; ++z) M = fmaxf(M, f[z]);
    float L = expf(sink - M);
    for (int64_t z = 0; z < S; ++z) {
      const float m = f[z], w = m != -INFINITY ? expf(m - M) : 0.f;
      L += m != -INFINITY ? ph[z * (d + 3) + d + 1] * w : 0.f;
      f[z] = w;
    }
    total = L;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int64_t z = 0; z < S; ++z) acc = fmaf(ph[z * (d + 3) + i], f[z], acc);
    out[(t * H + h) * d + i] = bad ? __int_as_float(0x7fc00000) : acc / total;
  }
}

// ---- tensor-core attention for prefill-sized batches ------------------------------------------
// Block (t, group of kTcHeads heads): the heads share every key, so a tile of kTcKeys keys gives
// the scores S = Q K^T [heads x keys] and the output update P V with V = K, both on mma.sync
// m16n8k16 BF16 tensor cores with FP32 accumulation. Packed production rows decode to BF16
// exactly (E4M3 times a power of two, BF16 RoPE dims); this step's fresh rows, which hold what
// quantize_kv leaves, are packed first (launch_attend_tc) and decode to the same values. q and p
// are split into three BF16 parts that sum to them exactly. So every product is exact and only
// the order (and the tensor cores' FP32 accumulation) of the sums differs from the CPU.
// Online softmax from the sink as attend_kernel.
// Per tile: the bytes of the next tile's key rows load into registers (8 bytes a load, 18 loads a
// thread) while this tile's QK, softmax and PV run, and are decoded into the BF16 key buffer at
// the top of the next iteration. Threads tid < kTcKeys follow key tid of every tile and hold its
// next list entry in a register, so the index loads stay off the path too. QK warps (all heads x
// 16 keys x half the dims each) write partial S to shared memory, a softmax pass adds the halves
// and writes P's three parts, PV warps (all heads x 64 dims each) accumulate O in registers;
// operand fragments come by ldmatrix.
constexpr int kTcDim = 512, kTcNope = 448, kTcHeads = 32, kTcKeys = 64, kTcWarps = 8;
constexpr int kTcRow = kTcDim + 8;   // BF16 row stride of q and k: 16 bytes of skew per row, so the
constexpr int kTcPRow = kTcKeys + 8;  // 8 row addresses of an ldmatrix hit 32 distinct banks
constexpr int kTcSRow = kTcKeys + 4;
static_assert(kTcHeads == 32 && kTcKeys == 64 && kTcWarps == 8 && kTcDim == kTcWarps * 64,
              "the warp roles below are laid out for these sizes");
// The packed row (584 bytes, 8-aligned): E4M3 codes of the no-RoPE dims, the RoPE dims in BF16,
// one E8M0 scale per 64 codes. Its first 576 bytes are 72 loads (56 of codes, 16 of BF16 dims);
// a tile's 4,608 are 18 a thread.
constexpr KvRowLayout kTcLayout = kv_row_layout(kTcDim, kTcNope);
constexpr int kTcRowLoads = int(kTcLayout.scale_offset) / 8, kTcCodeLoads = kTcNope / 8;
constexpr int kTcLoads = kTcKeys * kTcRowLoads / (kTcWarps * 32);
static_assert(kTcLayout.rope_offset == kTcNope && kTcLayout.scale_offset % 8 == 0 && kTcLayout.bytes % 8 == 0 &&
                  kTcLoads * kTcWarps * 32 == kTcKeys * kTcRowLoads && kKvScaleBlock % 8 == 0,
              "the key loads below are laid out for this row");
struct TcSmem {
  uint16_t q[3][kTcHeads][kTcRow];
  uint16_t k[kTcKeys][kTcRow];
  uint16_t p[3][kTcHeads][kTcPRow];
  float s[2][kTcHeads][kTcSRow];  // partial scores of the two halves of the dims
  float m[kTcHeads], l[kTcHeads], corr[kTcHeads];
  int32_t ix[2][kTcKeys];  // tiles alternate: the next one resolved while this one is read
  int8_t src[2][kTcKeys];
  int bad;
};

// A tile's key bytes in flight, this thread's loads i = 0 .. 17 (load j = tid + 256 i of the
// tile: key j / 72, 8-byte part j % 72 of its row) and, for E4M3 codes, their block's scale code.
struct TcKeyLoads {
  uint2 v[kTcLoads];
  uint32_t scale[kTcLoads];
};

// Issues the loads of the tile resolved in ix/src (fresh_rows: this step's keys, packed); a
// missing key loads zeros.
__device__ __forceinline__ void tc_load_keys(const KeySources<true>& ks, const uint8_t* fresh_rows,
                                             const int32_t* ix, const int8_t* src, TcKeyLoads& r) {
#pragma unroll
  for (int i = 0; i < kTcLoads; ++i) {
    const int j = int(threadIdx.x) + i * kTcWarps * 32, key = j / kTcRowLoads, part = j % kTcRowLoads;
    const int32_t row = ix[key];
    r.v[i] = make_uint2(0u, 0u);
    r.scale[i] = 0u;
    if (row >= 0) {
      const int8_t where = src[key];
      const void* store = where == kWindow ? ks.window.p : where == kFresh ? fresh_rows : ks.entries.p;
      const uint8_t* p = static_cast<const uint8_t*>(store) + int64_t(row) * kTcLayout.bytes;
      r.v[i] = __ldg(reinterpret_cast<const uint2*>(p) + part);
      if (part < kTcCodeLoads) r.scale[i] = __ldg(p + kTcLayout.scale_offset + part * 8 / kKvScaleBlock);
    }
  }
}

// The loaded bytes as BF16 key rows: codes times their block's scale (exact: E4M3 -> F16 -> F32
// are exact, the product is E4M3 x 2^k), BF16 dims as they are; a missing key's zeros stay zeros.
__device__ __forceinline__ void tc_store_keys(const TcKeyLoads& r, uint16_t (*k)[kTcRow]) {
#pragma unroll
  for (int i = 0; i < kTcLoads; ++i) {
    const int j = int(threadIdx.x) + i * kTcWarps * 32, key = j / kTcRowLoads, part = j % kTcRowLoads;
    if (part < kTcCodeLoads) {
      const float scale = e8m0_to_float(uint8_t(r.scale[i]));
      uint32_t w[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const uint32_t word = h < 2 ? r.v[i].x : r.v[i].y;
        const float2 f = e4m3x2_to_float2(word >> (16 * (h & 1)));
        w[h] = bf16x2_rn(f.x * scale, f.y * scale);
      }
      *reinterpret_cast<uint4*>(&k[key][part * 8]) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      *reinterpret_cast<uint2*>(&k[key][kTcNope + (part - kTcCodeLoads) * 4]) = r.v[i];
    }
  }
}

// The ldmatrix row address of this lane for a 16 x 16 BF16 block at (r0, c0) of a row-major
// array: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
template <int kStride>
__device__ __forceinline__ const uint16_t* tc_block_row(const uint16_t* base, int r0, int c0, int lane) {
  return base + (r0 + (lane & 15)) * kStride + c0 + (lane >> 4) * 8;
}

__global__ void __launch_bounds__(kTcWarps * 32) attend_tc_kernel(const float* q, int64_t H, KeySources<true> ks,
                                                                 const uint8_t* fresh_rows, const int32_t* idx_a,
                                                                 int64_t Ka, const int32_t* idx_b, int64_t Kb,
                                                                 Vec sinks, float scale, float* out) {
  pdl_prologue();
  extern __shared__ __align__(16) uint8_t tc_raw[];
  TcSmem& sm = *reinterpret_cast<TcSmem*>(tc_raw);
  const int64_t t = blockIdx.x, h0 = int64_t(blockIdx.y) * kTcHeads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t tiles = (Ka + Kb + kTcKeys - 1) / kTcKeys;
  const bool follower = tid < kTcKeys;
  int32_t next = follower ? key_entry(idx_a, Ka, idx_b, Kb, t, tid) : -1;  // its key's list entry, next tile
  if (tid == 0) sm.bad = 0;
  __syncthreads();  // bad = 0 before any resolve_key may set it
  if (follower) {
    resolve_key(ks, Ka, tid, next, sm.ix[0][tid], sm.src[0][tid], &sm.bad);
    next = key_entry(idx_a, Ka, idx_b, Kb, t, kTcKeys + tid);
  }
  __syncthreads();
  TcKeyLoads keys;
  tc_load_keys(ks, fresh_rows, sm.ix[0], sm.src[0], keys);  // in flight while q is staged
  const float4* qt = reinterpret_cast<const float4*>(q + (t * H + h0) * kTcDim);
#pragma unroll 8
  for (int i = tid; i < kTcHeads * kTcDim / 4; i += kTcWarps * 32) {
    const float4 v = qt[i];
    const int h = i / (kTcDim / 4), c = (i % (kTcDim / 4)) * 4;
    uint32_t xy[3], zw[3];
    split_bf16x3(make_float2(v.x, v.y), xy);
    split_bf16x3(make_float2(v.z, v.w), zw);
#pragma unroll
    for (int part = 0; part < 3; ++part) *reinterpret_cast<uint2*>(&sm.q[part][h][c]) = make_uint2(xy[part], zw[part]);
  }
  if (tid < kTcHeads) {
    sm.m[tid] = vec_at(sinks, h0 + tid);
    sm.l[tid] = 1.f;
  }
  float o[2][8][4] = {};  // PV role: heads 16 mt + g (+8), dims 64 warp + 8 nt + 2 t4 (+1)
  for (int64_t it = 0; it < tiles; ++it) {
    const int cur = int(it & 1);
    __syncthreads();  // q staged; the previous tile's QK, softmax and PV are done with k, p and ix[cur ^ 1]
    tc_store_keys(keys, sm.k);
    if (follower && it + 1 < tiles) {
      const int64_t k = (it + 1) * kTcKeys + tid;
      resolve_key(ks, Ka, k, next, sm.ix[cur ^ 1][tid], sm.src[cur ^ 1][tid], &sm.bad);
      next = key_entry(idx_a, Ka, idx_b, Kb, t, k + kTcKeys);
    }
    __syncthreads();
    if (it + 1 < tiles) tc_load_keys(ks, fresh_rows, sm.ix[cur ^ 1], sm.src[cur ^ 1], keys);
    {  // QK role: all heads (two m16 tiles) x keys 16 (warp % 4) .. (two n8 tiles) over half warp / 4
       // of the dims: four independent accumulator chains (two, over all dims, left the tensor
       // cores waiting on each MMA's result)
      const int kb = (warp & 3) * 16, half = warp >> 2;
      float acc[2][2][4] = {};
#pragma unroll 2
      for (int ks16 = half * kTcDim / 32; ks16 < (half + 1) * kTcDim / 32; ++ks16) {
        uint32_t b[4];  // n8 tile 0: b[0], b[2]; tile 1: b[1], b[3]
        ldmatrix_x4<false>(b, tc_block_row<kTcRow>(&sm.k[0][0], kb, ks16 * 16, lane));
        const uint32_t b0[2] = {b[0], b[2]}, b1[2] = {b[1], b[3]};
#pragma unroll
        for (int part = 0; part < 3; ++part)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            uint32_t a[4];
            ldmatrix_x4<false>(a, tc_block_row<kTcRow>(&sm.q[part][0][0], mt * 16, ks16 * 16, lane));
            mma_bf16(acc[mt][0], a, b0);
            mma_bf16(acc[mt][1], a, b1);
          }
      }
      // Partial scores of the half; the first marks the missing keys (-inf), the softmax adds them.
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = mt * 16 + g + (e >= 2 ? 8 : 0), key = kb + nt * 8 + 2 * t4 + (e & 1);
            sm.s[half][h][key] = half == 0 && sm.ix[cur][key] < 0 ? -INFINITY : acc[mt][nt][e];
          }
    }
    __syncthreads();
    // Softmax role: warp w the heads 4w .. 4w + 3, lane the keys lane and lane + 32.
#pragma unroll
    for (int hh = 0; hh < kTcHeads / kTcWarps; ++hh) {
      const int h = warp * (kTcHeads / kTcWarps) + hh;
      const float s0 = (sm.s[0][h][lane] + sm.s[1][h][lane]) * scale;
      const float s1 = (sm.s[0][h][lane + 32] + sm.s[1][h][lane + 32]) * scale, mold = sm.m[h];
      const float mnew = fmaxf(mold, warp_max(fmaxf(s0, s1)));  // finite: the sink is
      const float p0 = s0 == -INFINITY ? 0.f : expf(s0 - mnew), p1 = s1 == -INFINITY ? 0.f : expf(s1 - mnew);
      uint32_t e[3];  // low halves: key lane, high halves: key lane + 32
      split_bf16x3(make_float2(p0, p1), e);
#pragma unroll
      for (int part = 0; part < 3; ++part) {
        sm.p[part][h][lane] = uint16_t(e[part]);
        sm.p[part][h][lane + 32] = uint16_t(e[part] >> 16);
      }
      const float sum = warp_sum(p0 + p1);
      if (lane == 0) {
        const float c = expf(mold - mnew);
        sm.corr[h] = c;
        sm.l[h] = sm.l[h] * c + sum;
        sm.m[h] = mnew;
      }
    }
    __syncthreads();
    // PV role: warp w the dims 64w .. 64w + 63 (eight n8 tiles) of every head (two m16 tiles).
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const float c0 = sm.corr[mt * 16 + g], c1 = sm.corr[mt * 16 + g + 8];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        o[mt][nt][0] *= c0;
        o[mt][nt][1] *= c0;
        o[mt][nt][2] *= c1;
        o[mt][nt][3] *= c1;
      }
    }
#pragma unroll
    for (int ks16 = 0; ks16 < kTcKeys / 16; ++ks16) {
      uint32_t a[3][2][4];
#pragma unroll
      for (int part = 0; part < 3; ++part)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4<false>(a[part][mt], tc_block_row<kTcPRow>(&sm.p[part][0][0], mt * 16, ks16 * 16, lane));
#pragma unroll
      for (int nt = 0; nt < 8; nt += 2) {
        uint32_t b[4];  // V = K transposed: n8 tile nt: b[0], b[1]; tile nt + 1: b[2], b[3]
        ldmatrix_x4<true>(b, tc_block_row<kTcRow>(&sm.k[0][0], ks16 * 16, warp * 64 + nt * 8, lane));
#pragma unroll
        for (int part = 0; part < 3; ++part)
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16(o[mt][nt], a[part][mt], b);
            mma_bf16(o[mt][nt + 1], a[part][mt], b + 2);
          }
      }
    }
  }
  __syncthreads();  // bad and the running sums are final
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = mt * 16 + g + 8 * half;
      const float l = sm.l[h];
      float* row = out + (t * H + h0 + h) * kTcDim + warp * 64 + 2 * t4;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        *reinterpret_cast<float2*>(row + nt * 8) =
            sm.bad ? make_float2(nan, nan) : make_float2(o[mt][nt][2 * half] / l, o[mt][nt][2 * half + 1] / l);
    }
}

// Raises a kernel's dynamic shared memory limit once (a no-op below the 48 KB default).
template <typename Kernel>
void allow_smem(Kernel k, size_t bytes) {
  // A failure here surfaces as the launch error of the first launch that needs the memory.
  if (bytes > 48 * 1024) cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <bool kPacked>
KeySources<kPacked> key_sources(const AttendArgs& a) {
  const KvRowLayout L = kv_row_layout(a.d, a.nope);
  const KvRowLayout F = kv_row_layout(a.d, a.d);  // F32 rows: only L.dim is read
  return {{a.window.p, a.window.n, L}, {a.fresh, a.n_fresh, F}, {a.entries.p, a.entries.n, L}};
}

template <bool kPacked, int V>
void launch_attend(const AttendArgs& a, cudaStream_t s) {
  const KeySources<kPacked> ks = key_sources<kPacked>(a);
  const int tk = tile_keys(a.d);
  const size_t smem = size_t((kHG + tk) * a.d) * 4;
  // The largest request: d 1024 with 16-key tiles (96 KB; fits sm_89/sm_120's 99 KB).
  static const bool allowed = (allow_smem(attend_kernel<kPacked, V>, size_t((kHG + kTileKeys / 2) * 1024) * 4), true);
  (void)allowed;
  const int64_t S = attend_splits(a.T, a.H, a.Ka, a.Kb);
  dim3 grid(unsigned(a.T), unsigned((a.H + kHG - 1) / kHG), unsigned(S));
  launch_pdl(attend_kernel<kPacked, V>, grid, 256, smem, s, a.q, a.H, a.d, tk, ks, a.idx_a, a.Ka, a.idx_b, a.Kb,
             a.sinks, a.scale, a.out, a.scratch);
  DSV4_LAUNCH_CHECK();
  if (S > 1) {
    launch_pdl(attend_combine_kernel, dim3(unsigned(a.T), unsigned(a.H)), kCombineThreads, 0, s, a.scratch, a.H, a.d, S,
               a.sinks, a.out);
    DSV4_LAUNCH_CHECK();
  }
}

// ---- compressor ----------------------------------------------------------------------------

// The rows of one sequence in a pass, at positions start .. start + rows - 1: a position's
// gate/kv pair (ape added) comes from the pass's input, from the slot's pending rows (earlier
// positions of the window open when the pass began) or, for the first halves of the window
// before that one, from the saved previous-window state.
struct CompressSeq {
  const CompressArgs& a;
  int64_t first, rows, start, base, width, own;
  __device__ CompressSeq(const CompressArgs& args, int64_t s) : a(args) {
    const int32_t* seg = a.seqs + s * kSegCols;
    first = seg[kSegFirstRow], rows = seg[kSegRows], start = seg[kSegStart];
    base = int64_t(seg[kSegSlot]) * a.ratio;
    width = (a.overlap ? 2 : 1) * a.d;
    own = a.overlap ? a.d : 0;
  }
  // Column col (< width) of position p >= the open window's first position.
  __device__ void at(int64_t p, int64_t col, float& kv, float& gate) const {
    const int64_t r = p % a.ratio;
    if (p >= start) {
      const int64_t in = (first + p - start) * width + col;
      kv = a.kv[in];
      gate = a.gate[in] + vec_at(a.ape, r * width + col);
    } else {
      kv = a.st_kv[(base + r) * width + col];
      gate = a.st_gate[(base + r) * width + col];
    }
  }
  // First half, channel n, of position p of any window from the one before the open window on.
  __device__ void first_half(int64_t p, int64_t n, float& kv, float& gate) const {
    if (p >= (start / a.ratio) * a.ratio) return at(p, n, kv, gate);
    const int64_t j = (base + p % a.ratio) * a.d + n;
    kv = a.st_prev_kv[j];
    gate = a.st_prev_gate[j];
  }
};

// Thread (channel n, k-th window completed in the pass, sequence blockIdx.z; windows strided by
// gridDim.y): pools the window into entries[out_first + k] from the state as the pass found it
// (compress_state_kernel updates it afterwards). Softmax over [previous window's first halves |
// own second halves], the same order of operations as the CPU twin.
__global__ void compress_pool_kernel(CompressArgs a) {
  pdl_prologue();
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= a.d) return;
  const CompressSeq q(a, blockIdx.z);
  const int64_t w0 = q.start / a.ratio, windows = (q.start + q.rows) / a.ratio - w0;
  const int64_t out_first = a.seqs[int64_t(blockIdx.z) * kSegCols + kSegOutFirst];
  float pk[kCompressMaxRatio], pg[kCompressMaxRatio];  // the previous window's first halves
  for (int64_t k = blockIdx.y; k < windows; k += gridDim.y) {
    const int64_t w = w0 + k, p0 = w * a.ratio;
    const bool prev = a.overlap && w > 0;
    float mx = -INFINITY, den = 0.f, acc = 0.f, kv, gate;
    if (prev)
      for (int64_t j = 0; j < a.ratio; ++j) {
        q.first_half(p0 - a.ratio + j, n, pk[j], pg[j]);
        mx = fmaxf(mx, pg[j]);
      }
    for (int64_t j = 0; j < a.ratio; ++j) {
      q.at(p0 + j, q.own + n, kv, gate);
      mx = fmaxf(mx, gate);
    }
    if (prev)
      for (int64_t j = 0; j < a.ratio; ++j) {
        const float p = expf(pg[j] - mx);
        den += p;
        acc += p * pk[j];
      }
    for (int64_t j = 0; j < a.ratio; ++j) {
      q.at(p0 + j, q.own + n, kv, gate);
      const float p = expf(gate - mx);
      den += p;
      acc += p * kv;
    }
    a.entries[(out_first + k) * a.d + n] = acc / den;
  }
}

// Thread (channel n, sequence blockIdx.y), after the pooling: the saved first halves become those
// of the last window the pass completed, and the slot's pending rows those of the pass's last
// min(rows, ratio) positions (the rows a sequential walk leaves there). Reads precede writes
// within the thread, which owns its columns.
__global__ void compress_state_kernel(CompressArgs a) {
  pdl_prologue();
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= a.d) return;
  const CompressSeq q(a, blockIdx.y);
  const int64_t end = q.start + q.rows, last = end / a.ratio - 1;  // last completed window
  if (a.overlap && last >= q.start / a.ratio) {
    float kv[kCompressMaxRatio], gate[kCompressMaxRatio];
    for (int64_t j = 0; j < a.ratio; ++j) q.at(last * a.ratio + j, n, kv[j], gate[j]);
    for (int64_t j = 0; j < a.ratio; ++j) {
      a.st_prev_kv[(q.base + j) * a.d + n] = kv[j];
      a.st_prev_gate[(q.base + j) * a.d + n] = gate[j];
    }
  }
  for (int64_t p = max(q.start, end - a.ratio); p < end; ++p) {
    const int64_t st = (q.base + p % a.ratio) * q.width;
    for (int64_t col = n; col < q.width; col += a.d) {
      float kv, gate;
      q.at(p, col, kv, gate);
      a.st_kv[st + col] = kv;
      a.st_gate[st + col] = gate;
    }
  }
}

// ---- indexer -------------------------------------------------------------------------------

constexpr int kScoreKeys = 64;      // keys per scoring block (two per lane)
constexpr int kScoreThreads = 256;  // 8 warps: the heads are split among them
constexpr int kScoreHeads = 8;      // heads per register pass of a warp

// Pool row of query t's logical key j: through its sequence's block table.
__device__ __forceinline__ int64_t paged_row(const IndexArgs& a, int64_t t, int64_t j) {
  const int32_t* table = a.block_table + int64_t(a.query_seq[t]) * a.max_blocks;
  return int64_t(table[j / a.per_block]) * a.per_block + j % a.per_block;
}

size_t index_score_smem(int64_t H, int64_t d) { return size_t(H * d + H + kScoreKeys * (d + 1)) * 4; }

// Block (key tile of kScoreKeys, t): scores[t, j] for j < usable[t]. The tile's key rows are
// staged in shared memory (rows padded to d + 1 floats: lane-per-key reads are conflict-free);
// warp w takes heads [w * hpw, (w + 1) * hpw), lane l keys l and l + 32, and the warps' partial
// sums are added in warp order (the same order for every key: copies of a key score equal). A key
// row outside the pool scores NaN (sorts first, so the bad row reaches the output).
// smem: q_t [H*d], w_t [H], keys [kScoreKeys][d + 1].
__global__ void __launch_bounds__(kScoreThreads) index_score_kernel(IndexArgs a) {
  pdl_prologue();
  extern __shared__ __align__(16) float sm[];
  __shared__ int64_t rows[kScoreKeys];
  __shared__ float partial[kScoreThreads / 32][kScoreKeys];
  const int64_t H = a.H, d = a.d, t = blockIdx.y, j0 = int64_t(blockIdx.x) * kScoreKeys;
  const int64_t n = a.usable[t] < a.n_max ? a.usable[t] : a.n_max;
  if (j0 >= n) return;  // whole block
  float* qs = sm;
  float* wsm = sm + H * d;
  float* ks = wsm + H;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < kScoreKeys) {
    const int64_t j = j0 + tid;
    int64_t row = -1;
    if (j < n) {
      row = paged_row(a, t, j);
      if (row < 0 || row >= a.N) row = -2;  // outside the pool
    }
    rows[tid] = row;
  }
  block_copy_to_smem(qs, a.q + t * H * d, H * d);
  block_copy_to_smem(wsm, a.w + t * H, H);
  __syncthreads();
  // Stage the keys, 8 loads per thread in flight.
  const int64_t slots = kScoreKeys * d;
  for (int64_t s0 = tid; s0 < slots; s0 += int64_t(blockDim.x) * 8) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t slot = s0 + int64_t(u) * blockDim.x, kk = slot / d;
      v[u] = slot < slots && rows[kk] >= 0 ? a.keys[rows[kk] * d + slot % d] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t slot = s0 + int64_t(u) * blockDim.x;
      if (slot < slots) ks[(slot / d) * (d + 1) + slot % d] = v[u];
    }
  }
  __syncthreads();
  const int64_t hpw = (H + kScoreThreads / 32 - 1) / (kScoreThreads / 32);
  const int64_t hb = warp * hpw, he = hb + hpw < H ? hb + hpw : H;
  const float* k0 = ks + int64_t(lane) * (d + 1);
  const float* k1 = ks + int64_t(lane + 32) * (d + 1);
  float total0 = 0.f, total1 = 0.f;
  for (int64_t h0 = hb; h0 < he; h0 += kScoreHeads) {
    float acc0[kScoreHeads], acc1[kScoreHeads];
#pragma unroll
    for (int h = 0; h < kScoreHeads; ++h) acc0[h] = acc1[h] = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float x0 = k0[i], x1 = k1[i];
#pragma unroll
      for (int h = 0; h < kScoreHeads; ++h) {
        if (h0 + h < he) {
          const float qv = qs[(h0 + h) * d + i];
          acc0[h] = fmaf(qv, x0, acc0[h]);
          acc1[h] = fmaf(qv, x1, acc1[h]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kScoreHeads; ++h)
      if (h0 + h < he) {
        total0 += wsm[h0 + h] * fmaxf(0.f, acc0[h]);
        total1 += wsm[h0 + h] * fmaxf(0.f, acc1[h]);
      }
  }
  partial[warp][lane] = total0;
  partial[warp][lane + 32] = total1;
  __syncthreads();
  if (tid < kScoreKeys && j0 + tid < n) {
    float total = 0.f;
    for (int w = 0; w < kScoreThreads / 32; ++w) total += partial[w][tid];
    a.scores[t * a.n_max + j0 + tid] = rows[tid] == -2 ? __int_as_float(0x7fc00000) : total * a.w_scale;
  }
}

// Tensor-core scoring of index-QAT operands (a.qat_operands: every q and key value is an E2M1
// code times a power of two, so a BF16 value exactly and each product exact in FP32). Block (key
// tile of kTcScoreKeys, group of kTcScoreQueries consecutive query rows): warp w holds keys
// [32w, 32w + 32) of the tile as mma A fragments in registers (rows = keys; the sequence's keys,
// reloaded only when a query of another sequence comes), and the queries pass through shared
// memory as BF16 (q [H][d] padded rows + w [H]), the next one landing by cp.async in an FP32
// stage while the current one is scored. Per query, n-tile by n-tile (8 heads), S = keys x heads
// on mma.sync m16n8k16 BF16 with FP32 accumulators; the thread folds w_h * relu(s) of its two
// heads per n-tile into its keys' sums in head order, and the 4 lanes of a key row add theirs by xor shuffles: the same order for
// every key, so copies of a key score equal. The MMA's k index i maps to the row's dims
// {4c, 4c+1} (i = 2c, 2c+1) and {4c+2, 4c+3} (i = 2c+8, 2c+9) of each 16-dim step, alike for
// keys and queries (a permutation of the dot's terms): each thread's operands are 4 adjacent dims.
constexpr int kTcScoreWarps = 16;
constexpr int kTcScoreKeys = kTcScoreWarps * 32;
constexpr int kTcScoreQueries = 32;
constexpr int kTcScoreDim = 128;
constexpr int kTcScoreMaxHeads = 64;
constexpr int kTcScoreQRow = kTcScoreDim + 16;  // BF16 stride 288 B (72 words = 8 mod 32): a warp's
                                                // 8-byte fragment loads of 8 heads x 4 lanes hit
                                                // 32 distinct banks per half-warp
constexpr int kTcScoreQChunks = kTcScoreMaxHeads * kTcScoreDim / 4 / (kTcScoreWarps * 32);  // float4 per thread

// [2][H][kTcScoreQRow] BF16 queries, [2][H] w, [H * d] FP32 stage.
size_t index_score_tc_smem(int64_t H) { return size_t(H) * (2 * kTcScoreQRow * 2 + 2 * 4 + kTcScoreDim * 4); }

// From 16 query rows per sequence on average (prefill chunks): a block reloads its keys for each
// query of another sequence, so decode batches (a row or a few per sequence) keep the SIMT kernel,
// whose blocks each take one query. DSV4_CUDA_INDEX_TC=0: the SIMT kernel always (A/B).
bool index_score_on_tensor_cores(const IndexArgs& a) {
  static const bool on = env_flag_default_on("DSV4_CUDA_INDEX_TC");
  return on && a.qat_operands && a.d == kTcScoreDim && a.H % 8 == 0 && a.H <= kTcScoreMaxHeads && a.T >= 16 * a.S &&
         mma_sync_available();
}

__global__ void __launch_bounds__(kTcScoreWarps * 32, 1) index_score_tc_kernel(IndexArgs a) {
  pdl_prologue();
  extern __shared__ __align__(16) uint8_t tc_score_raw[];
  const int H = int(a.H), tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  // Buffer b: q at qs + b * H * kTcScoreQRow, w at ws + b * H.
  uint16_t* const qs = reinterpret_cast<uint16_t*>(tc_score_raw);
  float* const ws = reinterpret_cast<float*>(qs + 2 * H * kTcScoreQRow);
  float* const stage = ws + 2 * H;
  const int64_t j0 = int64_t(blockIdx.x) * kTcScoreKeys, jw = j0 + warp * 32;
  const int64_t t_end = min(a.T, int64_t(blockIdx.y + 1) * kTcScoreQueries);
  auto keys_of = [&](int64_t t) { return a.usable[t] < a.n_max ? int64_t(a.usable[t]) : a.n_max; };
  auto next_live = [&](int64_t t) {  // first query row from t that scores a key of this tile
    while (t < t_end && keys_of(t) <= j0) ++t;
    return t;
  };
  // A thread converts the chunks it copied itself: no barrier between the copy and the convert.
  float wv = 0.f;
  auto load_query = [&](int64_t t) {
    const float* src = a.q + t * H * kTcScoreDim;
#pragma unroll
    for (int u = 0; u < kTcScoreQChunks; ++u) {
      const int i = tid + u * kTcScoreWarps * 32;
      if (i < H * kTcScoreDim / 4) cp_async16(stage + 4 * i, src + 4 * i);
    }
    cp_async_commit();
    if (tid < H) wv = a.w[t * H + tid];
  };
  auto store_query = [&](int b) {
    cp_async_wait<0>();
#pragma unroll
    for (int u = 0; u < kTcScoreQChunks; ++u) {
      const int i = tid + u * kTcScoreWarps * 32;
      if (i < H * kTcScoreDim / 4) {
        const float4 v = *reinterpret_cast<const float4*>(stage + 4 * i);
        *reinterpret_cast<uint2*>(qs + (b * H + i / (kTcScoreDim / 4)) * kTcScoreQRow + (i % (kTcScoreDim / 4)) * 4) =
            make_uint2(bf16x2_rn(v.x, v.y), bf16x2_rn(v.z, v.w));
      }
    }
    if (tid < H) ws[b * H + tid] = wv;
  };
  // A fragments of the warp's 32 keys: [m-tile][k-step][4]; rows outside the pool score NaN.
  uint32_t ka[2][kTcScoreDim / 16][4];
  bool bad[2][2] = {};
  int32_t loaded_seq = -1;
  auto load_keys = [&](int64_t t) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t j = jw + mt * 16 + half * 8 + g;
        int64_t row = -1;
        if (j < a.n_max) {
          row = paged_row(a, t, j);
          if (row < 0 || row >= a.N) row = -2;
        }
        bad[mt][half] = row == -2;
        const float4* kr = reinterpret_cast<const float4*>(a.keys + (row >= 0 ? row : 0) * kTcScoreDim) + c;
#pragma unroll
        for (int ks = 0; ks < kTcScoreDim / 16; ++ks) {
          const float4 v = row >= 0 ? kr[ks * 4] : make_float4(0.f, 0.f, 0.f, 0.f);
          ka[mt][ks][half] = bf16x2_rn(v.x, v.y);
          ka[mt][ks][half + 2] = bf16x2_rn(v.z, v.w);
        }
      }
  };
  int64_t t = next_live(int64_t(blockIdx.y) * kTcScoreQueries);
  if (t >= t_end) return;  // whole block
  load_query(t);
  store_query(0);
  __syncthreads();
  for (int b = 0; t < t_end; b ^= 1) {
    const int64_t next = next_live(t + 1), n = keys_of(t);
    if (next < t_end) load_query(next);  // in flight while t is scored
    if (jw < n) {
      if (a.query_seq[t] != loaded_seq) {
        load_keys(t);
        loaded_seq = a.query_seq[t];
      }
      float sum[2][2] = {};
      for (int nt = 0; nt < H / 8; ++nt) {
        float acc[2][4] = {};
        const uint16_t* qrow = qs + (b * H + nt * 8 + g) * kTcScoreQRow + 4 * c;
#pragma unroll
        for (int ks = 0; ks < kTcScoreDim / 16; ++ks) {
          const uint2 bv = *reinterpret_cast<const uint2*>(qrow + ks * 16);
          const uint32_t bq[2] = {bv.x, bv.y};
          mma_bf16(acc[0], ka[0][ks], bq);
          mma_bf16(acc[1], ka[1][ks], bq);
        }
        const float2 wh = *reinterpret_cast<const float2*>(ws + b * H + nt * 8 + 2 * c);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            sum[mt][half] = fmaf(wh.x, fmaxf(0.f, acc[mt][2 * half]), sum[mt][half]);
            sum[mt][half] = fmaf(wh.y, fmaxf(0.f, acc[mt][2 * half + 1]), sum[mt][half]);
          }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float v = sum[mt][half];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          const int64_t j = jw + mt * 16 + half * 8 + g;
          if (c == 0 && j < n) a.scores[t * a.n_max + j] = bad[mt][half] ? __int_as_float(0x7fc00000) : v * a.w_scale;
        }
    }
    if (next < t_end) store_query(b ^ 1);
    __syncthreads();
    t = next;
  }
}

__device__ __forceinline__ uint32_t ordered(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kTopkThreads = 1024;

// (ordered score, -j): unique per key, larger = better; ties of the score go to the lower j.
__device__ __forceinline__ unsigned long long rank_key(uint32_t u, int64_t j) {
  return (uint64_t(u) << 32) | uint64_t(0xffffffffu - uint32_t(j));
}

// Block per row, any number of keys: a radix select finds the K-th largest ordered score (four
// passes of 8 bits, a shared histogram each), the winners are gathered (every key above it, and
// the lowest-j keys equal to it, in j order through a block scan), then sorted descending in
// shared memory ([P] slots, P = K rounded up to a power of two) and written as pool rows.
__global__ void __launch_bounds__(kTopkThreads) topk_kernel(IndexArgs a, int64_t P) {
  pdl_prologue();
  extern __shared__ unsigned long long picked[];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_need, s_above;
  using Scan = cub::BlockScan<uint32_t, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan;
  const int64_t t = blockIdx.x, n = a.usable[t] < a.n_max ? a.usable[t] : a.n_max, K = a.K;
  const float* row = a.scores + t * a.n_max;
  const bool take_all = n <= K;
  uint32_t prefix = 0, mask = 0, need = uint32_t(K);  // winners still to find under `prefix`
  for (int shift = 24; shift >= 0 && !take_all; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const uint32_t u = ordered(row[j]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t above = 0;
      int digit = 255;
      for (; digit > 0 && above + hist[digit] < need; --digit) above += hist[digit];
      s_prefix = prefix | (uint32_t(digit) << shift);
      s_need = need - above;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= 0xffu << shift;
  }
  // Keys above `prefix` fill slots [0, K - need) in any order; keys equal to it take the `need`
  // slots after them, lowest j first.
  if (threadIdx.x == 0) s_above = 0;
  __syncthreads();
  const uint32_t first_tie = uint32_t(K) - need;
  uint32_t ties_before = 0;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const uint32_t u = j < n ? ordered(row[j]) : 0u;
    const bool above = j < n && (take_all || u > prefix), tie = j < n && !take_all && u == prefix;
    uint32_t rank, ties;
    Scan(scan).ExclusiveSum(tie ? 1u : 0u, rank, ties);
    if (above) picked[atomicAdd(&s_above, 1u)] = rank_key(u, j);
    if (tie && ties_before + rank < need) picked[first_tie + ties_before + rank] = rank_key(u, j);
    ties_before += ties;
    __syncthreads();  // the scan's storage is reused
  }
  const int64_t taken = take_all ? n : K;
  for (int64_t i = taken + threadIdx.x; i < P; i += blockDim.x) picked[i] = 0ull;  // sorts last
  __syncthreads();
  for (int64_t k = 2; k <= P; k <<= 1)
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
        const int64_t l = i ^ j;
        if (l > i) {
          const unsigned long long x = picked[i], y = picked[l];
          if (((i & k) == 0) ? (x < y) : (x > y)) {
            picked[i] = y;
            picked[l] = x;
          }
        }
      }
      __syncthreads();
    }
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
    a.idx[t * K + i] = i < taken ? int32_t(paged_row(a, t, int64_t(0xffffffffu - uint32_t(picked[i] & 0xffffffffu)))) : -1;
}

// Query rows from which packed (production) attention takes the tensor-core kernel (prefill
// chunks); decode batches (up to 64 sequences measured) keep the split-K kernel, which spreads
// few queries' keys over the chip.
constexpr int64_t kAttendTcMinRows = 128;

bool attend_on_tensor_cores(const AttendArgs& a) {
  const bool fits =
      mma_sync_available() && device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>() >= int(sizeof(TcSmem));
  return fits && a.packed && a.d == kTcDim && a.nope == kTcNope && a.H % kTcHeads == 0 && a.T >= kAttendTcMinRows;
}

void launch_attend_tc(const AttendArgs& a, cudaStream_t s) {
  // This step's keys as packed rows (they hold what quantize_kv leaves, so the rows decode to
  // them exactly): every key of a tile is then gathered and decoded the same way.
  uint8_t* fresh_rows = reinterpret_cast<uint8_t*>(a.scratch);
  pack_kv(a.fresh, a.n_fresh, a.d, a.nope, fresh_rows, s);
  const KeySources<true> ks = key_sources<true>(a);
  static const bool allowed = (allow_smem(attend_tc_kernel, sizeof(TcSmem)), true);
  (void)allowed;
  launch_pdl(attend_tc_kernel, dim3(unsigned(a.T), unsigned(a.H / kTcHeads)), kTcWarps * 32, sizeof(TcSmem), s, a.q,
             a.H, ks, fresh_rows, a.idx_a, a.Ka, a.idx_b, a.Kb, a.sinks, a.scale, a.out);
  DSV4_LAUNCH_CHECK();
}

}  // namespace

int64_t attend_splits(int64_t T, int64_t H, int64_t Ka, int64_t Kb) {
  // Enough blocks for two waves of the SMs, at least one key tile per split.
  const int64_t blocks = T * ((H + kHG - 1) / kHG), tiles = (Ka + Kb + kTileKeys - 1) / kTileKeys;
  const int64_t want = (2 * sm_count() + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min({want, tiles, int64_t(kMaxSplits)}));
}
int64_t attend_scratch_floats(const AttendArgs& a) {
  if (attend_on_tensor_cores(a)) return std::max<int64_t>(1, (a.n_fresh * kTcLayout.bytes + 3) / 4);
  const int64_t S = attend_splits(a.T, a.H, a.Ka, a.Kb);
  return S > 1 ? a.T * a.H * S * (a.d + 3) : 1;
}

void attend(const AttendArgs& a, cudaStream_t s) {
  if (a.T <= 0 || a.H <= 0) return;
  if (attend_on_tensor_cores(a)) return launch_attend_tc(a, s);
  if (a.d > kMaxDpt * 256) {
    std::fprintf(stderr, "attend: head_dim %lld exceeds %d\n", (long long)a.d, kMaxDpt * 256);
    std::abort();
  }
  // Groups of 4 values need 4-aligned parts of the row (every model and test shape has them).
  const bool by4 = a.d % 4 == 0 && a.nope % 4 == 0;
  if (a.packed) by4 ? launch_attend<true, 4>(a, s) : launch_attend<true, 1>(a, s);
  else by4 ? launch_attend<false, 4>(a, s) : launch_attend<false, 1>(a, s);
}

void compress(const CompressArgs& a, cudaStream_t s) {
  if (a.S <= 0 || a.d <= 0) return;
  if (a.overlap && a.ratio > kCompressMaxRatio) {
    std::fprintf(stderr, "compress: an overlapping compressor of ratio %lld exceeds %d\n", (long long)a.ratio,
                 kCompressMaxRatio);
    std::abort();
  }
  // A sequence completes at most T / ratio + 1 windows; blocks stride over them, at most 2,048
  // blocks per channel slice in all (a decode batch of many one-row sequences launches few
  // empty blocks; one prefill chunk gets a block per window up to 8K rows at ratio 4).
  const unsigned channels = unsigned((a.d + 127) / 128);
  const int64_t windows = std::clamp<int64_t>(std::min<int64_t>(a.T / a.ratio + 1, 2048 / a.S), 1, 65535);
  if (a.entries)
    launch_pdl(compress_pool_kernel, dim3(channels, unsigned(windows), unsigned(a.S)), 128, 0, s, a);
  DSV4_LAUNCH_CHECK();
  launch_pdl(compress_state_kernel, dim3(channels, unsigned(a.S)), 128, 0, s, a);
  DSV4_LAUNCH_CHECK();
}

void index_topk(const IndexArgs& a, cudaStream_t s) {
  if (a.T <= 0) return;
  int64_t P = 1;
  while (P < a.K) P <<= 1;
  const size_t topk_smem = size_t(P) * 8;
  allow_smem(topk_kernel, topk_smem);
  const size_t score_smem = index_score_smem(a.H, a.d), tc_smem = index_score_tc_smem(a.H);
  const bool tensor_cores = index_score_on_tensor_cores(a);
  if (tensor_cores) allow_smem(index_score_tc_kernel, tc_smem);
  else allow_smem(index_score_kernel, score_smem);
  // Query rows in tiles of score_rows: the scores scratch holds one tile.
  for (int64_t t0 = 0; t0 < a.T; t0 += a.score_rows) {
    IndexArgs b = a;
    b.T = std::min(a.score_rows, a.T - t0);
    b.q += t0 * a.H * a.d;
    b.w += t0 * a.H;
    b.query_seq += t0;
    b.usable += t0;
    b.idx += t0 * a.K;
    if (b.n_max > 0 && tensor_cores) {
      const dim3 grid(unsigned((b.n_max + kTcScoreKeys - 1) / kTcScoreKeys),
                      unsigned((b.T + kTcScoreQueries - 1) / kTcScoreQueries));
      launch_pdl(index_score_tc_kernel, grid, kTcScoreWarps * 32, tc_smem, s, b);
      DSV4_LAUNCH_CHECK();
    } else if (b.n_max > 0) {
      dim3 grid(unsigned((b.n_max + kScoreKeys - 1) / kScoreKeys), unsigned(b.T));
      launch_pdl(index_score_kernel, grid, kScoreThreads, score_smem, s, b);
      DSV4_LAUNCH_CHECK();
    }
    launch_pdl(topk_kernel, unsigned(b.T), kTopkThreads, topk_smem, s, b, P);
    DSV4_LAUNCH_CHECK();
  }
}

}  // namespace dsv4::cuda
