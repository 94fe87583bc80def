// FP8 activations (the official kernels' numerics, Backend::set_act_quant) on the GPU against the
// CPU reference simulating them: the quantiser bit for bit, then every GEMM path (FP32 GEMV on the
// round trip, the portable mma.sync kernel, cuBLASLt's block-scaled FP8 GEMM on sm_90), the MoE
// and one-layer models of every kind. Skipped (never passed) without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <cuda_runtime.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/kernels.h"
#include "util/error.h"
#include "cuda_test_util.h"
#include "../model/fp8_fixtures.h"
#include "model/forward.h"
#include "model/tiny.h"
#include "tensor/numeric.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

using Path = CudaOptions::Fp8Gemm;

const char* path_name(Path p) {
  return p == Path::Auto ? "auto" : p == Path::Kernel ? "mma-kernel" : p == Path::CublasLt ? "cublaslt" : "wgmma";
}

bool is_sm90() {
  cudaDeviceProp p{};
  return cudaGetDeviceProperties(&p, 0) == cudaSuccess && p.major == 9;
}

// Tensor-core tolerance: Hopper's FP8 wgmma (cuBLASLt's) adds products in an accumulator narrower
// than FP32 (about 14 mantissa bits, the reason DeepGEMM promotes partial sums every 128), so
// each 128-partial carries up to ~2^-13 relative error: 1e-3 of max |y| bounds it for K up to
// 8192 (cuBLASLt measured 1.4-3.5e-4; an E4M3-operand wgmma kernel of ours 1.1-3.4e-4). Our
// mma.sync kernel measures ~3e-7 (FP32-like) under the same bound, and so must our BF16-operand
// warpgroup kernel for FP4 weights. The GEMV path is plain FP32 FMA on the round trip.
constexpr float kTensorCoreTol = 1e-3f, kGemvTol = 1e-4f;

// Where an FP8 quantiser sits downstream of GPU arithmetic (the MoE's w2 input: SwiGLU of the
// w1/w3 outputs), a 1-ulp difference can move a value across an E4M3 rounding boundary: that
// element then differs by one E4M3 step (2^-3 relative) on one side. Such flips are rare (about
// ulp / step ~ 1e-6 of the elements) and each moves an output by far less than 1e-2 of the
// scale; a wrong kernel moves most outputs. So: >= 99.9 % of outputs within kTensorCoreTol,
// every output within 1e-2 of max |ref|.
// every_row_flips: a GEMM upstream of the quantiser accumulates in less than FP32 (Hopper's FP8
// wgmma: cuBLASLt's), so most rows hold a flip and only the bound of a flip (1e-2 of max |ref|)
// and NaN-freedom apply; a wrong row, expert or scale still moves outputs by O(1) of the scale.
void expect_close_up_to_flips(const std::vector<float>& ref, const std::vector<float>& got, const std::string& what,
                              bool every_row_flips = false) {
  ASSERT_EQ(ref.size(), got.size());
  float scale = 0.f;
  for (float v : ref) scale = std::max(scale, std::fabs(v));
  int64_t loose = 0, nan = 0;
  float worst = 0.f;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i])) ++nan;
    const float e = std::fabs(got[i] - ref[i]);
    worst = std::max(worst, e);
    loose += e > kTensorCoreTol * scale;
  }
  std::printf("[maxerr] %-48s n=%-9zu rel=%.3e outside %.0e: %lld\n", what.c_str(), ref.size(), worst / scale,
              kTensorCoreTol, (long long)loose);
  EXPECT_EQ(nan, 0) << what;
  if (!every_row_flips) {
    EXPECT_LE(double(loose), 1e-3 * double(ref.size())) << what;
  }
  EXPECT_LE(worst, 1e-2f * scale) << what;
}

}  // namespace

