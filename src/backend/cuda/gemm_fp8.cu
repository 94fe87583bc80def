// FP8-activation GEMMs, the official kernels' numerics (docs/MODEL.md §2.9):
//  - act_quant: activations to E4M3 in 1x128 blocks with FP32 (or power-of-two) scales;
//  - a tensor-core kernel (mma.sync m16n8k32 E4M3, sm_89 and newer: portable across Ada, Hopper
//    and Blackwell) for FP8 weights (128x128 block scales) and FP4 experts (E2M1 converted to
//    E4M3 exactly while staging, 1x32 scales). Partial sums are promoted to FP32 with their scales
//    once per scale block: every 128 of K for FP8 weights, every 32 for FP4.
// Products of E4M3/E2M1 values are exact in FP32, so the CPU twin (the FP32 GEMM on round-tripped
// activations) differs only in summation order.
// The weight-streaming kernel for few rows also serves BF16 weights with FP32 activations (the
// lm_head and the BF16 projections of speculative verification and decode batches): each x is
// split into three BF16 parts that sum to it exactly, so the tensor-core products are exact too.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include <nv/target>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cublaslt_gemm.h"
#include "backend/cuda/gemm_problem.cuh"
#include "backend/cuda/mma.cuh"
#include "tensor/quant.h"

namespace dsv4::cuda {

namespace {

// ---- activation quantisation: one warp per (row, 128-block) ----------------------------------
__global__ void act_quant_kernel(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q,
                                 int64_t ldq, float* scales, float* rt, uint16_t* bf16) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int64_t nkb = (K + 127) / 128;
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (w >= M * nkb) return;
  const int64_t m = w / nkb, kb = w % nkb;
  const float* xr = x + m * ldx;
  float v[4], amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * 128 + j * 32 + lane;
    v[j] = k < K ? xr[k] : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  const float s = fp8_block_scale(warp_max(amax), pow2);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * 128 + j * 32 + lane;
    if (k >= K) continue;
    const uint8_t e = fp8_quantise(v[j], s);
    if (q) q[m * ldq + k] = e;
    if (rt) rt[m * K + k] = e4m3_to_float(e) * s;
    if (bf16) bf16[m * ldq + wgmma_bf16_column(k, K)] = __bfloat16_as_ushort(__float2bfloat16_rn(e4m3_to_float(e) * s));
  }
  if (lane == 0 && scales) scales[kb * M + m] = s;
}

// ---- tensor-core GEMM --------------------------------------------------------------------------
constexpr int kTM = 64, kTN = 128, kTK = 128;  // tile; kTK = one activation scale block
constexpr int kRowBytes = kTK + 16;            // padded shared rows: conflict-free fragment loads

// FP4 scale folding: a weight row's four 32-groups of a 128-column stage whose power-of-two scales
// span at most 8 octaves are staged as E4M3 of value x 2^(e_g - e_max), exactly (2^-9 is E4M3's
// smallest step), with the one scale 2^e_max: partial sums are then promoted once per 128 columns
// instead of once per 32. Row j: the E4M3 codes of the E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4,
// 6) times 2^-j, as the two words e2m1x4_to_e4m3x4 permutes.
constexpr int kMaxFoldShift = 8;
__constant__ uint32_t kE2m1Shifted[kMaxFoldShift + 1][2] = {
    {0x3c383000u, 0x4c484440u}, {0x34302800u, 0x44403c38u}, {0x2c282000u, 0x3c383430u},
    {0x24201800u, 0x34302c28u}, {0x1c181000u, 0x2c282420u}, {0x14100800u, 0x24201c18u},
    {0x0c080400u, 0x1c181410u}, {0x06040200u, 0x14100c08u}, {0x03020100u, 0x0c080604u}};

struct Smem {
  uint8_t x[2][kTM][kRowBytes];
  uint8_t w[2][kTN][kRowBytes];
  float wscale[2][kTN][kTK / 32];  // FP4 group scales of the staged tile (folded: [.][.][0] per row)
  uint32_t shifted[kMaxFoldShift + 1][2];  // kE2m1Shifted
};

// mma_kernel's FP4 weight fetch into registers: thread tid's item i is chunk c = tid + 256 i of
// the stage, weight row c / 4 (from n0) and its 32-group c % 4 of the 128-column block kb, so the
// four groups of a row sit in four adjacent lanes (as convert_fp4_stage needs).
template <int kItems, bool SF32>
__device__ __forceinline__ void fetch_fp4_stage(const Problem& p, int64_t n0, int64_t N, int64_t K, int64_t kb,
                                                uint4 (&w4)[kItems], float (&w4s)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = int(threadIdx.x) + i * 256, row = c >> 2, grp = c & 3;
    const int64_t n = n0 + row, k = kb * kTK + grp * 32;
    if (n < N && k < K) {
      w4[i] = *reinterpret_cast<const uint4*>(p.w.w + ((p.wrow0 + n) * K + k) / 2);
      w4s[i] = scale_at<SF32>(p.w.s, (p.wrow0 + n) * (K / 32) + k / 32);
    } else {
      w4[i] = make_uint4(0, 0, 0, 0);
      w4s[i] = 0.f;
    }
  }
}
// Converts the fetched groups to E4M3, folded when every row of the block can be (one promotion
// schedule per stage; the same answer in every thread, which all must call this):
// store(i, lo, hi, scale) puts item i's 32 bytes (lo: its first 16 columns) and the scale that
// multiplies them (folded: the row's 2^e_max; else the group's scale). Returns whether it folded.
template <int kItems, class Store>
__device__ __forceinline__ bool convert_fp4_stage(const uint4 (&w4)[kItems], const float (&w4s)[kItems],
                                                  const uint32_t (&shifted)[kMaxFoldShift + 1][2], Store&& store) {
  // A group of zero codes (also the padding past N or K) adds nothing at any finite scale: no
  // bound (a non-finite scale never folds: 0 x NaN must stay NaN, as on the CPU).
  int shift[kItems], fits = 1;
  float row_scale[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t bits = __float_as_uint(w4s[i]);
    const bool zero = (w4[i].x | w4[i].y | w4[i].z | w4[i].w) == 0;
    const bool pow2 = (bits & 0x807fffffu) == 0 && (bits >> 23) != 0 && (bits >> 23) != 0xff;  // +2^e, e normal
    const bool finite = (bits >> 23 & 0xffu) != 0xffu;
    const int e = zero ? 0 : pow2 ? int(bits >> 23) : 1000;  // 1000: never fits
    int emax = max(e, __shfl_xor_sync(0xffffffffu, e, 1));
    emax = max(emax, __shfl_xor_sync(0xffffffffu, emax, 2));
    shift[i] = zero ? 0 : emax - e;
    fits &= zero ? finite : pow2 && shift[i] <= kMaxFoldShift;
    row_scale[i] = emax > 0 && emax < 0xff ? __uint_as_float(uint32_t(emax) << 23) : 0.f;
  }
  const bool fold = __syncthreads_and(fits);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t tlo = shifted[fold ? shift[i] : 0][0], thi = shifted[fold ? shift[i] : 0][1];
    const uint32_t u[4] = {w4[i].x, w4[i].y, w4[i].z, w4[i].w};
    uint4 lo, hi;
    lo.x = e2m1x4_to_e4m3x4(u[0], tlo, thi);
    lo.y = e2m1x4_to_e4m3x4(u[0] >> 16, tlo, thi);
    lo.z = e2m1x4_to_e4m3x4(u[1], tlo, thi);
    lo.w = e2m1x4_to_e4m3x4(u[1] >> 16, tlo, thi);
    hi.x = e2m1x4_to_e4m3x4(u[2], tlo, thi);
    hi.y = e2m1x4_to_e4m3x4(u[2] >> 16, tlo, thi);
    hi.z = e2m1x4_to_e4m3x4(u[3], tlo, thi);
    hi.w = e2m1x4_to_e4m3x4(u[3] >> 16, tlo, thi);
    store(i, lo, hi, fold ? row_scale[i] : w4s[i]);
  }
  return fold;
}



