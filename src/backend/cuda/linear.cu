// GEMM family: y = x W^T for every weight format, weights dequantised in-kernel, FP32
// accumulation ("exact mode"). Two kernels, both templated on the format:
//  - gemv: one warp per output feature streams its weight row once and applies it to up to 8
//    activation rows at a time (decode; memory bound);
//  - tiled: 64x64 output tiles with the dequantised weight tile in shared memory (prefill).
// Both also serve grouped projections and the MoE's per-expert problems (blockIdx.z).
#include <algorithm>
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/gemm_problem.cuh"
#include "backend/cuda/mma.cuh"

namespace dsv4::cuda {

namespace {

constexpr int kRB = 8;  // activation rows per pass of the GEMV kernel

// The GEMV streams each weight row in 16-byte chunks, one 128-bit load per chunk; a chunk holds
// 16 FP8, 32 FP4, 8 BF16 or 4 F32 elements and lies inside one scale block (FP8 128 columns, FP4
// 32), so the scale multiplies the chunk's dot product once instead of every element.
template <int FMT>
constexpr int kChunkElems = FMT == kFP8 ? 16 : FMT == kFP4 ? 32 : FMT == kBF16 ? 8 : 4;
// Chunks per lane per load group: a warp has 8 x 16 B per lane (4 KB) in flight before the math
// (one 16-byte load per lane measured 0.26-0.9 TB/s; 8 reached 3.9 TB/s on the BF16 lm_head).
// Double-buffering 4 + 4 by copying the next group into the current one measured worse (head
// 272 -> 474 us), most likely because the copy waits for the loads. Fewer with kRB rows per pass,
// whose accumulators need the registers.
template <int RB>
constexpr int kGemvUnroll = RB == 1 ? 8 : 4;

// Weights are read once per step: no L1 allocation, so the activation rows stay in L1.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <int FMT, bool SF32>
__device__ __forceinline__ float chunk_scale(const WeightDesc& w, int64_t r, int64_t c) {
  if constexpr (FMT == kFP8) return scale_at<SF32>(w.s, (r / 128) * ((w.in + 127) / 128) + c / 8);
  else if constexpr (FMT == kFP4) return scale_at<SF32>(w.s, r * (w.in / 32) + c);
  else return 1.f;
}

// Unscaled dot product of a decoded chunk (4Q values) with its x values, stored transposed in
// shared memory: float4 e of chunk c at xs[e * stride + c] (both GEMV kernels' layout).
template <int Q>
__device__ __forceinline__ float chunk_dot(const float* wv, const float4* xs, int64_t stride, int64_t c) {
  float d = 0.f;
#pragma unroll
  for (int e = 0; e < Q; ++e) {
    const float4 xv = xs[e * stride + c];
    d = fmaf(wv[4 * e], xv.x, d);
    d = fmaf(wv[4 * e + 1], xv.y, d);
    d = fmaf(wv[4 * e + 2], xv.z, d);
    d = fmaf(wv[4 * e + 3], xv.w, d);
  }
  return d;
}

// Activation tile in shared memory, transposed so that the warp's reads are conflict-free: a
// lane's chunk needs E consecutive x values, which straight from global memory means lanes 64 or
// 128 bytes apart (16-32 L1 wavefronts per float4 load: the FP8/FP4 GEMV ran at 0.3-1.2 TB/s
// while BF16, 2 loads per chunk, reached 4 TB/s). Layout [RB][E/4][CT] float4 for CT chunks of
// the tile: lane L reads float4 q of its chunk at consecutive 16-byte slots. 32 KB either way.
template <int RB>
constexpr int kGemvTileK = RB == 1 ? 8192 : 1024;
constexpr int kGemvThreads = 256;
template <int RB>
constexpr size_t gemv_smem_bytes() { return size_t(RB) * kGemvTileK<RB> * sizeof(float); }

// The warp's chunk stream: rows n0 .. n0 + rows - 1 of the tile's ct chunks each, flattened
// (g = row * ct + chunk). With rows > 1, ct % 32 == 0, so the 32 chunks of a load step share one
// row (warp-uniform row changes).
struct ChunkStream {
  const uint4* w;  // weight rows as 16-byte chunks
  int64_t nchunks, row0, cb;  // chunks per row, first weight row, first chunk of the tile
  int ct, rows;
};

// Load group starting at flat chunk g0 + lane: U chunks 32 apart, with their scales.
template <int FMT, bool SF32, int U>
__device__ __forceinline__ void load_chunks(uint4 (&q)[U], float (&sc)[U], const ChunkStream& cs, int g0, int lane,
                                            const WeightDesc& w) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int gu = g0 + u * 32;  // warp-uniform
    if (gu < cs.rows * cs.ct) {
      const int i = cs.rows == 1 ? 0 : gu / cs.ct, c = gu - i * cs.ct + lane;  // no division on long rows
      if (c < cs.ct) {
        q[u] = load_stream(cs.w + (cs.row0 + i) * cs.nchunks + cs.cb + c);
        sc[u] = chunk_scale<FMT, SF32>(w, cs.row0 + i, cs.cb + c);
      }
    }
  }
}