// The quantiser: E4M3 bytes, scales and round trip identical to tensor/quant.h's, including
// partial blocks, the 1e-4 amax floor, zeros, huge values and both scale formats.
TEST(CudaFp8, ActQuantBitExact) {
  DSV4_REQUIRE_GPU();
  for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{33, 4096}, {5, 200}, {1, 128}, {64, 2048}}) {
    for (bool pow2 : {true, false}) {
      auto x = normal(M * K, uint64_t(M * K + pow2), 3.f);
      for (int64_t i = 0; i < K && i < 128; ++i) x[i] = 1e-7f * float(i % 3);  // block under the amax floor
      if (K >= 256)
        for (int64_t i = 128; i < 256; ++i) x[i] = 0.f;  // all-zero block
      x[M * K - 1] = 3.0e4f;                             // large scale
      const int64_t nkb = (K + 127) / 128, ldq = (K + 15) / 16 * 16;
      std::vector<uint8_t> q_ref(M * ldq, 0), q_got(M * ldq, 0);
      std::vector<float> s_ref(nkb * M), s_got(nkb * M), rt_ref(M * K), rt_got(M * K);
      std::vector<float> srow(nkb);
      for (int64_t m = 0; m < M; ++m) {
        fp8_dynamic_quant(x.data() + m * K, K, kActBlock, pow2, q_ref.data() + m * ldq, srow.data(),
                          rt_ref.data() + m * K);
        for (int64_t b = 0; b < nkb; ++b) s_ref[b * M + m] = srow[b];
      }
      // BF16 rows (the warpgroup kernel's operand): the round trip's values as BF16 (exact with
      // power-of-two scales) in the kernel's column order, padding columns untouched.
      std::vector<uint16_t> b_ref(M * ldq, 0x7fc1), b_got(M * ldq);
      std::vector<int> hits(K, 0);  // the order is a permutation of the row's columns
      for (int64_t k = 0; k < K; ++k) ++hits.at(size_t(cuda::wgmma_bf16_column(k, K)));
      ASSERT_EQ(std::count(hits.begin(), hits.end(), 1), K) << K;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) b_ref[m * ldq + cuda::wgmma_bf16_column(k, K)] = f32_to_bf16(rt_ref[m * K + k]);
      float *dx, *ds, *drt;
      uint8_t* dq;
      uint16_t* db;
      ASSERT_EQ(cudaMalloc(&db, b_got.size() * 2), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&dx, x.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&ds, s_got.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&drt, rt_got.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&dq, q_got.size()), cudaSuccess);
      cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
      cudaMemset(dq, 0, q_got.size());
      cudaMemset(ds, 0xff, s_got.size() * 4);
      cudaMemset(drt, 0xff, rt_got.size() * 4);
      cudaMemset(db, 0xff, size_t(M * ldq) * 2);
      for (int64_t m = 0; m < M; ++m)  // padding columns keep a marker the kernel must not touch
        if (ldq > K) cudaMemcpy(db + m * ldq + K, b_ref.data() + m * ldq + K, size_t(ldq - K) * 2, cudaMemcpyHostToDevice);
      cuda::act_quant(dx, M, K, K, pow2, dq, ldq, ds, drt, db, nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      cudaMemcpy(q_got.data(), dq, q_got.size(), cudaMemcpyDeviceToHost);
      cudaMemcpy(s_got.data(), ds, s_got.size() * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(rt_got.data(), drt, rt_got.size() * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(b_got.data(), db, b_got.size() * 2, cudaMemcpyDeviceToHost);
      cudaFree(db);
      cudaFree(dx);
      cudaFree(ds);
      cudaFree(drt);
      cudaFree(dq);
      int64_t bad_q = 0, bad_s = 0, bad_rt = 0, bad_b = 0;
      for (size_t i = 0; i < b_ref.size(); ++i) bad_b += b_ref[i] != b_got[i];
      int64_t inexact_b = 0;  // with power-of-two scales every BF16 value is the round trip exactly
      for (int64_t m = 0; pow2 && m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const float v = bf16_to_f32(b_got[m * ldq + cuda::wgmma_bf16_column(k, K)]);
          inexact_b += std::memcmp(&v, &rt_got[m * K + k], 4) != 0;
        }
      EXPECT_EQ(inexact_b, 0) << M << "x" << K << ": BF16 rows are not the round trip's values";
      for (size_t i = 0; i < q_ref.size(); ++i) bad_q += q_ref[i] != q_got[i];
      for (size_t i = 0; i < s_ref.size(); ++i) bad_s += std::memcmp(&s_ref[i], &s_got[i], 4) != 0;
      for (size_t i = 0; i < rt_ref.size(); ++i) bad_rt += std::memcmp(&rt_ref[i], &rt_got[i], 4) != 0;
      EXPECT_EQ(bad_q, 0) << M << "x" << K << " pow2=" << pow2 << ": E4M3 bytes differ";
      EXPECT_EQ(bad_s, 0) << M << "x" << K << " pow2=" << pow2 << ": scales differ";
      EXPECT_EQ(bad_rt, 0) << M << "x" << K << " pow2=" << pow2 << ": round trip differs";
      EXPECT_EQ(bad_b, 0) << M << "x" << K << " pow2=" << pow2 << ": BF16 rows differ";
    }
  }
}