// A warp's accumulators: 2 m16 x 4 n8 tiles of the mma C fragment (rows g, g+8; columns 2t, 2t+1).
using Frag = float[2][4][4];
__device__ __forceinline__ void zero(Frag& f) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f[i][j][e] = 0.f;
}
// Promotion of n8 tile nt: acc += part * (row scale x column scale), then part = 0.
// sx[mt][h]: activation scales of rows g + 8h; s0, s1: weight scales of columns 2t, 2t + 1.
__device__ __forceinline__ void promote(Frag& acc, Frag& part, int nt, const float (&sx)[2][2], float s0, float s1) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    acc[mt][nt][0] = fmaf(part[mt][nt][0], sx[mt][0] * s0, acc[mt][nt][0]);
    acc[mt][nt][1] = fmaf(part[mt][nt][1], sx[mt][0] * s1, acc[mt][nt][1]);
    acc[mt][nt][2] = fmaf(part[mt][nt][2], sx[mt][1] * s0, acc[mt][nt][2]);
    acc[mt][nt][3] = fmaf(part[mt][nt][3], sx[mt][1] * s1, acc[mt][nt][3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) part[mt][nt][e] = 0.f;
  }
}

// Two blocks per SM (128 registers, a few spilled): 16 warps hide the staging latency better
// than one block of 180 registers (H200, 30 layers, prefill 8K: 1,999 -> 1,891 ms; PERF.md).
template <int FMT, bool SF32>
__global__ void __launch_bounds__(256, 2) mma_kernel(GemmArgs a) {
  pdl_prologue();
  extern __shared__ __align__(16) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const Problem p = problem(a);
  const int64_t r0 = int64_t(blockIdx.y) * kTM, n0 = int64_t(blockIdx.x) * kTN, K = a.K, N = a.N;
  if (r0 >= p.rows) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
  const int64_t nkb = (K + kTK - 1) / kTK;

  // Staging: X 64 rows x 128 B (2 chunks of 16 B per thread), W 128 rows x 128 B (4 chunks) for
  // FP8 via cp.async; FP4 W 128 rows x 64 packed B (2 chunks) through registers, converted.
  int64_t xrow[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = r0 + ((tid + i * 256) >> 3);
    xrow[i] = r < p.rows ? activation_row(a, p, r) : -1;
  }
  auto stage_x = [&](int st, int64_t kb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, row = c >> 3, kc = (c & 7) * 16;
      const int64_t k = kb * kTK + kc;
      const bool ok = xrow[i] >= 0 && k < K;
      cp_async16(&sm.x[st][row][kc], ok ? a.xq + xrow[i] * a.ldxq + k : a.xq, ok);
    }
  };
  auto stage_w_fp8 = [&](int st, int64_t kb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = tid + i * 256, row = c >> 3, kc = (c & 7) * 16;
      const int64_t n = n0 + row, k = kb * kTK + kc;
      const bool ok = n < N && k < K;
      cp_async16(&sm.w[st][row][kc], ok ? p.w.w + (p.wrow0 + n) * K + k : p.w.w, ok);
    }
  };
  uint4 w4[2];
  float w4s[2];
  int folded = 0;  // bit st: stage st holds folded rows
  auto store_w_fp4 = [&](int st) {
    const bool fold = convert_fp4_stage(w4, w4s, sm.shifted, [&](int i, uint4 lo, uint4 hi, float scale) {
      const int c = tid + i * 256, row = c >> 2, grp = c & 3;
      *reinterpret_cast<uint4*>(&sm.w[st][row][grp * 32]) = lo;
      *reinterpret_cast<uint4*>(&sm.w[st][row][grp * 32 + 16]) = hi;
      sm.wscale[st][row][grp] = scale;
    });
    folded = fold ? folded | (1 << st) : folded & ~(1 << st);
  };

  Frag acc, part;  // promoted FP32 sums; the current scale block's tensor-core partial sums
  zero(acc);
  zero(part);

  stage_x(0, 0);
  if constexpr (FMT == kFP8) stage_w_fp8(0, 0);
  cp_async_commit();
  if constexpr (FMT == kFP4) {
    if (tid < 2 * (kMaxFoldShift + 1)) sm.shifted[tid / 2][tid % 2] = kE2m1Shifted[tid / 2][tid % 2];
    __syncthreads();
    fetch_fp4_stage<2, SF32>(p, n0, N, K, 0, w4, w4s);
    store_w_fp4(0);
  }

  const int64_t nkw = (p.w.in + kTK - 1) / kTK;  // FP8 weight scale columns
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int st = int(kb & 1);
    const bool more = kb + 1 < nkb;
    if (more) {
      stage_x(st ^ 1, kb + 1);
      if constexpr (FMT == kFP8) stage_w_fp8(st ^ 1, kb + 1);
      cp_async_commit();
      if constexpr (FMT == kFP4) fetch_fp4_stage<2, SF32>(p, n0, N, K, kb + 1, w4, w4s);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float sx[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + wm * 32 + mt * 16 + g + 8 * h;
        sx[mt][h] = r < p.rows ? a.xs[kb * a.xs_ld + activation_row(a, p, r)] : 0.f;
      }
#pragma unroll
    for (int ks = 0; ks < kTK / 32; ++ks) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int rb = wm * 32 + mt * 16 + g, kc = ks * 32 + t4 * 4;
        af[mt][0] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb][kc]);
        af[mt][1] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb + 8][kc]);
        af[mt][2] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb][kc + 16]);
        af[mt][3] = *reinterpret_cast<const uint32_t*>(&sm.x[st][rb + 8][kc + 16]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int cb = wn * 32 + nt * 8 + g, kc = ks * 32 + t4 * 4;
        bf[nt][0] = *reinterpret_cast<const uint32_t*>(&sm.w[st][cb][kc]);
        bf[nt][1] = *reinterpret_cast<const uint32_t*>(&sm.w[st][cb][kc + 16]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_e4m3(part[mt][nt], af[mt], bf[nt]);
      if constexpr (FMT == kFP4) {  // unfolded: promote per 32-group, weight scale per column
        if (!(folded >> st & 1)) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int cl = wn * 32 + nt * 8 + t4 * 2;
            promote(acc, part, nt, sx, sm.wscale[st][cl][ks], sm.wscale[st][cl + 1][ks]);
          }
        }
      }
    }
    if constexpr (FMT == kFP4) {  // folded: promote once, the row's 2^e_max
      if (folded >> st & 1) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int cl = wn * 32 + nt * 8 + t4 * 2;
          promote(acc, part, nt, sx, sm.wscale[st][cl][0], sm.wscale[st][cl + 1][0]);
        }
      }
    }
    if constexpr (FMT == kFP8) {  // promote per 128-block: weight scale per 128 columns
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        float s[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t n = n0 + wn * 32 + nt * 8 + t4 * 2 + j;
          s[j] = n < N ? scale_at<SF32>(p.w.s, ((p.wrow0 + n) / kTK) * nkw + kb) : 0.f;
        }
        promote(acc, part, nt, sx, s[0], s[1]);
      }
    }
    if constexpr (FMT == kFP4) {
      if (more) store_w_fp4(st ^ 1);
    }
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + wm * 32 + mt * 16 + g + 8 * h;
      if (r >= p.rows) continue;
      float* yr = p.y + (p.base + r) * a.ldy;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t n = n0 + wn * 32 + nt * 8 + t4 * 2 + j;
          if (n < N) yr[n] = acc[mt][nt][2 * h + j];
        }
    }
}

// ---- warpgroup tensor-core GEMM for FP4 experts (sm_90a) ---------------------------------------
// Prefill-sized FP4-weight GEMMs with FP8 activations on Hopper's asynchronous warpgroup MMA, in
// BF16: an E4M3 activation times its power-of-two block scale, and an E2M1 weight times its E8M0
// group scale, are both BF16 values exactly, so with the scales folded into the operands there is
// nothing to promote: one FP32 accumulation over all of K, exact products.
//  - The weights are the A operand, in registers: each thread converts its own fragments from the
//    packed E2M1 bytes (wgmma with A from registers), so converted weights never pass through
//    shared memory. The activations are the B operand, read from shared memory. The version that
//    staged converted weights in shared memory moved about 1.3 bytes of shared memory per byte its
//    MMAs could take at full rate (docs/PERF.md).
//  - A block is two warpgroups of two m64 halves of weight rows each x 128 activation rows
//    (m64n128). (A tile of one half x 256 rows, m64n256, converts half the weights per MMA but
//    measured 8 % slower on the 8K prefill: docs/PERF.md.)
//  - kSwiglu (gemm_swiglu): in each 16 rows of a half, rows 8-15 are the W3 rows of rows 0-7's W1
//    channels, so a thread holds both products of its outputs and writes their clamped SwiGLU
//    (the SwiGLU kernel's function).
//  - K runs in chunks of 128 columns. A chunk's stage holds the activation rows (BF16 rows,
//    GemmArgs::xb, as two 128-byte-swizzled tiles of 64 columns), the packed weight rows (64 bytes
//    each) and their E8M0 scales (4 a row), copied by cp.async kAhead chunks ahead; one barrier a
//    chunk.
//  - Fragment order: in a chunk, thread t of a quad owns bytes 16 t .. 16 t + 15 of its weight
//    rows (one scale group) and feeds elements 32 t + 4 j + {0, 1, 2, 3} into the fragment slots
//    k = 2 t, 2 t + 1, 2 t + 8, 2 t + 9 of step j (16 columns). act_quant writes the BF16 rows in
//    that order (wgmma_bf16_column), so every product pairs the same column of x and W.
// Needs K % 128 == 0, E8M0 weight scales and BF16 activation rows (wgmma_fits; the backend asks
// for them only with power-of-two activation scales, which make those rows exact).
constexpr int kWgThreads = 256;
constexpr int kWgK = 128;  // columns of a chunk