// One warp per `rpw` consecutive output features (rows per warp: 1, or more for short rows so
// that each warp streams a few KB): each weight row is streamed once and applied to up to RB
// activation rows per pass (decode; memory bound). RB = 1 (one token) or kRB. vec: 16-byte
// chunks (K % elements-per-chunk == 0, 16-byte aligned rows) with x tiles in shared memory;
// otherwise one element per lane, x from global memory. rpw > 1 needs RB = 1, K <= the tile and
// K / E % 32 == 0 (host checks).
template <int FMT, bool SF32, int RB>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kernel(GemmArgs a, bool vec, int rpw) {
  pdl_prologue();
  constexpr int E = kChunkElems<FMT>, U = kGemvUnroll<RB>, KT = kGemvTileK<RB>, CT = KT / E, Q = E / 4;
  extern __shared__ float4 xs[];  // [RB][Q][CT]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = (int64_t(blockIdx.x) * (blockDim.x >> 5) + warp) * rpw;
  const int rows_w = int(a.N - n0 < rpw ? (a.N - n0 > 0 ? a.N - n0 : 0) : rpw);  // 0: inactive warp
  const bool active = rows_w > 0;  // inactive warps still stage x and meet the barriers
  const Problem p = problem(a);
  const int64_t K = a.K, nchunks = K / E;
  for (int64_t r0 = int64_t(blockIdx.y) * RB; r0 < p.rows; r0 += int64_t(gridDim.y) * RB) {
    const int nb = int(p.rows - r0 < RB ? p.rows - r0 : RB);
    float acc[RB];
#pragma unroll
    for (int b = 0; b < RB; ++b) acc[b] = 0.f;
    int cur = 0;  // the row of the warp's stream that acc belongs to
    auto flush = [&](int i) {
#pragma unroll
      for (int b = 0; b < RB; ++b) {
        const float v = warp_sum(acc[b]);
        if (lane == 0 && b < nb) p.y[(p.base + r0 + b) * a.ldy + n0 + i] = v;
        acc[b] = 0.f;
      }
    };
    if (vec) {
      for (int64_t k0 = 0; k0 < K; k0 += KT) {
        ChunkStream cs;
        cs.w = reinterpret_cast<const uint4*>(p.w.w);
        cs.nchunks = nchunks;
        cs.row0 = p.wrow0 + n0;
        cs.cb = k0 / E;
        cs.ct = int((K - k0 < KT ? K - k0 : KT) / E);
        cs.rows = rows_w;
        const int G = rows_w * cs.ct;
        uint4 q[U] = {};
        float sc[U] = {};
        // Weight loads first: their latency overlaps the x staging.
        load_chunks<FMT, SF32, U>(q, sc, cs, 0, lane, p.w);
        __syncthreads();  // the previous tile is consumed
        constexpr int kSlots = RB * KT / 4, kPerThread = kSlots / kGemvThreads;
        static_assert(kSlots % kGemvThreads == 0);
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          const int slot = i * kGemvThreads + threadIdx.x, b = slot / (KT / 4), k = (slot % (KT / 4)) * 4;
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
          if (b < nb && k < cs.ct * E) v = *reinterpret_cast<const float4*>(x_row(a, p, r0 + b) + k0 + k);
          xs[(b * Q + (k % E) / 4) * CT + k / E] = v;
        }
        __syncthreads();
        for (int g0 = 0; g0 < G; g0 += 32 * U) {
          if (g0 > 0) load_chunks<FMT, SF32, U>(q, sc, cs, g0, lane, p.w);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int gu = g0 + u * 32;  // warp-uniform
            if (gu >= G) continue;
            const int i = cs.rows == 1 ? 0 : gu / cs.ct, c = gu - i * cs.ct + lane;  // no division on long rows
            if (i != cur) {  // rows > 1 only: the row is complete
              flush(cur);
              cur = i;
            }
            if (c >= cs.ct) continue;
            float wv[E];
            decode_chunk<FMT>(q[u], wv);
#pragma unroll
            for (int b = 0; b < RB; ++b) {
              if (b < nb) {
                acc[b] = fmaf(sc[u], chunk_dot<Q>(wv, xs + b * Q * CT, CT, c), acc[b]);
              }
            }
          }
        }
      }
    } else if (active) {
      for (int64_t k = lane; k < K; k += 32) {  // rpw == 1 here
        const float wv = wload1<FMT, SF32>(p.w, p.wrow0 + n0, k);
#pragma unroll
        for (int b = 0; b < RB; ++b)
          if (b < nb) acc[b] = fmaf(wv, x_row(a, p, r0 + b)[k], acc[b]);
      }
    }
    if (active) flush(cur);
  }
}