// One-row FP8 linears round x through FP8 inside the stream GEMV (no act_quant launch): the
// output must be bit for bit the GEMV's on the round trip act_quant makes (both scale formats,
// a row with a block under the amax floor and an all-zero block).
TEST(CudaFp8, GemvRoundTripMatchesActQuant) {
  DSV4_REQUIRE_GPU();
  WeightStore ws;
  uint64_t seed = 4500;
  for (auto [in, out] : std::vector<std::pair<int64_t, int64_t>>{{4096, 1024}, {1024, 32768}, {8192, 4096}}) {
    Linear w = ws.linear("w", WeightFormat::FP8, out, in, ++seed, false);
    auto xv = normal(in, ++seed, 2.f);
    for (int64_t k = 0; k < in; ++k) xv[k] *= std::exp2(float((k / 128) % 7 - 3));
    for (int64_t k = 0; k < 128; ++k) xv[k] = 1e-7f * float(k % 3);
    for (int64_t k = 128; k < 256; ++k) xv[k] = 0.f;
    for (ActQuant mode : {ActQuant::Fp8Pow2, ActQuant::Fp8}) {
      std::vector<float> rt(in), scales(in / 128);
      std::vector<uint8_t> q(in);
      fp8_dynamic_quant(xv.data(), in, kActBlock, mode == ActQuant::Fp8Pow2, q.data(), scales.data(), rt.data());
      std::vector<float> fused(out), plain(out);
      for (bool fuse : {true, false}) {
        auto gpu = poisoned_cuda_backend({});
        gpu->set_act_quant(fuse ? mode : ActQuant::None);
        Tensor xg = gpu->alloc({1, in}), yg = gpu->alloc({1, out});
        gpu->upload(xg, (fuse ? xv : rt).data());
        gpu->linear(xg, w, yg);
        gpu->download(yg, (fuse ? fused : plain).data());
      }
      int64_t differ = 0;
      for (int64_t i = 0; i < out; ++i) differ += std::memcmp(&fused[i], &plain[i], 4) != 0;
      EXPECT_EQ(differ, 0) << in << "->" << out << " pow2=" << (mode == ActQuant::Fp8Pow2);
      float scale = 0.f;
      for (float v : plain) scale = std::max(scale, std::fabs(v));
      EXPECT_GT(scale, 0.f);
    }
  }
}