struct WgTile {
  static constexpr int kHalves = 2;      // m64 halves of weight rows a warpgroup
  static constexpr int kTokens = 128;    // activation rows of the block
  static constexpr int kWeightRows = 256;  // weight rows of the block: a warpgroup's two halves x 2
  static constexpr int kStages = 4;      // as many as fit in shared memory
  static constexpr int kAhead = kStages - 2;  // chunks loaded ahead; one more is drained by the MMAs
  static_assert(kTokens <= kWgThreads && kWeightRows <= kWgThreads, "one row source per thread");
  struct Stage {
    // Activation rows, BF16, two 64-column tiles of 128-byte rows from a 1,024-aligned base,
    // 128-byte swizzled (16-byte piece c of row r at piece c ^ (r % 8)).
    alignas(1024) uint8_t x[2][kTokens * 128];
    uint8_t w[kWeightRows * kWgK / 2];   // packed E2M1 weight rows, 64 bytes a row
    uint8_t ws[kWeightRows * kWgK / 32];  // E8M0 group scales, 4 a row
  };
  Stage stage[kStages];
  const uint16_t* xrow[kTokens];    // activation row r's BF16 values (null past the problem's rows)
  const uint8_t* wrow[kWeightRows];  // weight row R's packed bytes (null past N)
  const uint8_t* srow[kWeightRows];  // and its E8M0 scales
};
static_assert(sizeof(WgTile) <= 227 * 1024, "the sm_90 shared memory of a block");
template <bool kSwiglu>
constexpr int kWgChannels = kSwiglu ? WgTile::kWeightRows / 2 : WgTile::kWeightRows;  // output channels of a block

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Byte offset of 16-byte piece c (0..7) of row `row` in a 128-byte-swizzled operand tile.
__device__ __forceinline__ int swizzled(int row, int c) { return row * 128 + ((c ^ (row & 7)) << 4); }
// Shared-memory matrix descriptor, K-major, 128-byte swizzle: start, leading offset (unused),
// stride between 8-row groups (1,024 bytes).
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr & 0x3ffffu) >> 4) | uint64_t(1) << 16 | uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}
// d += A[64 x 16] B[N x 16]^T: A (BF16) from registers (the m16n8k16 A fragment of each warp's 16
// rows), B (BF16) from shared memory, FP32 accumulators.
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b);
// The accumulators d[i .. i + 63] as read-write asm operands.
#define DSV4_WG_ACC8(i)                                                                                       \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define DSV4_WG_ACC64(i)                                                                                  \
  DSV4_WG_ACC8(i), DSV4_WG_ACC8(i + 8), DSV4_WG_ACC8(i + 16), DSV4_WG_ACC8(i + 24), DSV4_WG_ACC8(i + 32), \
      DSV4_WG_ACC8(i + 40), DSV4_WG_ACC8(i + 48), DSV4_WG_ACC8(i + 56)
template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
      : DSV4_WG_ACC64(0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
// d = (accumulate ? d : 0) + A[64 x 32] B[128 x 32]^T: E4M3 A and B from shared memory (K-major,
// 128-byte swizzle), FP32 accumulators (the tensor cores' FP8 accumulation is narrower than FP32).
__device__ __forceinline__ void wgmma_e4m3_ss(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : DSV4_WG_ACC64(0)
      : "l"(a), "l"(b), "r"(int(accumulate)));
}
#undef DSV4_WG_ACC64
#undef DSV4_WG_ACC8
// Keep the compiler from moving register operands of the asynchronous MMAs across this point.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int H>
__device__ __forceinline__ void fence_registers(uint32_t (&a)[H][4]) {
#pragma unroll
  for (int i = 0; i < 4 * H; ++i) asm volatile("" : "+r"(a[i / 4][i % 4])::"memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async) made visible to the MMAs' async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0));
}
// The E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6) times a group scale s as BF16, computed in FP32
// (as the CPU: e2m1 x scale, so NaN and infinite scales give what they give there) and rounded to
// BF16 exactly; split into low bytes (lo[0]: magnitudes 0-3, lo[1]: 4-7) and high bytes.
struct E2m1Table {
  uint32_t lo[2], hi[2];
};
__device__ __forceinline__ E2m1Table e2m1_table(float s) {
  const uint32_t t0 = bf16x2_rn(0.f * s, 0.5f * s), t1 = bf16x2_rn(1.f * s, 1.5f * s);
  const uint32_t t2 = bf16x2_rn(2.f * s, 3.f * s), t3 = bf16x2_rn(4.f * s, 6.f * s);
  return {{__byte_perm(t0, t1, 0x6420), __byte_perm(t2, t3, 0x6420)},
          {__byte_perm(t0, t1, 0x7531), __byte_perm(t2, t3, 0x7531)}};
}
// Four E2M1 codes (the low 16 bits of u, the low nibble first) as two BF16 pairs: a byte
// permutation of the table picks each code's low and high bytes, a second one the sign bytes, two
// more interleave them. (The high bytes are e2m1x4_to_e4m3x4 of dequant.cuh with this table; its
// sign path costs more instructions here.)
__device__ __forceinline__ void e2m1x4_to_bf16(uint32_t u, const E2m1Table& t, uint32_t& first, uint32_t& second) {
  const uint32_t sel = u & 0x7777u;
  const uint32_t lo = __byte_perm(t.lo[0], t.lo[1], sel);
  const uint32_t hi = __byte_perm(t.hi[0], t.hi[1], sel) | __byte_perm(0x8000u, 0u, (u >> 3) & 0x1111u);
  first = __byte_perm(lo, hi, 0x5140);
  second = __byte_perm(lo, hi, 0x7362);
}
#endif

template <bool kSwiglu>
__global__ void __launch_bounds__(kWgThreads, 1) wgmma_fp4_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tile = WgTile;
  constexpr int kHalves = Tile::kHalves, kTokens = Tile::kTokens, kRows = Tile::kWeightRows, kStages = Tile::kStages, kAhead = Tile::kAhead;
  constexpr int kChannels = kWgChannels<kSwiglu>;
  pdl_prologue();
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  Tile& sm = *reinterpret_cast<Tile*>(wg_smem);
  const Problem p = problem(a);
  const int64_t r0 = int64_t(blockIdx.y) * kTokens, n0 = int64_t(blockIdx.x) * kChannels, K = a.K, N = a.N;
  if (r0 >= p.rows) return;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  // This thread's first tile row (half 0, row g of its warp's 16); half q, row g + 8 h is
  // wrow + 64 q + 8 h. (Written as one lambda of wg, warp, q and h, the same rows made ptxas
  // serialise the MMAs: C7515.)
  const int wrow = 64 * kHalves * wg + ((tid >> 5) & 3) * 16 + g;
  // Output channel of tile row R (under kSwiglu rows 8-15 of each 16 are W3).
  auto channel = [&](int R) { return n0 + (kSwiglu ? (R >> 4) * 8 + (R & 7) : R); };
  const int64_t nch = K / kWgK;

  // The rows' sources, once.
  if (tid < kTokens) sm.xrow[tid] = r0 + tid < p.rows ? a.xb + activation_row(a, p, r0 + tid) * a.ldxb : nullptr;
  if (tid < kRows) {
    const int64_t n = channel(tid);
    const bool w3 = kSwiglu && (tid & 8);
    sm.wrow[tid] = n < N ? (w3 ? p.w3.w : p.w.w) + (p.wrow0 + n) * (K / 2) : nullptr;
    sm.srow[tid] = n < N ? (w3 ? p.w3.s : p.w.s) + (p.wrow0 + n) * (K / 32) : nullptr;
  }
  __syncthreads();

  // Chunk c into stage c % kStages: thread tid copies the 16-byte pieces tid % 16 of activation
  // rows tid / 16 + 16 i, pieces tid % 4 of weight rows tid / 4 + 64 i, and the four scales of
  // weight row tid. One cp.async group per chunk, empty past the last.
  auto load_chunk = [&](int64_t c) {
    if (c < nch) {
      auto& st = sm.stage[c % kStages];
#pragma unroll
      for (int i = 0; i < kTokens / 16; ++i) {
        const int row = (tid >> 4) + 16 * i, piece = tid & 15;
        const uint16_t* src = sm.xrow[row];
        cp_async16(st.x[piece >> 3] + swizzled(row, piece & 7), src ? src + c * kWgK + piece * 8 : a.xb, src);
      }
#pragma unroll
      for (int i = 0; i < kRows / 64; ++i) {
        const int R = (tid >> 2) + 64 * i, piece = tid & 3;
        const uint8_t* src = sm.wrow[R];
        cp_async16(st.w + R * 64 + piece * 16, src ? src + c * (kWgK / 2) + piece * 16 : p.w.w, src);
      }
      if (tid < kRows) {
        const uint8_t* src = sm.srow[tid];
        cp_async4(st.ws + tid * 4, src ? src + c * (kWgK / 32) : p.w.s, src);
      }
    }
    cp_async_commit();
  };

  float acc[kHalves][kTokens / 2];
#pragma unroll
  for (int q = 0; q < kHalves; ++q)
#pragma unroll
    for (int i = 0; i < kTokens / 2; ++i) acc[q][i] = 0.f;
  uint32_t frag[2][kHalves][4];  // [step parity][half]: A fragments, one set per MMA group in flight

  // At the top of chunk c the groups of chunks <= c + kAhead - 1 are committed; waiting until
  // kAhead - 1 remain lands chunk c. The stage loaded in chunk c, (c + kAhead) % kStages, was last
  // read in chunk c - 2: its weight reads came before the previous barrier, and its MMAs were done
  // before each thread's wgmma_wait<1> at step 1 of chunk c - 1.
#pragma unroll
  for (int c = 0; c < kAhead; ++c) load_chunk(c);
  for (int64_t c = 0; c < nch; ++c) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async();  // this thread's copies, before the MMAs read them
    __syncthreads();
    load_chunk(c + kAhead);
    const auto& st = sm.stage[c % kStages];
    // This thread's 16 bytes (one scale group) of its weight rows: half q, rows g and g + 8.
    uint4 packed[kHalves][2];
    E2m1Table table[kHalves][2];
#pragma unroll
    for (int q = 0; q < kHalves; ++q)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int R = wrow + 64 * q + 8 * h;
        packed[q][h] = *reinterpret_cast<const uint4*>(st.w + R * 64 + t4 * 16);
        table[q][h] = e2m1_table(e8m0_to_float(st.ws[R * 4 + t4]));
      }