// ---- one activation row: persistent, cp.async-pipelined weight stream ----------------------
// The GEMV above keeps one group of loads in flight per warp in registers and stages x once per
// block of a few rows: ~1.4 TB/s on the FP8 decode shapes, because the load latency is paid once
// per group and every block starts with an x staging round trip. Here blocks are persistent
// (about two per SM, x staged once) and each warp streams its rows, one after another (warp w of
// W takes rows w, w + W, ...), through a ring of kStages shared-memory stages filled with
// cp.async: kStages - 1 stages (kStepsPerStage x 32 chunks of 16 B each) stay in flight while
// the warp computes on the oldest. Each lane consumes only the chunks it copied, so the ring
// needs no barrier, only cp.async.wait_group. Chunk scales are prefetched into registers with the
// same lead. Needs: vec rows, chunks per row % 32 == 0, K <= kGemvTileK<1>.
constexpr int kStages = 4, kStepsPerStage = 4;
// Up to this many problems per launch (dense, the grouped wo_a, the MoE of one token). With more
// (48 expert slices at 8 tokens) each persistent warp streams ~50 rows and the launch measured
// 1.5x slower than the non-persistent GEMV (H200, 2026-12-02, 8c7e426: MoE layer 1.19 vs 0.77 ms).
constexpr int kStreamMaxProblems = 8;
constexpr int kStreamRing = kGemvThreads / 32 * kStages * kStepsPerStage * 32;  // uint4 slots per block

// Position in a warp's stream: weight row n (of the problem), which weight (W1 or, with
// SwiGLU, W3), 32-chunk step within the row.
struct StreamPos {
  int64_t n;
  int64_t step;
  int part;
  __device__ __forceinline__ void advance(int64_t steps_per_row, int64_t warps, int parts) {
    if (++step == steps_per_row) {
      step = 0;
      if (++part == parts) {
        part = 0;
        n += warps;
      }
    }
  }
};

size_t stream_gemv_smem(int64_t K) { return size_t((K + 3) / 4 * 4) * 4 + size_t(kStreamRing) * 16; }

