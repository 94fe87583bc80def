#pragma once
// The official runtime's QAT of the Lightning Indexer (docs/MODEL.md §2.6 step 7 and §2.9): every
// d-value row of the index queries (after RoPE) and of the index keys (after the compressor's norm
// and RoPE) is rotated by the normalised Sylvester Walsh-Hadamard matrix and then rounded through
// FP4 (E2M1) in blocks of 32 with power-of-two scales. One definition serves the CPU backend and
// the CUDA kernel: the same operations in the same order, so both round identically.
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DSV4_HOST_DEVICE __host__ __device__
#else
#define DSV4_HOST_DEVICE
#endif
// Full unrolling on the device: with d a compile-time constant every index is then constant (a
// row indexed at run time is walked through local memory one dependent access at a time).
#ifdef __CUDA_ARCH__
#define DSV4_INDEX_QAT_UNROLL _Pragma("unroll")
#else
#define DSV4_INDEX_QAT_UNROLL
#endif
#ifdef __CUDACC__
#define DSV4_INDEX_QAT_INLINE __forceinline__
#else
#define DSV4_INDEX_QAT_INLINE inline
#endif

namespace dsv4 {

inline constexpr int64_t kIndexQatBlock = 32, kIndexQatMaxDim = 128;
// Rows the QAT is defined for: a power of two from one FP4 block to the official 128 (configs with
// other index widths run without it).
constexpr bool index_qat_applies(int64_t d) {
  return d >= kIndexQatBlock && d <= kIndexQatMaxDim && (d & (d - 1)) == 0;
}

// The E2M1 magnitude nearest to m in [0, 6], ties to the even code (0, 1, 2, 4, 6 as values 0, 1,
// 2, 4 ... of 0, .5, 1, 1.5, 2, 3, 4, 6): the midpoints 0.25, 1.25, 2.5 and 5 round down, 0.75,
// 1.75 and 3.5 up.
DSV4_HOST_DEVICE inline float e2m1_nearest(float m) {
  return m <= 0.25f ? 0.f : m < 0.75f ? 0.5f : m <= 1.25f ? 1.f : m < 1.75f ? 1.5f
       : m <= 2.5f  ? 2.f : m < 3.5f  ? 3.f  : m <= 5.f   ? 4.f : 6.f;
}

// In place on x[0, d), index_qat_applies(d): butterflies of stride 1, 2, ..., d/2 ((a, b) ->
// (a + b, a - b)), times d^-1/2; then per block of 32: scale = 2^ceil(log2(amax / 6)) with amax
// floored at 6 * 2^-126, x = E2M1_RNE(x / scale) * scale (NaN kept; a block holding an infinity
// is left unrounded).
DSV4_HOST_DEVICE DSV4_INDEX_QAT_INLINE void index_qat_row(float* x, int d) {
  DSV4_INDEX_QAT_UNROLL
  for (int s = 0; (1 << s) < d; ++s) {
    const int h = 1 << s;
    DSV4_INDEX_QAT_UNROLL
    for (int t = 0; t < d / 2; ++t) {  // the stage's d / 2 disjoint pairs (j, j + h), j in order
      const int j = (t / h) * 2 * h + t % h;
      const float a = x[j], b = x[j + h];
      x[j] = a + b;
      x[j + h] = a - b;
    }
  }
  const float norm = 1.f / sqrtf(float(d));  // d a power of two: 2^-k or 2^-k / sqrt(2), the same on both sides
  DSV4_INDEX_QAT_UNROLL
  for (int i = 0; i < d; ++i) x[i] *= norm;
  DSV4_INDEX_QAT_UNROLL
  for (int b = 0; b < d; b += int(kIndexQatBlock)) {
    float amax = 6.f * 0x1p-126f;
    DSV4_INDEX_QAT_UNROLL
    for (int i = 0; i < kIndexQatBlock; ++i) amax = fmaxf(amax, fabsf(x[b + i]));  // (NaN ignored)
    if (!(amax <= 0x1.fffffep127f)) continue;  // an infinite value: the block stays as it is
    int e = 0;
    const float m = frexpf(amax / 6.f, &e);  // amax / 6 = m 2^e, m in [0.5, 1)
    const int k = m == 0.5f ? e - 1 : e;     // ceil(log2(amax / 6))
    const float scale = ldexpf(1.f, k), inv = ldexpf(1.f, -k);
    DSV4_INDEX_QAT_UNROLL
    for (int i = 0; i < kIndexQatBlock; ++i) {
      const float v = x[b + i] * inv;
      if (v == v) x[b + i] = copysignf(e2m1_nearest(fabsf(v)), v) * scale;  // NaN stays NaN
    }
  }
}

}  // namespace dsv4