#pragma unroll
    for (int j = 0; j < kWgK / 16; ++j) {
      uint32_t (&f)[kHalves][4] = frag[j & 1];
      wgmma_wait<1>();  // the MMAs of step j - 2, which read this fragment set, are done
      fence_registers(f);
#pragma unroll
      for (int q = 0; q < kHalves; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 v = packed[q][h];
          const uint32_t word = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
          e2m1x4_to_bf16(word >> (16 * (j & 1)), table[q][h], f[q][h], f[q][2 + h]);
        }
      const uint64_t b = wgmma_desc(st.x[j / 4] + (j % 4) * 32);
      wgmma_fence();
#pragma unroll
      for (int q = 0; q < kHalves; ++q) wgmma_rs<kTokens>(acc[q], f[q], b);
      wgmma_commit();
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int q = 0; q < kHalves; ++q) fence_registers(acc[q]);

  // Accumulator 4 j + 2 h + e of half q: tile row wrow + 64 q + 8 h, activation row 8 j + 2 t4 + e.
#pragma unroll
  for (int q = 0; q < kHalves; ++q)
#pragma unroll
    for (int h = 0; h < (kSwiglu ? 1 : 2); ++h) {
      const int64_t n = channel(wrow + 64 * q + 8 * h);
      if (n >= N) continue;
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t r = r0 + j * 8 + t4 * 2 + e;
          const int i = 4 * j + 2 * h + e;
          if (r < p.rows)
            p.y[(p.base + r) * a.ldy + n] = kSwiglu ? swiglu_value(acc[q][i], acc[q][i + 2], a.swiglu_limit) : acc[q][i];
        }
    }
#else
  __trap();  // launched only where wgmma_available()
#endif
}

// ---- warpgroup tensor-core GEMM for FP8 weights (sm_90a) ---------------------------------------
// FP8 weights (128x128 block scales) x FP8 activations (1x128 scales) on wgmma m64n128k32 E4M3,
// both operands in shared memory, with the official kernels' promotion: the four MMAs of a
// 128-column chunk accumulate into a fresh partial (the tensor cores' FP8 accumulation is narrower
// than FP32), which is then added into the FP32 accumulators times the activation row's scale and
// the weight block's scale.
//  - A tile is 128 activation rows (two warpgroups of 64: the A operand) x 128 weight rows (one
//    scale block row: the B operand). K runs in chunks of 128 columns, each a 128-byte row of both
//    operand tiles (128-byte swizzled), copied by cp.async with the rows' activation scales,
//    kAhead chunks ahead; one barrier a chunk.
//  - Persistent blocks: block b takes tiles b, b + gridDim.x, ... of its problem, and its copies
//    run on into the next tile while the last chunks of one are multiplied and stored. (Against
//    one tile a block: even at 4,096 rows, +5 % on wq_b at 1,024; docs/PERF.md.)
//  - Where it stands: 0.64-0.78x of cuBLASLt on the prefill shapes. The warpgroups promote in step
//    (tensor cores idle meanwhile) and the 128 x 128 tile nears L2 bandwidth at cuBLASLt's rate.
//  - Tiles run along the activation rows first, so the blocks in flight share a few weight tiles
//    and a weight is read from memory about once.
// Needs K % 128 == 0 and problems whose weight rows start on a scale block (w_z_row_off % 128).
constexpr int kWg8Rows = 128;   // activation rows and weight rows of a tile
constexpr int kWg8MaxK = 32768;  // a tile's weight scales (one a chunk) are held in shared memory

struct Fp8WgTile {
  static constexpr int kStages = 6;           // as many as fit in shared memory
  static constexpr int kAhead = kStages - 1;  // chunks loaded ahead
  struct Stage {
    alignas(1024) uint8_t x[kWg8Rows * kWgK];  // activation rows, E4M3, 128-byte swizzled
    alignas(1024) uint8_t w[kWg8Rows * kWgK];  // weight rows, E4M3, 128-byte swizzled
    float xs[kWg8Rows];                        // the activation rows' scales
  };
  Stage stage[kStages];
  float ws[2][kWg8MaxK / kWgK];  // [tile parity]: the weight block row's scales
};
static_assert(sizeof(Fp8WgTile) <= 227 * 1024, "the sm_90 shared memory of a block");
static_assert(kWg8MaxK / kWgK <= kWgThreads, "one weight scale a thread");