// linear() with FP8 activations, every GEMM path, real shapes, against the CPU simulation.
TEST(CudaFp8, LinearAllPaths) {
  DSV4_REQUIRE_GPU();
  struct C {
    WeightFormat fmt;
    int64_t T, in, out;
    bool f32_scale;
    float fp4_span = 1.f;  // FP4 group scales 2^U(-span, span): from about 4 some 128-column stages
                           // span more than 8 octaves and stay unfolded (per-32 promotion)
  };
  const std::vector<C> cases = {
      {WeightFormat::FP8, 1, 4096, 1024, false},     // wq_a decode: GEMV on the round trip
      {WeightFormat::FP8, 3, 4096, 1024, false},     // 2-3 rows: the skinny tensor-core kernel
      {WeightFormat::FP8, 4, 8192, 4096, false},     // wo_b, 4 tokens: tensor cores
      {WeightFormat::FP8, 8, 1024, 32768, false},    // wq_b, 8 tokens
      {WeightFormat::FP8, 16, 4096, 1024, false},
      {WeightFormat::FP8, 17, 4096, 1024, false},    // just above the GEMV bound
      {WeightFormat::FP8, 300, 1024, 32768, false},  // wq_b prefill
      {WeightFormat::FP8, 64, 4096, 1024, false},    // wq_a, a cuBLASLt-friendly M
      {WeightFormat::FP8, 1024, 8192, 4096, false},  // wo_b prefill
      {WeightFormat::FP8, 100, 192, 200, true},      // partial 128-blocks in K and N, f32 scales
      {WeightFormat::FP8, 200, 512, 200, false},     // partial row and weight tiles, 4 chunks of K
      {WeightFormat::FP8, 130, 384, 256, true},      // f32 block scales, 3 chunks (fewer than loaded ahead)
      {WeightFormat::FP8, 200, 256, 8960, false},    // more tiles than blocks, copies running tiles ahead
      {WeightFormat::FP4, 64, 4096, 2048, false},    // expert w1 shape
      {WeightFormat::FP4, 200, 2048, 4096, true},    // expert w2 shape, f32 scales
      {WeightFormat::FP4, 33, 96, 40, false},        // tiny, partial tiles
      {WeightFormat::FP4, 64, 4096, 2048, false, 3.5f},  // folded stages with shifts up to 8 (subnormal E4M3)
      {WeightFormat::FP4, 64, 4096, 2048, false, 7.f},  // wide group scales: mostly unfolded stages
      {WeightFormat::FP4, 40, 2048, 300, true, 7.f},    // the same with f32 scales, partial N tile
      {WeightFormat::FP4, 300, 4096, 2048, false, 7.f},  // E8M0: the wgmma kernel's 128-token tiles, one partial
      {WeightFormat::FP4, 200, 1024, 300, false},        // a partial weight tile, K of 8 chunks
      {WeightFormat::FP4, 150, 128, 256, false},         // K of one chunk
      {WeightFormat::FP4, 100, 128, 512, false},         // one chunk (fewer than loaded ahead)
      // Few rows on the weight-streaming tensor-core kernel (FP8 with the Kernel path from 4 rows):
      {WeightFormat::FP8, 2, 8192, 4096, false},     // K split across the block's warps
      {WeightFormat::FP8, 12, 1024, 4096, false},    // two B tiles per pass
      {WeightFormat::FP8, 3, 256, 200, true},        // partial 16-row tile, f32 scales
      {WeightFormat::FP4, 1, 4096, 2048, false},     // expert w1, one token
      {WeightFormat::FP4, 5, 2048, 4096, true},      // expert w2, f32 group scales
      {WeightFormat::FP4, 16, 512, 40, false},       // partial tile, 16 rows
  };
  auto cpu = make_cpu_backend();
  cpu->set_act_quant(ActQuant::Fp8Pow2);
  std::vector<Path> paths = {Path::Kernel, Path::Auto};
  if (is_sm90()) paths.insert(paths.end(), {Path::CublasLt, Path::Warpgroup});
  EXPECT_EQ(is_sm90(), cuda::wgmma_available()) << "an sm_90 build without the warpgroup-MMA kernel";
  int cublaslt_ran = 0;
  WeightStore ws;
  uint64_t seed = 4000;
  for (const auto& c : cases) {
    Linear w = ws.linear("w", c.fmt, c.out, c.in, ++seed, c.f32_scale, false, c.fp4_span);
    // Activation scales that differ per row and per 128-block, so a wrong scale layout shows.
    auto xv = normal(c.T * c.in, ++seed, 2.f);
    for (int64_t r = 0; r < c.T; ++r)
      for (int64_t k = 0; k < c.in; ++k) xv[r * c.in + k] *= std::exp2(float(r % 7 - 3 + (k / 128) % 5 - 2));
    Tensor xc = cpu->alloc({c.T, c.in}), yc = cpu->alloc({c.T, c.out});
    cpu->upload(xc, xv.data());
    cpu->linear(xc, w, yc);
    std::vector<float> ref(c.T * c.out);
    cpu->download(yc, ref.data());
    // Exact-mode output: the quantisation must be visible, or the flag is not wired.
    cpu->set_act_quant(ActQuant::None);
    Tensor ye = cpu->alloc({c.T, c.out});
    cpu->linear(xc, w, ye);
    std::vector<float> exact(c.T * c.out);
    cpu->download(ye, exact.data());
    cpu->set_act_quant(ActQuant::Fp8Pow2);
    float diff = 0.f;
    for (size_t i = 0; i < ref.size(); ++i) diff = std::max(diff, std::fabs(ref[i] - exact[i]));
    EXPECT_GT(diff, 0.f) << "FP8 activations did not change the CPU result";
    for (Path p : paths) {
      if (p == Path::CublasLt && c.fmt != WeightFormat::FP8) continue;
      // FP8 weights leave the GEMV at kFp8TensorCoreMinRows rows, FP4 ones above kGemvMaxRows.
      const bool gemv = c.T < (c.fmt == WeightFormat::FP8 ? cuda::kFp8TensorCoreMinRows : cuda::kGemvMaxRows + 1);
      if (p == Path::CublasLt && gemv) continue;
      CudaOptions o;
      o.fp8_gemm = p;
      auto gpu = poisoned_cuda_backend(o);
      gpu->set_act_quant(ActQuant::Fp8Pow2);
      Tensor xg = gpu->alloc({c.T, c.in}), yg = gpu->alloc({c.T, c.out});
      gpu->upload(xg, xv.data());
      const uint64_t wgmma_before = cuda::wgmma_launch_count(), wgmma_fp8_before = cuda::wgmma_fp8_launch_count();
      try {
        gpu->linear(xg, w, yg);
      } catch (const Error& e) {  // forced cuBLASLt on a shape it offers no algorithm for
        ASSERT_EQ(p, Path::CublasLt) << e.what();
        std::printf("[cublaslt] not offered: %s\n", e.what());
        continue;
      }
      cublaslt_ran += p == Path::CublasLt;
      // The warpgroup kernel runs exactly where it should: FP4 with E8M0 scales, whole 128-column
      // blocks, past the GEMV rows, on the Auto and Warpgroup paths of an sm_90a build.
      const bool wgmma_expected = (p == Path::Auto || p == Path::Warpgroup) && cuda::wgmma_available() &&
                                  c.fmt == WeightFormat::FP4 && !c.f32_scale && c.in % 128 == 0 && !gemv;
      EXPECT_EQ(cuda::wgmma_launch_count() > wgmma_before, wgmma_expected)
          << path_name(p) << " T=" << c.T << " in=" << c.in << " out=" << c.out;
      // The FP8-weight warpgroup kernel: FP8 weights over whole 128-column blocks past the
      // weight-streaming rows, on the Warpgroup path (Auto takes cuBLASLt where it offers one).
      const bool wgmma_fp8_expected = p == Path::Warpgroup && cuda::wgmma_available() && c.fmt == WeightFormat::FP8 &&
                                      c.in % 128 == 0 && c.T > cuda::kGemvMaxRows;
      if (p != Path::Auto) {
        EXPECT_EQ(cuda::wgmma_fp8_launch_count() > wgmma_fp8_before, wgmma_fp8_expected)
            << path_name(p) << " T=" << c.T << " in=" << c.in << " out=" << c.out;
      }
      std::vector<float> got(c.T * c.out);
      gpu->download(yg, got.data());
      expect_close(ref, got, gemv ? kGemvTol : kTensorCoreTol,
                   fmt::format("fp8-act linear {} fmt={} T={} in={} out={}{}", path_name(p), int(c.fmt), c.T, c.in,
                               c.out, c.f32_scale ? " f32scale" : ""));
    }
  }
  if (is_sm90()) {
    EXPECT_GT(cublaslt_ran, 0) << "cuBLASLt's block-scaled FP8 GEMM never ran";
  }
}