// kSwiglu: each row n is streamed twice, from W1 then from W3 (the problem's twin), and y gets
// silu(min(a1, L)) * clamp(a3, -L, L): both products and the SwiGLU in one pass.
template <int FMT, bool SF32, bool kSwiglu>
__global__ void __launch_bounds__(kGemvThreads, 2) stream_gemv_kernel(GemmArgs a) {
  // A dense problem starts streaming its first row's weights before waiting for the previous kernel.
  const bool early = problem_known_before_wait(a);
  if (!early) pdl_wait();
  constexpr int E = kChunkElems<FMT>, Q = E / 4, U = kStepsPerStage;
  extern __shared__ float4 sm4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Problem p = problem(a);
  const int64_t K = a.K, nchunks = K / E, spr = nchunks / 32, ct = nchunks;
  const int64_t warps = int64_t(gridDim.x) * (kGemvThreads / 32), wid = int64_t(blockIdx.x) * (kGemvThreads / 32) + warp;
  float4* xs = sm4;  // [Q][ct]: lane L's chunk c reads float4 q at xs[q * ct + c]
  uint4* ring = reinterpret_cast<uint4*>(sm4 + (K + 3) / 4) + warp * kStages * U * 32;  // [stage][u][lane]
  constexpr int kParts = kSwiglu ? 2 : 1;
  const WeightDesc& w3 = kSwiglu ? p.w3 : p.w;  // the second part's weight (kSwiglu only)
  StreamPos in{wid, 0, 0}, out{wid, 0, 0};
  float sc[kStages][U];
  auto issue = [&](int slot) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (in.n < a.N) {
        const int64_t row = p.wrow0 + in.n, c = in.step * 32 + lane;
        const WeightDesc& w = in.part ? w3 : p.w;  // warp-uniform
        cp_async16(ring + (slot * U + u) * 32 + lane, reinterpret_cast<const uint4*>(w.w) + row * nchunks + c);
        sc[slot][u] = chunk_scale<FMT, SF32>(w, row, c);
        in.advance(spr, warps, kParts);
      }
    }
    cp_async_commit();
  };
  auto start_row = [&] {  // the first kStages - 1 stages of a row's stream
    in = out = StreamPos{wid, 0, 0};
#pragma unroll
    for (int j = 0; j < kStages - 1; ++j) issue(j);
  };
  if (early && p.rows > 0) start_row();
  if (early) pdl_wait();
  pdl_trigger();
  float a1 = 0.f;  // W1's product of the current row (SwiGLU)
  for (int64_t r = 0; r < p.rows; ++r) {
    __syncthreads();  // the previous row's x is consumed
    const float* xr = x_row(a, p, r);
    for (int64_t k = int64_t(threadIdx.x) * 4; k < K; k += int64_t(kGemvThreads) * 4) {
      float4 v = *reinterpret_cast<const float4*>(xr + k);
      if (a.x_roundtrip != GemmArgs::XRoundTrip::None) {  // a warp holds one 128-block (K % 128 == 0)
        const float amax = warp_max(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        const float sc = fp8_block_scale(amax, a.x_roundtrip == GemmArgs::XRoundTrip::Pow2);
        v = make_float4(fp8_roundtrip(v.x, sc), fp8_roundtrip(v.y, sc), fp8_roundtrip(v.z, sc), fp8_roundtrip(v.w, sc));
      }
      xs[((k % E) / 4) * ct + k / E] = v;
    }
    __syncthreads();
    if (r > 0 || !early) start_row();
    float acc = 0.f;
    while (out.n < a.N) {
#pragma unroll
      for (int j = 0; j < kStages; ++j) {
        cp_async_wait<kStages - 2>();  // this lane's copies of stage j have landed
        issue((j + kStages - 1) % kStages);  // into the slot consumed one stage ago
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (out.n >= a.N) break;
          float wv[E];
          decode_chunk<FMT>(ring[(j * U + u) * 32 + lane], wv);
          const int64_t c = out.step * 32 + lane;
          acc = fmaf(sc[j][u], chunk_dot<Q>(wv, xs, ct, c), acc);
          if (out.step == spr - 1) {  // row complete (warp-uniform)
            const float v = warp_sum(acc);
            acc = 0.f;
            if (kSwiglu && out.part == 0) {
              a1 = v;
            } else if (lane == 0) {
              p.y[(p.base + r) * a.ldy + out.n] = kSwiglu ? swiglu_value(a1, v, a.swiglu_limit) : v;
            }
          }
          out.advance(spr, warps, kParts);
        }
      }
    }
    cp_async_wait<0>();
  }
}