template <bool SF32>
__global__ void __launch_bounds__(kWgThreads, 1) wgmma_fp8_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = Fp8WgTile::kStages, kAhead = Fp8WgTile::kAhead;
  pdl_prologue();
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  Fp8WgTile& sm = *reinterpret_cast<Fp8WgTile*>(wg_smem);
  const Problem p = problem(a);
  const int64_t K = a.K, N = a.N;
  const int row_tiles = int((p.rows + kWg8Rows - 1) / kWg8Rows), tiles = row_tiles * int((N + kWg8Rows - 1) / kWg8Rows);
  if (int(blockIdx.x) >= tiles) return;
  const int nch = int(K / kWgK), mine = (tiles - 1 - int(blockIdx.x)) / int(gridDim.x) + 1;
  // The first activation row and weight row of this block's i-th tile.
  auto tile_rows = [&](int i, int64_t& r0, int64_t& n0) {
    const int t = int(blockIdx.x) + i * int(gridDim.x);
    r0 = int64_t(t % row_tiles) * kWg8Rows;
    n0 = int64_t(t / row_tiles) * kWg8Rows;
  };
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, g = lane >> 2, t4 = lane & 3;

  // Copies of a chunk: thread tid moves the 16-byte piece tid % 8 of rows tid / 8 + 32 i of both
  // operand tiles, and threads 0-127 the scale of activation row tid. The sources are set at each
  // tile's first chunk (rows past the problem or past N read row 0 and copy 0 bytes: zeros).
  // Copies walk the block's chunks in order (tile lt, chunk lc, stage ls), kAhead ahead of the MMAs.
  const int piece = tid & 7;
  const uint8_t* xsrc[4];
  const uint8_t* wsrc[4];
  const float* ssrc = a.xs;
  uint32_t valid = 0;  // bit i: activation row i's piece; bit 4 + i: weight row i's; bit 8: the scale
  int lt = 0, lc = 0, ls = 0;
  auto load_next = [&] {
    if (lt < mine) {
      if (lc == 0) {
        int64_t r0, n0;
        tile_rows(lt, r0, n0);
        valid = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = (tid >> 3) + 32 * j;
          const bool xv = r0 + row < p.rows, wv = n0 + row < N;
          xsrc[j] = a.xq + (xv ? activation_row(a, p, r0 + row) : 0) * a.ldxq + piece * 16;
          wsrc[j] = p.w.w + (p.wrow0 + (wv ? n0 + row : 0)) * K + piece * 16;
          valid |= uint32_t(xv) << j | uint32_t(wv) << (4 + j);
        }
        const bool sv = tid < kWg8Rows && r0 + tid < p.rows;
        ssrc = a.xs + (sv ? activation_row(a, p, r0 + tid) : 0);
        valid |= uint32_t(sv) << 8;
      }
      auto& st = sm.stage[ls];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = (tid >> 3) + 32 * j;
        cp_async16(st.x + swizzled(row, piece), xsrc[j] + int64_t(lc) * kWgK, (valid >> j) & 1);
        cp_async16(st.w + swizzled(row, piece), wsrc[j] + int64_t(lc) * kWgK, (valid >> (4 + j)) & 1);
      }
      if (tid < kWg8Rows) cp_async4(&st.xs[tid], ssrc + int64_t(lc) * a.xs_ld, (valid >> 8) & 1);
      ls = ls + 1 == kStages ? 0 : ls + 1;
      if (++lc == nch) lc = 0, ++lt;
    }
    cp_async_commit();
  };

  // Accumulator 4 j + 2 h + e: activation row arow + 8 h, weight row 8 j + 2 t4 + e of the tile.
  const int arow = 64 * wg + ((tid >> 5) & 3) * 16 + g;
  float acc[64], part[64];
  // Thread c < nch holds the scale of chunk c of the next tile's weight block row, loaded a tile
  // ahead and stored at the end of the tile (a global load waited for at a tile's start cost more
  // than it saved).
  auto weight_scale = [&](int i) {
    int64_t r0, n0;
    tile_rows(i, r0, n0);
    return scale_at<SF32>(p.w.s, (p.wrow0 + n0) / kWg8Rows * ((p.w.in + 127) / 128) + tid);
  };
  if (tid < nch) sm.ws[0][tid] = weight_scale(0);
  float next_ws = tid < nch && mine > 1 ? weight_scale(1) : 0.f;
  // At the top of each chunk the groups of the next kAhead chunks are committed; waiting until
  // kAhead - 1 remain lands this one. The stage loaded then was last read by the previous chunk's
  // MMAs, which every thread waited for before the barrier.
#pragma unroll
  for (int q = 0; q < kAhead; ++q) load_next();
  int cs = 0;  // the stage of the chunk being multiplied
  for (int i = 0; i < mine; ++i) {
    int64_t r0, n0;
    tile_rows(i, r0, n0);
    const float* ws = sm.ws[i & 1];
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = 0.f;
    for (int c = 0; c < nch; ++c) {
      cp_async_wait<kAhead - 1>();
      fence_proxy_async();  // this thread's copies, before the MMAs read them
      __syncthreads();
      load_next();
      const auto& st = sm.stage[cs];
      cs = cs + 1 == kStages ? 0 : cs + 1;
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kWgK / 32; ++k)
        wgmma_e4m3_ss(part, wgmma_desc(st.x + 64 * kWgK * wg + 32 * k), wgmma_desc(st.w + 32 * k), k > 0);
      wgmma_commit();
      const float sx0 = st.xs[arow], sx1 = st.xs[arow + 8], sw = ws[c];
      // Promotion. (Reading one partial while the next chunk's MMAs write another, after
      // wgmma.wait_group 1, makes ptxas serialise the MMAs: C7514.)
      wgmma_wait<0>();
      fence_registers(part);
      const float s0 = sx0 * sw, s1 = sx1 * sw;
#pragma unroll
      for (int j = 0; j < 64; ++j) acc[j] = fmaf(part[j], (j & 2) ? s1 : s0, acc[j]);
    }

    // The next tile's weight scales (read after the next barrier; this buffer was last read in
    // tile i - 1), and this tile's stores, while the copies of the next are in flight.
    if (tid < nch && i + 1 < mine) {
      sm.ws[(i + 1) & 1][tid] = next_ws;
      if (i + 2 < mine) next_ws = weight_scale(i + 2);
    }
    const bool pairs = a.ldy % 2 == 0 && (reinterpret_cast<uintptr_t>(p.y) & 7) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + arow + 8 * h;
      if (r >= p.rows) continue;
      float* y = p.y + (p.base + r) * a.ldy;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int64_t n = n0 + 8 * j + 2 * t4;
        const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
        if (pairs && n + 1 < N) {
          *reinterpret_cast<float2*>(y + n) = make_float2(v0, v1);
        } else {
          if (n < N) y[n] = v0;
          if (n + 1 < N) y[n + 1] = v1;
        }
      }
    }
  }
#else
  __trap();  // launched only where wgmma_available()
#endif
}

// ---- weight-streaming tensor-core GEMM for few rows per problem (decode) ------------------------
// Decode multiplies 1-16 activation rows per problem (a dense linear, or one MoE expert's tokens):
// the weights must stream at the memory roofline and the arithmetic must stay off the critical
// path. The FP32 GEMV spends ~30 instructions per 16 weight bytes on decoding and FMAs (FP4
// experts measured 470 GB/s); here a warp owns 16 weight rows (the A operand of mma.sync
// m16n8k32 E4M3) and the problem's rows are the 8 columns of B, so the tensor cores do the
// products and the warp only converts FP4 nibbles.
//  - Weights stream through a per-warp ring of kSkStages shared-memory stages filled with
//    cp.async (16 rows x 128 bytes per stage: FP8 k128 = one scale block, FP4 k256 = 8 groups),
//    stored so that ldmatrix hands each lane its A fragment words (conflict-free).
//  - FP4 e2m1 -> E4M3 is two shifts and a mask per 4 bytes: the nibble s|e1e0|m placed at bits
//    7 and 4..2 of a byte is exactly 2^-6 times its value (e = 0 lands on the subnormals); the
//    2^6 goes into the group scale. Even and odd nibbles become separate fragment registers;
//    B's bytes are permuted to match (any permutation of k within one scale group is allowed).
//  - Partial sums are promoted to FP32 once per scale group (FP4: 32 of K, FP8: 128), as in
//    mma_kernel; mma.sync accumulates like FP32 there (test_cuda_fp8.cpp).
//  - Few tiles (a dense decode linear): the block's warps split K and add their partials in a
//    fixed order through shared memory (deterministic, no atomics).
// B fragments come straight from global memory (the activation rows are a few KB, L1-resident).
constexpr int kSkWarps = 8, kSkStages = 4, kSkUnits = 8;  // units: 16-byte pieces of a row per stage
constexpr int kSkStageBytes = 16 * kSkUnits * 16;         // 16 rows
template <int FMT>
constexpr int kSkStageK = int(skinny_stage_k(FMT));
template <int FMT, bool SF32>
constexpr int kSkSlotBytes = kSkStageBytes + (FMT == kFP4 ? 16 * 8 * (SF32 ? 4 : 1) : 0);  // + FP4 group scales
template <int FMT, bool SF32, int NT, bool kSwiglu>
constexpr size_t skinny_smem() {
  return size_t(kSkWarps) * kSkStages * kSkSlotBytes<FMT, SF32> + size_t(kSkWarps) * 32 * 4 * NT * (kSwiglu ? 2 : 1) * 4;
}

__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 8 : 0));
}
// E2M1 nibbles of a word (elements 2i in the low nibbles, 2i + 1 in the high ones) -> E4M3 bytes
// of 2^-6 times their values.
__device__ __forceinline__ uint32_t e2m1_even_to_e4m3_scaled(uint32_t w) {
  return ((w << 4) & 0x80808080u) | ((w << 2) & 0x1c1c1c1cu);
}
__device__ __forceinline__ uint32_t e2m1_odd_to_e4m3_scaled(uint32_t w) {
  return (w & 0x80808080u) | ((w >> 2) & 0x1c1c1c1cu);
}