// The MoE with FP8 activations: routed FP4 experts through the tensor-core kernel (gathered rows)
// or the GEMV, FP8 shared expert through linear(). The portable kernel accumulates in FP32 like
// the CPU. On sm_90 the Auto path's shared expert takes cuBLASLt and the Warpgroup path's our FP8
// warpgroup kernel (both bound at the linear level by LinearAllPaths), whose FP8 MMAs accumulate
// narrower than FP32: their ~1e-4 deviations requantised in the w2 input flip E4M3 roundings in
// most rows (measured on the H200, with an FP8-accumulating kernel for the routed experts too:
// 0.1-1.4 % of outputs outside 1e-3, at most 7.2e-3 of max |ref|), so there only the flip bound
// holds it (expect_close_up_to_flips, every_row_flips).
TEST(CudaFp8, MoE) {
  DSV4_REQUIRE_GPU();
  struct C {
    int64_t T, D, F, E, k;
    WeightFormat fmt = WeightFormat::FP4;
  };
  auto cpu = make_cpu_backend();
  cpu->set_act_quant(ActQuant::Fp8Pow2);
  WeightStore ws;
  uint64_t seed = 5000;
  // Runs of FP4 experts (Auto and Warpgroup paths) that launched the warpgroup kernel: w2 plain,
  // w1 and w3 with the SwiGLU fused.
  int64_t wgmma_moe_runs = 0, fused_moe_runs = 0, wgmma_fp8_moe_runs = 0, wgmma_fp8_moe_expected = 0;
  // 1, 8 and 64 tokens over 256 experts and 16 over 32 (some experts get more than 8 rows: a second
  // pass) take the weight-streaming kernel; 300 and 512 the tiled one.
  // The tiled sizes also run the Auto and Warpgroup paths (sm_90a: the warpgroup-MMA kernels), and
  // FP8 experts.
  for (auto c : std::vector<C>{{1, 4096, 2048, 256, 6}, {8, 4096, 2048, 256, 6}, {64, 4096, 2048, 256, 6},
                               {16, 1024, 512, 32, 6}, {300, 1024, 512, 32, 6}, {512, 4096, 2048, 16, 6},
                               {300, 1024, 320, 32, 6},  // a partial fused w1/w3 channel tile; w2's K of 320 is no wgmma shape
                               {300, 1024, 512, 32, 6, WeightFormat::FP8}}) {
    RandomMoE rm = random_moe(ws, c.fmt, c.T, c.D, c.F, c.E, c.k, true, false, seed);
    auto xv = normal(c.T * c.D, ++seed, 2.f);
    for (int64_t r = 0; r < c.T; ++r)
      for (int64_t k = 0; k < c.D; ++k) xv[r * c.D + k] *= std::exp2(float(r % 5 - 2 + (k / 128) % 3 - 1));
    auto run_moe = [&](Backend& be) {  // the routed layer on x, its output downloaded
      Tensor x = be.alloc({c.T, c.D}), w = be.alloc({c.T, c.k}), e = be.alloc({c.T, c.k}, ElemType::I32),
             out = be.alloc({c.T, c.D});
      be.upload(x, xv.data());
      be.upload(w, rm.gates.data());
      be.upload(e, rm.experts.data());
      be.moe(x, rm.moe, w, e, 10.f, out);
      std::vector<float> y(c.T * c.D);
      be.download(out, y.data());
      return y;
    };
    const std::vector<float> ref = run_moe(*cpu);
    std::vector<Path> paths = {Path::Kernel, Path::Auto};
    if (is_sm90()) paths.push_back(Path::Warpgroup);
    for (Path p : paths) {
      CudaOptions o;
      o.fp8_gemm = p;
      auto gpu = poisoned_cuda_backend(o);
      gpu->set_act_quant(ActQuant::Fp8Pow2);
      const uint64_t wgmma_before = cuda::wgmma_launch_count(), fused_before = cuda::wgmma_swiglu_launch_count();
      const uint64_t wgmma_fp8_before = cuda::wgmma_fp8_launch_count();
      const std::vector<float> got = run_moe(*gpu);
      wgmma_moe_runs += cuda::wgmma_launch_count() > wgmma_before;
      fused_moe_runs += cuda::wgmma_swiglu_launch_count() > fused_before;
      if (p == Path::Warpgroup) {
        wgmma_fp8_moe_runs += cuda::wgmma_fp8_launch_count() > wgmma_fp8_before;
        wgmma_fp8_moe_expected += c.T > cuda::kGemvMaxRows;  // the shared expert's rows
      }
      expect_close_up_to_flips(ref, got,
                               fmt::format("fp8-act moe {} {} T={} D={} F={} E={} k={}", path_name(p),
                                           c.fmt == WeightFormat::FP8 ? "fp8" : "fp4", c.T, c.D, c.F, c.E, c.k),
                               p != Path::Kernel && is_sm90());
    }
  }
  // The tiled FP4 sizes (300 and 512 tokens) on the Auto and Warpgroup paths take the warpgroup
  // kernel on sm_90a, for w1/w3 with the SwiGLU fused (all three sizes) and w2 (F = 512, 2048).
  EXPECT_EQ(wgmma_moe_runs, cuda::wgmma_available() ? 4 : 0);
  EXPECT_EQ(fused_moe_runs, cuda::wgmma_available() ? 6 : 0);
  // The Warpgroup path's FP8 shared expert (and FP8 experts) on the FP8 warpgroup kernel.
  EXPECT_EQ(wgmma_fp8_moe_runs, cuda::wgmma_available() ? wgmma_fp8_moe_expected : 0);
}

// Whole models with FP8 activations: CUDA (the portable kernel, FP32 accumulation as the CPU) vs
// the CPU simulation, on one-layer models of every layer kind. Deeper models are no test of the
// kernels: requantisation amplifies summation-order differences through depth until two correct
// runs differ at the quantisation-noise level (fp8_fixtures.h, docs/TESTING.md). Bounds there.
TEST(CudaFp8, OneLayerModelsMatchCpuSimulation) {
  DSV4_REQUIRE_GPU();
  auto cpu = make_cpu_backend();
  CudaOptions o;
  o.fp8_gemm = Path::Kernel;
  Fp8Tally tally;
  for (const Fp8Case& c : fp8_one_layer_cases()) {
    GeneratedModel gm(c.config, 11);
    auto gpu = poisoned_cuda_backend(o);  // a CUDA backend holds one model's weights
    Model mc(gm.config(), gm.weights(), *cpu), mg(gm.config(), gm.weights(), *gpu);
    mc.set_fp8_activations(true);
    mg.set_fp8_activations(true);
    tally.add(c.name, fp8_case_logits(mc), fp8_case_logits(mg), gm.config().vocab_size);
  }
  tally.expect_agreement("one-layer models, GPU (mma kernel) vs CPU simulation");
}