constexpr int kBM = 64, kBN = 64, kBK = 16;

template <int FMT, bool SF32>
__global__ void __launch_bounds__(256) tiled_kernel(GemmArgs a, bool vec) {
  pdl_prologue();
  __shared__ __align__(16) float xs[kBK][kBM + 4];
  __shared__ __align__(16) float ws[kBK][kBN + 4];
  const Problem p = problem(a);
  const int64_t r0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN, K = a.K, N = a.N;
  if (r0 >= p.rows) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int lr = tid / 4, lk = (tid % 4) * 4;
  const float* xrow = r0 + lr < p.rows ? x_row(a, p, r0 + lr) : nullptr;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + lk + j;
      xs[lk + j][lr] = (xrow && k < K) ? xrow[k] : 0.f;
    }
    if (vec) {
      if (tid < kBN) {
        float v[16];
        const int64_t n = n0 + tid;
        if (n < N) {
          wload16<FMT, SF32>(p.w, p.wrow0 + n, k0, v);
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < 16; ++j) ws[j][tid] = v[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int idx = tid * 4 + j, nn = idx / kBK, kk = idx % kBK;
        const int64_t n = n0 + nn, k = k0 + kk;
        ws[kk][nn] = (n < N && k < K) ? wload1<FMT, SF32>(p.w, p.wrow0 + n, k) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 xa = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
      const float4 wb = *reinterpret_cast<const float4*>(&ws[kk][tx * 4]);
      const float xv[4] = {xa.x, xa.y, xa.z, xa.w}, wv[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= p.rows) continue;
    float* yr = p.y + (p.base + r) * a.ldy;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < N) yr[n] = acc[i][j];
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <int F, bool S, bool kSwiglu>
void launch_stream_gemv(const GemmArgs& a, cudaStream_t stream) {
  // Persistent: about two blocks per SM in all, shared among the problems.
  constexpr int64_t warps = kGemvThreads / 32;
  const int64_t want = std::max<int64_t>(1, 2 * sm_count() / a.Z), need = (a.N + warps - 1) / warps;
  static std::atomic<uint64_t> raised{0};
  allow_dynamic_smem(raised, stream_gemv_kernel<F, S, kSwiglu>, stream_gemv_smem(kGemvTileK<1>));
  launch_pdl(stream_gemv_kernel<F, S, kSwiglu>, dim3(unsigned(std::min(want, need)), 1, unsigned(a.Z)), kGemvThreads,
             stream_gemv_smem(a.K), stream, a);
}

// Whether gemm() takes the one-row streaming kernel (vec rows, chunks % 32, K within the tile).
bool streams_one_row(const GemmArgs& a, int chunk_elems) {
  const bool rows16 = a.ldx % 4 == 0 && a.x_z_off % 4 == 0 && aligned16(a.x) && (a.descs || aligned16(a.wd.w));
  const bool one = a.expected_rows() == 1;
  return !a.xq && (a.max_rows <= kGemvMaxRows || a.force_gemv) && one && rows16 && a.K % chunk_elems == 0 &&
         (a.K / chunk_elems) % 32 == 0 && a.K <= kGemvTileK<1> && a.Z <= kStreamMaxProblems;
}

// Thread: an even-odd pair of values (an odd n's last value alone), split_bf16x3's parts.
__global__ void split_bf16_planes_kernel(const float* x, int64_t n, uint16_t* parts) {
  pdl_prologue();
  const int64_t pairs = (n + 1) / 2;
  for (int64_t i2 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i2 < pairs; i2 += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = 2 * i2;
    const bool second = i + 1 < n;
    uint32_t part[3];
    split_bf16x3(make_float2(x[i], second ? x[i + 1] : 0.f), part);
#pragma unroll
    for (int p = 0; p < 3; ++p) {
      parts[p * n + i] = uint16_t(part[p]);
      if (second) parts[p * n + i + 1] = uint16_t(part[p] >> 16);
    }
  }
}

// Thread: one 16-byte chunk (16 elements) of the weight.
__global__ void fp8_weight_to_bf16_kernel(WeightDesc w, uint16_t* out) {
  pdl_prologue();
  const int64_t chunks = w.out * w.in / 16;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < chunks; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / (w.in / 16), c = i % (w.in / 16);
    float v[16];
    decode_chunk<kFP8>(reinterpret_cast<const uint4*>(w.w)[i], v);
    const float s = chunk_scale<kFP8, false>(w, r, c);
    uint32_t packed[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) packed[j] = bf16x2_rn(v[2 * j] * s, v[2 * j + 1] * s);
    uint4* o = reinterpret_cast<uint4*>(out + i * 16);
    o[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    o[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
}

}  // namespace

void split_bf16_planes(const float* x, int64_t n, uint16_t* parts, cudaStream_t stream) {
  if (n <= 0) return;
  launch_pdl(split_bf16_planes_kernel, dim3(unsigned(std::min(blocks_for(n), sm_count() * 16))), 256, 0, stream, x, n, parts);
  DSV4_LAUNCH_CHECK();
}

void fp8_weight_to_bf16(const WeightDesc& w, uint16_t* out, cudaStream_t stream) {
  if (w.fmt != kFP8 || w.scale_f32 || w.in % 16) {
    std::fprintf(stderr, "fp8_weight_to_bf16: needs an FP8 weight with E8M0 scales and in %% 16 == 0\n");
    std::abort();
  }
  const int64_t chunks = w.out * w.in / 16;
  if (chunks <= 0) return;
  launch_pdl(fp8_weight_to_bf16_kernel, dim3(unsigned(std::min(blocks_for(chunks), sm_count() * 16))), 256, 0, stream, w, out);
  DSV4_LAUNCH_CHECK();
}

bool gemm_rounds_x(const GemmArgs& a) {
  bool streams = false;
  dispatch_format(a.wd, [&]<int F, bool S>() { streams = streams_one_row(a, kChunkElems<F>); });
  return streams && a.K % 128 == 0;
}

// x_roundtrip set where no kernel applies it: a caller bug (it must ask gemm_rounds_x first).
static void check_roundtrip(const GemmArgs& a, const char* what) {
  if (a.x_roundtrip == GemmArgs::XRoundTrip::None || gemm_rounds_x(a)) return;
  std::fprintf(stderr, "%s: x_roundtrip set where gemm_rounds_x() is false\n", what);
  std::abort();
}

void gemm(const GemmArgs& a, cudaStream_t stream) {
  if (a.max_rows <= 0 || a.N <= 0 || a.Z <= 0) return;
  check_roundtrip(a, "gemm");
  if (a.xq) {
    gemm_fp8_tensor_core(a, stream);
    return;
  }
  // Vector loads need 16-element rows and 16-byte aligned x rows; weights live in 256-byte
  // aligned arena blocks (MoE descriptors too), so only the single descriptor is checked.
  const bool rows16 = a.ldx % 4 == 0 && a.x_z_off % 4 == 0 && aligned16(a.x) && (a.descs || aligned16(a.wd.w));
  if (gemm_skinny(a, false, stream)) return;  // BF16 weights, 2 to 64 rows: tensor cores
  const WeightDesc& fmt_of = a.wd;  // descs share the format of wd (the caller sets both)
  // A few hundred rows against a narrow BF16/F32 weight (the router, compressor and indexer
  // projections of a 64-sequence decode step) give the 64x64 tiled kernel fewer blocks than SMs,
  // each looping over all of K (H200: 12 calls 8.1 ms in a 4-layer step): the GEMV, 8 rows per
  // weight pass, instead (64-sequence step 153 -> 123 ms). Not for FP8/FP4 weights: the grouped
  // wo_a at 64 rows measured 0.36 ms tiled, 0.71 ms on the GEMV.
  const int64_t tiled_blocks = (a.N + kBN - 1) / kBN * ((a.max_rows + kBM - 1) / kBM) * a.Z;
  const bool few_tiles = (a.wd.fmt == kBF16 || a.wd.fmt == kF32) && tiled_blocks < sm_count() && a.max_rows <= 256;
  dispatch_format(fmt_of, [&]<int F, bool S>() {
    if (a.max_rows <= kGemvMaxRows || a.force_gemv || few_tiles) {
      constexpr int E = kChunkElems<F>;
      const bool vec = rows16 && a.K % E == 0;
      const int warps = kGemvThreads / 32;
      const int64_t gy = a.force_gemv ? 1 : (a.max_rows + kRB - 1) / kRB;
      // One activation row per pass when that is the expected count (one token; MoE slices
      // with about one row per expert); larger counts share each weight pass among kRB rows.
      const bool one = a.expected_rows() == 1;
      // Rows per warp: short rows (under 8 KB) are grouped so that a warp streams ~8 KB, while
      // keeping at least 16 warps per SM of work.
      int rpw = 1;
      const int64_t nchunks = a.K / E;
      if (one && vec && a.K <= kGemvTileK<1> && nchunks % 32 == 0) {
        const int64_t by_bytes = std::max<int64_t>(1, 512 / nchunks);  // 512 chunks = 8 KB
        const int64_t by_occupancy = std::max<int64_t>(1, a.N * a.Z / (int64_t(sm_count()) * 16));
        rpw = int(std::min<int64_t>({by_bytes, by_occupancy, 8}));
      }
      const int64_t per_block = int64_t(warps) * rpw;
      dim3 grid(unsigned((a.N + per_block - 1) / per_block), unsigned(gy), unsigned(a.Z));
      if (streams_one_row(a, E)) {
        launch_stream_gemv<F, S, false>(a, stream);
      } else if (one) {
        launch_pdl(gemv_kernel<F, S, 1>, grid, kGemvThreads, gemv_smem_bytes<1>(), stream, a, vec, rpw);
      } else {
        launch_pdl(gemv_kernel<F, S, kRB>, grid, kGemvThreads, gemv_smem_bytes<kRB>(), stream, a, vec, 1);
      }
    } else {
      const bool vec = rows16 && a.K % 16 == 0;
      dim3 grid(unsigned((a.N + kBN - 1) / kBN), unsigned((a.max_rows + kBM - 1) / kBM), unsigned(a.Z));
      launch_pdl(tiled_kernel<F, S>, grid, 256, 0, stream, a, vec);
    }
  });
  DSV4_LAUNCH_CHECK();
}

void gemm_swiglu(const GemmArgs& a, int64_t y_rows, float* h3, cudaStream_t stream) {
  if (a.max_rows <= 0 || a.N <= 0 || a.Z <= 0) return;
  if (a.ldy != a.N || a.y_z_off != 0) {
    std::fprintf(stderr, "gemm_swiglu: y must be dense rows [y_rows, N] (ldy %lld, N %lld)\n", (long long)a.ldy,
                 (long long)a.N);
    std::abort();
  }
  check_roundtrip(a, "gemm_swiglu");
  if (gemm_skinny(a, true, stream)) return;
  bool fused = false;
  dispatch_format(a.wd, [&]<int F, bool S>() {
    if (streams_one_row(a, kChunkElems<F>)) {
      launch_stream_gemv<F, S, true>(a, stream);
      fused = true;
    }
  });
  if (fused) {
    DSV4_LAUNCH_CHECK();
    return;
  }
  if (gemm_swiglu_warpgroup(a, stream)) return;
  GemmArgs a3 = a;
  a3.descs = a.descs3;
  a3.wd = a.wd3;
  a3.y = h3;
  gemm(a, stream);
  gemm(a3, stream);
  swiglu(a.y, h3, y_rows * a.N, a.swiglu_limit, stream);
}

}  // namespace dsv4::cuda