// One warp: 16 weight rows [row0, row0 + 16) x the K range of its slice, for the problem's
// activation rows in passes of 8 * NT. kSwiglu: the rows are streamed from W1 then from W3 and y
// gets their clamped SwiGLU (gemm_swiglu). Warps of a block share the problem (blockIdx.z);
// kSkWarps / ks consecutive tiles, ks K-slices each.
template <int FMT, bool SF32, int NT, bool kSwiglu>
__global__ void __launch_bounds__(kSkWarps * 32, 2) skinny_kernel(GemmArgs a, int ks) {
  // A dense problem starts streaming its weights before waiting for the previous kernel.
  const bool early = problem_known_before_wait(a);
  if (!early) pdl_prologue();
  constexpr int SK = kSkStageK<FMT>, SLOT = kSkSlotBytes<FMT, SF32>, kParts = kSwiglu ? 2 : 1;
  constexpr int64_t kRowBytesPerK2 = FMT == kBF16 ? 4 : FMT == kFP8 ? 2 : 1;  // weight bytes per 2 elements
  using XT = std::conditional_t<FMT == kBF16, float, uint8_t>;  // activations: FP32 or E4M3
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const Problem p = problem(a);
  if (p.rows <= 0) return;  // block-uniform
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t K = a.K, N = a.N, row0 = (int64_t(blockIdx.x) * (kSkWarps / ks) + warp / ks) * 16;
  const int slice = warp % ks;
  const int64_t stages = K / SK / ks, k_first = slice * stages * SK, total = kParts * stages;
  const int64_t row_bytes = K * kRowBytesPerK2 / 2;
  const bool live = row0 < N;  // warps past N still meet the block's barriers
  uint8_t* ring = smem_raw + warp * kSkStages * SLOT;
  float* red = reinterpret_cast<float*>(smem_raw + kSkWarps * kSkStages * SLOT);
  const WeightDesc& w3 = kSwiglu ? p.w3 : p.w;  // the second part's weight (kSwiglu only)
  const int64_t nkw = (p.w.in + 127) / 128;  // FP8 weight scale columns
  // FP8: the block scales of rows g and g + 8 of the stages in flight, oldest first (a shift
  // register: only constant indices, so it stays in registers).
  float wsc[kSkStages][2];
  auto issue = [&](int64_t s, int at) {  // stage s; its scales go to wsc[at]
    if (s < total) {
      const int q = int(s / stages);
      const int64_t kst = k_first + (s % stages) * SK;
      const uint8_t* wq = q ? w3.w : p.w.w;  // warp-uniform
      const uint8_t* sq = q ? w3.s : p.w.s;
      uint8_t* slot = ring + (s % kSkStages) * SLOT;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = lane + 32 * u, r = i & 15, unit = i >> 4;
        const int64_t n = row0 + r;
        const uint8_t* src = wq + (p.wrow0 + n) * row_bytes + kst * kRowBytesPerK2 / 2 + unit * 16;
        cp_async16(slot + i * 16, n < N ? src : wq, n < N);
      }
      if constexpr (FMT == kFP4) {
        const int64_t groups = K / 32;
        if constexpr (SF32) {  // 8 floats per row: two 16-byte pieces
          const int r = lane >> 1, half = lane & 1;
          const int64_t n = row0 + r;
          const float* src = reinterpret_cast<const float*>(sq) + (p.wrow0 + n) * groups + kst / 32 + half * 4;
          cp_async16(slot + kSkStageBytes + lane * 16, n < N ? src : reinterpret_cast<const float*>(sq), n < N);
        } else if (lane < 16) {
          const int64_t n = row0 + lane;
          cp_async8(slot + kSkStageBytes + lane * 8, n < N ? sq + (p.wrow0 + n) * groups + kst / 32 : sq, n < N);
        }
      } else if constexpr (FMT == kFP8) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = row0 + g + 8 * h;
          wsc[at][h] = n < N ? scale_at<SF32>(sq, ((p.wrow0 + n) / 128) * nkw + kst / 128) : 0.f;
        }
      }
    }
    cp_async_commit();  // empty groups keep the wait counts uniform
  };
  auto start_stream = [&] {  // the first kSkStages - 1 stages
#pragma unroll
    for (int j = 0; j < kSkStages - 1; ++j) issue(j, j);
  };
  if (early) {
    if (live && p.rows > 0) start_stream();
    pdl_prologue();
  }

  for (int64_t t0 = 0; t0 < p.rows; t0 += 8 * NT) {
    const XT* xr[NT];       // this lane's B column: problem row t0 + 8j + g
    int64_t sr[NT][2];      // the C columns' rows (t0 + 8j + 2 t4 + {0, 1}) for the activation scales
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t r = t0 + 8 * j + g;
      if constexpr (FMT == kBF16) xr[j] = r < p.rows ? x_row(a, p, r) : nullptr;
      else xr[j] = r < p.rows ? a.xq + activation_row(a, p, r) * a.ldxq : nullptr;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = t0 + 8 * j + 2 * t4 + h;
        sr[j][h] = c < p.rows ? activation_row(a, p, c) : -1;
      }
    }
    // cur: the part being streamed; first: W1's finished sums (SwiGLU).
    float cur[NT][4], first[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) cur[j][e] = first[j][e] = 0.f;
    if (live) {
      if (t0 > 0 || !early) start_stream();
      // This lane's B fragment words (activations) and activation scales of a stage, all loaded
      // before the wait for the stage's weights, so that their L2 latency overlaps that wait
      // instead of stalling each mma in turn.
      constexpr int kBW = 16;  // FP8: 4 k32 steps x 2; FP4: 8 groups x 2; BF16: 4 k16 steps x 2 x float2
      auto load_b = [&](int64_t st, uint32_t (&xb)[NT][kBW], float (&xsc)[NT][2][2]) {
        const int64_t kst = k_first + (st % stages) * SK;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int i = 0; i < kBW; ++i) xb[j][i] = 0u;
          if (xr[j]) {
            if constexpr (FMT == kBF16) {
#pragma unroll
              for (int i = 0; i < 8; ++i) {  // k16 step i / 2, half i % 2
                const float2 v = *reinterpret_cast<const float2*>(xr[j] + kst + 8 * i + 2 * t4);
                xb[j][2 * i] = __float_as_uint(v.x);
                xb[j][2 * i + 1] = __float_as_uint(v.y);
              }
            } else if constexpr (FMT == kFP8) {
#pragma unroll
              for (int i = 0; i < 8; ++i) xb[j][i] = *reinterpret_cast<const uint32_t*>(xr[j] + kst + 16 * i + 4 * t4);
            } else {
#pragma unroll
              for (int gi = 0; gi < 8; ++gi) {  // elements 8 t4 .. 8 t4 + 7 of group gi
                const uint2 v = *reinterpret_cast<const uint2*>(xr[j] + kst + 32 * gi + 8 * t4);
                xb[j][2 * gi] = v.x;
                xb[j][2 * gi + 1] = v.y;
              }
            }
          }
          if constexpr (FMT != kBF16) {
#pragma unroll
            for (int blk = 0; blk < SK / 128; ++blk)
#pragma unroll
              for (int h = 0; h < 2; ++h)
                xsc[j][blk][h] = sr[j][h] >= 0 ? a.xs[(kst / 128 + blk) * a.xs_ld + sr[j][h]] : 0.f;
          }
        }
      };
#pragma unroll 1
      for (int64_t s = 0; s < total; ++s) {
        uint32_t xb[NT][kBW];
        float xsc[NT][2][2];
        load_b(s, xb, xsc);
        cp_async_wait<kSkStages - 2>();
        __syncwarp();  // every lane's copies of stage s have landed; slot (s - 1) is consumed
        issue(s + kSkStages - 1, kSkStages - 1);
        const uint8_t* slot = ring + (s % kSkStages) * SLOT;
        if constexpr (FMT == kBF16) {
#pragma unroll
          for (int m = 0; m < 4; ++m) {  // k16 steps: units 2m, 2m + 1 = the row's two 8-column halves
            uint32_t af[4];
            ldmatrix_x4<false>(af, slot + (2 * m * 16 + lane) * 16);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              uint32_t lo[3], hi[3];  // zeros for a column without a row (the mma is warp-wide)
              split_bf16x3(make_float2(__uint_as_float(xb[j][4 * m]), __uint_as_float(xb[j][4 * m + 1])), lo);
              split_bf16x3(make_float2(__uint_as_float(xb[j][4 * m + 2]), __uint_as_float(xb[j][4 * m + 3])), hi);
#pragma unroll
              for (int i = 0; i < 3; ++i) {
                const uint32_t bf[2] = {lo[i], hi[i]};
                mma_bf16(cur[j], af, bf);
              }
            }
          }
        } else if constexpr (FMT == kFP8) {
          float part[NT][4];
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[j][e] = 0.f;
#pragma unroll
          for (int m = 0; m < 4; ++m) {  // k32 steps: units 2m, 2m + 1 = the row's two 16-byte halves
            uint32_t af[4];
            ldmatrix_x4<false>(af, slot + (2 * m * 16 + lane) * 16);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint32_t bf[2] = {xb[j][2 * m], xb[j][2 * m + 1]};
              mma_e4m3(part[j], af, bf);
            }
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const float s0 = xsc[j][0][0], s1 = xsc[j][0][1];
            cur[j][0] = fmaf(part[j][0], wsc[0][0] * s0, cur[j][0]);
            cur[j][1] = fmaf(part[j][1], wsc[0][0] * s1, cur[j][1]);
            cur[j][2] = fmaf(part[j][2], wsc[0][1] * s0, cur[j][2]);
            cur[j][3] = fmaf(part[j][3], wsc[0][1] * s1, cur[j][3]);
          }
#pragma unroll
          for (int i = 0; i + 1 < kSkStages; ++i) {
            wsc[i][0] = wsc[i + 1][0];
            wsc[i][1] = wsc[i + 1][1];
          }
        } else {
          // Group scales of rows g and g + 8, times the 2^6 of the nibble conversion.
          auto group_scale = [&](int h, int gi) -> float {
            const uint8_t* sp = slot + kSkStageBytes + (g + 8 * h) * 8 * (SF32 ? 4 : 1);
            // (Building 2^(e - 121) from the exponent with a guarded fallback measured slower: MoE
            // layer of 64 tokens 1.87 -> 2.45 ms, H200.)
            if constexpr (SF32) return reinterpret_cast<const float*>(sp)[gi] * 64.f;
            else return e8m0_to_float(sp[gi]) * 64.f;
          };
          float blk[NT][4];  // this 128-block's sums, before the activation scale
#pragma unroll
          for (int m = 0; m < 4; ++m) {  // units 2m, 2m + 1 = groups 2m, 2m + 1
            uint32_t wf[4];              // rows g / g + 8 of group 2m, then of group 2m + 1
            ldmatrix_x4<false>(wf, slot + (2 * m * 16 + lane) * 16);
#pragma unroll
            for (int hg = 0; hg < 2; ++hg) {
              const int gi = 2 * m + hg;
              const uint32_t A[4] = {e2m1_even_to_e4m3_scaled(wf[2 * hg]), e2m1_even_to_e4m3_scaled(wf[2 * hg + 1]),
                                     e2m1_odd_to_e4m3_scaled(wf[2 * hg]), e2m1_odd_to_e4m3_scaled(wf[2 * hg + 1])};
#pragma unroll
              for (int j = 0; j < NT; ++j) {
                if (gi % 4 == 0)
#pragma unroll
                  for (int e = 0; e < 4; ++e) blk[j][e] = 0.f;
                // elements 8 t4 + {0, 2, 4, 6} and + {1, 3, 5, 7} of the group
                const uint32_t bf[2] = {__byte_perm(xb[j][2 * gi], xb[j][2 * gi + 1], 0x6420),
                                        __byte_perm(xb[j][2 * gi], xb[j][2 * gi + 1], 0x7531)};
                float c[4] = {0.f, 0.f, 0.f, 0.f};
                mma_e4m3(c, A, bf);
                const float sg0 = group_scale(0, gi), sg1 = group_scale(1, gi);
                blk[j][0] = fmaf(c[0], sg0, blk[j][0]);
                blk[j][1] = fmaf(c[1], sg0, blk[j][1]);
                blk[j][2] = fmaf(c[2], sg1, blk[j][2]);
                blk[j][3] = fmaf(c[3], sg1, blk[j][3]);
                if (gi % 4 == 3) {  // end of a 128-block: its activation scales
                  const float s0 = xsc[j][gi / 4][0], s1 = xsc[j][gi / 4][1];
                  cur[j][0] = fmaf(blk[j][0], s0, cur[j][0]);
                  cur[j][1] = fmaf(blk[j][1], s1, cur[j][1]);
                  cur[j][2] = fmaf(blk[j][2], s0, cur[j][2]);
                  cur[j][3] = fmaf(blk[j][3], s1, cur[j][3]);
                }
              }
            }
          }
        }
        if (kSwiglu && s == stages - 1) {  // W1 done: W3 follows
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              first[j][e] = cur[j][e];
              cur[j][e] = 0.f;
            }
        }
      }
      cp_async_wait<0>();
    }
    // K slices: partials through shared memory, added by slice 0 in slice order.
    constexpr int kVals = kParts * NT * 4;
    auto val = [&](int i) -> float& { return i < NT * 4 ? (kSwiglu ? first : cur)[i / 4][i % 4] : cur[(i - NT * 4) / 4][i % 4]; };
    if (ks > 1) {
      float* mine = red + (warp * 32 + lane) * kVals;
#pragma unroll
      for (int i = 0; i < kVals; ++i) mine[i] = val(i);
      __syncthreads();
      if (slice == 0) {
        for (int o = 1; o < ks; ++o) {
          const float* other = red + ((warp + o) * 32 + lane) * kVals;
#pragma unroll
          for (int i = 0; i < kVals; ++i) val(i) += other[i];
        }
      }
      __syncthreads();  // red is reused by the next pass
    }
    if (live && slice == 0) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t n = row0 + g + 8 * (e >> 1), r = t0 + 8 * j + 2 * t4 + (e & 1);
          if (n < N && r < p.rows) p.y[(p.base + r) * a.ldy + n] = kSwiglu ? swiglu_value(first[j][e], cur[j][e], a.swiglu_limit) : cur[j][e];
        }
    }
  }
}

template <int FMT, bool SF32, int NT, bool kSwiglu>
void launch_skinny_nt(const GemmArgs& a, int ks, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = skinny_smem<FMT, SF32, NT, kSwiglu>();
  static std::atomic<uint64_t> raised{0};
  allow_dynamic_smem(raised, skinny_kernel<FMT, SF32, NT, kSwiglu>, smem);
  launch_pdl(skinny_kernel<FMT, SF32, NT, kSwiglu>, grid, kSkWarps * 32, smem, stream, a, ks);
}

template <int FMT, bool SF32, bool kSwiglu>
void launch_skinny(const GemmArgs& a, cudaStream_t stream) {
  // K slices until the launch has about 16 warps per SM or each slice is 1 stage.
  // (Stopping before a second wave instead measured slower: 64-token MoE layer 1.87 -> 2.44 ms.)
  const int64_t tiles = (a.N + 15) / 16, stages = a.K / kSkStageK<FMT>;
  int ks = 1;
  while (ks < kSkWarps && tiles * a.Z * ks < sm_count() * 16 && stages % (2 * ks) == 0) ks *= 2;
  const int64_t per_block = kSkWarps / ks;
  const dim3 grid(unsigned((tiles + per_block - 1) / per_block), 1, unsigned(a.Z));
  // Two B column tiles per pass where problems have more than 8 rows (weights streamed once).
  if (a.expected_rows() > 8) launch_skinny_nt<FMT, SF32, 2, kSwiglu>(a, ks, grid, stream);
  else launch_skinny_nt<FMT, SF32, 1, kSwiglu>(a, ks, grid, stream);
}

__global__ void padded_scales_kernel(const uint8_t* s, bool f32, int64_t rows, int64_t cols, int64_t ld, float* out) {
  pdl_prologue();
  const int64_t n = rows * ld;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ld, c = i % ld;
    out[i] = c < cols ? (f32 ? scale_at<true>(s, r * cols + c) : scale_at<false>(s, r * cols + c)) : 0.f;
  }
}

template <int FMT, bool SF32>
void launch_mma(const GemmArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> raised{0};
  allow_dynamic_smem(raised, mma_kernel<FMT, SF32>, sizeof(Smem));
  dim3 grid(unsigned((a.N + kTN - 1) / kTN), unsigned((a.max_rows + kTM - 1) / kTM), unsigned(a.Z));
  launch_pdl(mma_kernel<FMT, SF32>, grid, 256, sizeof(Smem), stream, a);
}

// The warpgroup kernel's conditions: the weight's (wgmma_weight_fits) and BF16 activation rows in
// 16-byte pieces (GemmArgs::xb).
bool wgmma_fits(const GemmArgs& a) {
  return wgmma_weight_fits(a.wd, a.K) && a.xb && a.ldxb % 8 == 0 && (reinterpret_cast<uintptr_t>(a.xb) & 15) == 0;
}

std::atomic<uint64_t> wgmma_launches{0}, wgmma_swiglu_launches{0};

template <bool kSwiglu>
void launch_wgmma(const GemmArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> raised{0};
  allow_dynamic_smem(raised, wgmma_fp4_kernel<kSwiglu>, sizeof(WgTile));
  const int64_t channels = kWgChannels<kSwiglu>;
  dim3 grid(unsigned((a.N + channels - 1) / channels), unsigned((a.max_rows + WgTile::kTokens - 1) / WgTile::kTokens),
            unsigned(a.Z));
  launch_pdl(wgmma_fp4_kernel<kSwiglu>, grid, kWgThreads, sizeof(WgTile), stream, a);
  (kSwiglu ? wgmma_swiglu_launches : wgmma_launches).fetch_add(1, std::memory_order_relaxed);
  DSV4_LAUNCH_CHECK();
}

// The FP8 warpgroup kernel's conditions: FP8 weights over whole 128-column chunks (K up to
// kWg8MaxK), problems starting on a scale block, weight and activation rows in 16-byte pieces
// (the weight arena aligns every weight; expert descriptors stay on the device, so only a.wd is
// checked here).
bool wgmma_fp8_fits(const GemmArgs& a) {
  return a.wd.fmt == kFP8 && a.K > 0 && a.K % kWgK == 0 && a.K <= kWg8MaxK && a.w_z_row_off % kWg8Rows == 0 &&
         (reinterpret_cast<uintptr_t>(a.wd.w) & 15) == 0 && a.ldxq % 16 == 0 &&
         (reinterpret_cast<uintptr_t>(a.xq) & 15) == 0;
}

std::atomic<uint64_t> wgmma_fp8_launches{0};

template <bool SF32>
void launch_wgmma_fp8(const GemmArgs& a, cudaStream_t stream) {
  static std::atomic<uint64_t> raised{0};
  allow_dynamic_smem(raised, wgmma_fp8_kernel<SF32>, sizeof(Fp8WgTile));
  // Persistent blocks (one an SM, shared memory): about one wave over all problems.
  const int64_t tiles = (a.max_rows + kWg8Rows - 1) / kWg8Rows * ((a.N + kWg8Rows - 1) / kWg8Rows);
  const dim3 grid(unsigned(std::clamp<int64_t>(sm_count() / a.Z, 1, tiles)), 1, unsigned(a.Z));
  launch_pdl(wgmma_fp8_kernel<SF32>, grid, kWgThreads, sizeof(Fp8WgTile), stream, a);
  wgmma_fp8_launches.fetch_add(1, std::memory_order_relaxed);
  DSV4_LAUNCH_CHECK();
}

}  // namespace

bool wgmma_weight_fits(const WeightDesc& w, int64_t K) {
  return w.fmt == kFP4 && !w.scale_f32 && K > 0 && K % kWgK == 0;
}

uint64_t wgmma_launch_count() { return wgmma_launches.load(std::memory_order_relaxed); }
uint64_t wgmma_swiglu_launch_count() { return wgmma_swiglu_launches.load(std::memory_order_relaxed); }
uint64_t wgmma_fp8_launch_count() { return wgmma_fp8_launches.load(std::memory_order_relaxed); }

bool wgmma_available() {
  // DSV4_CUDA_WGMMA=0: the mma.sync kernel everywhere (A/B measurements).
  static const bool on = env_flag_default_on("DSV4_CUDA_WGMMA");
  if (!on || device_attribute<cudaDevAttrComputeCapabilityMajor>() != 9) return false;
  // This binary holds sm_90a code, the image an SM 9.x device runs (binaryVersion says 90 for a
  // plain sm_90 image too, whose kernel body is a trap: the build says which it made).
#ifdef DSV4_BUILT_FOR_SM90A
  static const bool compiled = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, wgmma_fp4_kernel<false>) == cudaSuccess && attr.binaryVersion == 90;
  }();
#else
  constexpr bool compiled = false;
#endif
  return compiled;
}

void act_quant(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q, int64_t ldq, float* scales,
               float* roundtrip, uint16_t* bf16, cudaStream_t stream) {
  const int64_t warps = M * ((K + 127) / 128);
  if (warps <= 0) return;
  launch_pdl(act_quant_kernel, blocks_for(warps * 32), 256, 0, stream, x, M, K, ldx, pow2, q, ldq, scales, roundtrip,
             bf16);
  DSV4_LAUNCH_CHECK();
}

void padded_block_scales(const uint8_t* s, bool scale_f32, int64_t N, int64_t K, float* out, cudaStream_t stream) {
  const int64_t rows = (N + 127) / 128, cols = (K + 127) / 128, ld = padded_scale_cols(K);
  launch_pdl(padded_scales_kernel, blocks_for(rows * ld), 256, 0, stream, s, scale_f32, rows, cols, ld, out);
  DSV4_LAUNCH_CHECK();
}

bool gemm_skinny(const GemmArgs& a, bool swiglu, cudaStream_t stream) {
  bool fits = false;
  if (a.wd.fmt == kBF16) {  // FP32 rows, 8-byte aligned pairs; one row stays on the stream GEMV
    // DSV4_CUDA_SKINNY_BF16=0: the FP32 GEMV/tiled kernels instead (H200, 8-token decode step of
    // 30 layers 30.8 -> 28.8 ms, docs/PERF.md).
    static const bool on = env_flag_default_on("DSV4_CUDA_SKINNY_BF16");
    if (!on) return false;
    const int64_t rows = a.expected_rows();
    fits = !a.xq && rows >= 2 && a.max_rows <= kSkinnyBf16MaxRows && a.ldx % 2 == 0 && a.x_z_off % 2 == 0 &&
           (reinterpret_cast<uintptr_t>(a.x) & 7) == 0;
  } else {
    fits = a.xq && (a.max_rows <= kGemvMaxRows || a.force_gemv) && !a.x_z_off && a.ldxq % 16 == 0 && a.xs;
  }
  if (!fits) return false;
  bool launched = false;
  dispatch_format(a.wd, [&]<int F, bool S>() {
    if constexpr (F == kFP8 || F == kFP4 || F == kBF16) {
      if (skinny_fits(F, a.K)) {
        swiglu ? launch_skinny<F, S, true>(a, stream) : launch_skinny<F, S, false>(a, stream);
        launched = true;
      }
    }
  });
  if (launched) DSV4_LAUNCH_CHECK();
  return launched;
}

// Whether FP8-activation arguments may go to a warpgroup kernel at all (their operand rows never
// take x_z_off), then whether gemm() and gemm_swiglu_warpgroup() give them to the FP4 one and
// gemm() to the FP8 one.
static bool warpgroup_allowed(const GemmArgs& a) {
  return a.xq && a.xs && !a.x_z_off && a.warpgroup_mma && wgmma_available();
}
static bool takes_wgmma(const GemmArgs& a) { return warpgroup_allowed(a) && wgmma_fits(a); }
static bool takes_wgmma_fp8(const GemmArgs& a) { return warpgroup_allowed(a) && wgmma_fp8_fits(a); }

bool gemm_swiglu_warpgroup(const GemmArgs& a, cudaStream_t stream) {
  const bool fits = takes_wgmma(a) && a.wd3.fmt == a.wd.fmt && a.wd3.scale_f32 == a.wd.scale_f32;
  if (fits) launch_wgmma<true>(a, stream);
  return fits;
}

void gemm_fp8_tensor_core(const GemmArgs& a, cudaStream_t stream) {
  if (a.K % 32 || a.x_z_off || !a.xs)
    std::fprintf(stderr, "gemm_fp8_tensor_core: unsupported arguments (K %% 32, x_z_off, scales)\n"), std::abort();
  if (gemm_skinny(a, false, stream)) return;
  if (takes_wgmma(a)) return launch_wgmma<false>(a, stream);
  if (takes_wgmma_fp8(a)) return a.wd.scale_f32 ? launch_wgmma_fp8<true>(a, stream) : launch_wgmma_fp8<false>(a, stream);
  switch (a.wd.fmt) {
    case kFP8: a.wd.scale_f32 ? launch_mma<kFP8, true>(a, stream) : launch_mma<kFP8, false>(a, stream); break;
    case kFP4: a.wd.scale_f32 ? launch_mma<kFP4, true>(a, stream) : launch_mma<kFP4, false>(a, stream); break;
    default: std::fprintf(stderr, "gemm_fp8_tensor_core: weights are not FP8 or FP4\n"), std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
