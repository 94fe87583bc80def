// test-backend-ops style: every Backend op on the CUDA backend against the FP32 CPU reference,
// random inputs, several shapes including the real model's (hidden 4096, 64 heads x 512, q_lora
// 1024, 256 experts top-6, window 128, CSA 4 / HCA 128, index_topk 512, index_topk up to 1M context).
// Outputs are poisoned (NaN / -1) before each op. Tolerances are relative to max |reference|
// and justified next to each op. Every test is skipped (not passed) without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <set>
#include <span>
#include <unordered_map>

#include "backend/backend.h"
#include "backend/sampling.h"
#include "cuda_test_util.h"
#include "model/config.h"
#include "tensor/index_qat.h"
#include "tensor/kv_format.h"
#include "tensor/quant.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    DSV4_REQUIRE_GPU();
    cpu = make_cpu_backend();
#ifdef DSV4_HAVE_CUDA
    gpu = poisoned_cuda_backend();
#endif
    m = std::make_unique<Mirror>(*cpu, *gpu);
  }
  WeightStore ws;
  std::unique_ptr<Backend> cpu, gpu;
  std::unique_ptr<Mirror> m;
};

}  // namespace

// Exact copies: any difference is a bug.
TEST_F(CudaOps, EmbedGatherBroadcast) {
  for (DType dt : {DType::BF16, DType::F32}) {
    const int64_t V = 1000, D = 4096, T = 7;
    auto tab = normal(V * D, 1);
    const TensorData* t = dt == DType::BF16 ? ws.bf16("embed", {V, D}, tab) : ws.f32("embed", {V, D}, tab);
    Pair ids = m->i32({T}, rand_ints(T, V, 2)), out = m->out({T, D});
    cpu->embed(*t, ids.c, out.c);
    gpu->embed(*t, ids.g, out.g);
    expect_close(m->host_c(out.c), m->host_g(out.g), 0.f, "embed " + std::string(dtype_name(dt)));
    Pair X = m->out({T, 4, D});
    cpu->broadcast_streams(out.c, X.c, false);
    gpu->broadcast_streams(out.g, X.g, false);
    cpu->broadcast_streams(out.c, X.c, true);
    gpu->broadcast_streams(out.g, X.g, true);
    expect_close(m->host_c(X.c), m->host_g(X.g), 0.f, "broadcast_streams");
    Pair rows = m->i32({5}, {3, 0, 6, 6, 1}), g = m->out({5, D});
    cpu->gather_rows(out.c, rows.c, g.c);
    gpu->gather_rows(out.g, rows.g, g.g);
    expect_close(m->host_c(g.c), m->host_g(g.g), 0.f, "gather_rows");
  }
}

// Sum of squares in a different order: relative error ~ sqrt(d) * 2^-24 < 1e-5 for d <= 32768.
TEST_F(CudaOps, RmsNorm) {
  for (auto [rows, d] : std::vector<std::pair<int64_t, int64_t>>{{1, 4096}, {33, 512}, {5, 1024}, {64, 128}, {3, 96}}) {
    for (int wk = 0; wk < 3; ++wk) {
      const TensorData* w = wk == 0 ? nullptr
                            : wk == 1 ? ws.bf16("w", {d}, normal(d, 3 + d, 0.25f))
                                      : ws.f32("w", {d}, normal(d, 4 + d));
      Pair x = m->f32({rows, d}, normal(rows * d, 5 + d, 3.f)), out = m->out({rows, d});
      cpu->rms_norm(x.c, w, 1e-6f, out.c);
      gpu->rms_norm(x.g, w, 1e-6f, out.g);
      expect_close(m->host_c(out.c), m->host_g(out.g), 1e-5f,
                   fmt::format("rms_norm {}x{} weight={}", rows, d, wk));
      gpu->rms_norm(x.g, w, 1e-6f, x.g);  // in place
      expect_close(m->host_c(out.c), m->host_g(x.g), 1e-5f, "rms_norm in place");
    }
  }
}

// Dot products of length K summed in another order (warp/tile partial sums vs sequential):
// relative error grows like sqrt(K) * 2^-24 (~5e-6 at K = 8192); 1e-4 of max |y| leaves headroom
// and is still ~100x below the effect of one mis-decoded weight or a wrong 128-block scale.
struct LinCase {
  WeightFormat fmt;
  int64_t T, in, out;
  bool f32_scale, f32_dense;
};
TEST_F(CudaOps, Linear) {
  std::vector<LinCase> cases = {
      {WeightFormat::FP8, 1, 4096, 1024, false, false},    // wq_a decode
      {WeightFormat::FP8, 8, 1024, 32768, false, false},   // wq_b, batch 8
      {WeightFormat::FP8, 16, 8192, 4096, false, false},   // wo_b
      {WeightFormat::FP8, 100, 192, 80, true, false},      // partial 128-blocks, f32 scales, tiled
      {WeightFormat::FP8, 3, 72, 200, false, false},       // K % 16 != 0: scalar path
      {WeightFormat::FP8, 300, 1024, 256, false, false},   // prefill tile path
      {WeightFormat::FP4, 1, 4096, 2048, false, false},    // expert w1 decode
      {WeightFormat::FP4, 70, 2048, 4096, true, false},    // expert w2, tiled, f32 scales
      {WeightFormat::FP4, 300, 512, 256, true, false},     // tiled
      {WeightFormat::BF16, 300, 256, 512, false, false},   // >= 128 rows: cuBLASLt BF16 on x split three ways
      {WeightFormat::BF16, 1500, 4096, 1024, false, false}, // compressor wkv prefill: two row chunks
      {WeightFormat::BF16, 200, 4096, 256, false, true},   // router gate stored as F32: the tiled kernel
      {WeightFormat::BF16, 64, 4096, 512, false, false},   // compressor wkv, 64 sequences: GEMV, 8 rows a pass
      {WeightFormat::FP4, 5, 96, 40, false, false},
      {WeightFormat::BF16, 2, 4096, 129280, false, false}, // lm_head (2-64 rows: the skinny tensor-core kernel)
      {WeightFormat::BF16, 12, 4096, 1000, false, false},  // two B tiles a pass, partial 16-row tile
      {WeightFormat::BF16, 40, 4096, 512, false, false},   // three passes of 16 rows
      {WeightFormat::BF16, 5, 192, 33, false, false},      // K split over the block's warps, 3 stages
      {WeightFormat::BF16, 20, 4096, 512, false, false},   // compressor wkv
      {WeightFormat::BF16, 3, 72, 33, false, false},
      {WeightFormat::BF16, 9, 4096, 256, false, true},     // router gate stored as F32
      // One-token GEMV (one row per pass, 8 chunks per lane in flight) with rows that end inside
      // a lane's unrolled span: 65 FP8 chunks, 3 FP4 chunks, 9 BF16 chunks, 1025 F32 chunks.
      {WeightFormat::FP8, 1, 1040, 300, false, false},
      {WeightFormat::FP8, 1, 8192, 4096, true, false},     // wo_b decode, f32 scales
      {WeightFormat::FP4, 1, 96, 77, false, false},
      {WeightFormat::FP4, 1, 2048, 4096, true, false},     // expert w2 decode
      {WeightFormat::BF16, 1, 72, 129, false, false},
      {WeightFormat::BF16, 1, 4100, 64, false, true},
      {WeightFormat::BF16, 4, 4100, 64, false, true},
      // Short rows, several per warp (8 rows of 1 KB), with a ragged last warp and block.
      {WeightFormat::FP8, 1, 1024, 32768 + 40, false, false},  // wq_b decode
      {WeightFormat::FP4, 1, 2048, 20000, false, false},
  };
  uint64_t seed = 100;
  for (const auto& c : cases) {
    Linear w = ws.linear("w", c.fmt, c.out, c.in, ++seed, c.f32_scale, c.f32_dense);
    Pair x = m->f32({c.T, c.in}, normal(c.T * c.in, ++seed)), y = m->out({c.T, c.out});
    cpu->linear(x.c, w, y.c);
    gpu->linear(x.g, w, y.g);
    expect_close(m->host_c(y.c), m->host_g(y.g), 1e-4f,
                 fmt::format("linear fmt={} T={} in={} out={}{}", int(c.fmt), c.T, c.in, c.out,
                             c.f32_scale ? " f32scale" : ""));
  }
}

// Same GEMM argument as Linear. From 128 rows with BF16-exact weights (FP8 with E8M0 scales, or
// BF16) the groups run on cuBLASLt BF16 with x split three ways (exact products), in chunks of
// 1,024 rows; FP8 with F32 scales keeps the FP32 GEMM.
TEST_F(CudaOps, GroupedLinear) {
  struct C {
    int64_t T, G, in, R;
    WeightFormat fmt = WeightFormat::FP8;
    bool f32_scale = false;
  };
  uint64_t seed = 200;
  for (auto c : std::vector<C>{{1, 8, 4096, 1024},
                               {20, 8, 4096, 1024},
                               {5, 2, 144, 48},
                               {3, 3, 72, 16},
                               {130, 8, 4096, 1024},                        // wo_a prefill: BF16 split
                               {1100, 2, 256, 96},                          // two row chunks, the last partial
                               {300, 3, 160, 64, WeightFormat::BF16},       // BF16 weight, used as it is
                               {200, 2, 256, 80, WeightFormat::FP8, true}}) {  // F32 scales: the FP32 GEMM
    Linear w = ws.linear("wo_a", c.fmt, c.G * c.R, c.in, ++seed, c.f32_scale);
    Pair x = m->f32({c.T, c.G, c.in}, normal(c.T * c.G * c.in, ++seed, 3.f)), y = m->out({c.T, c.G, c.R});
    cpu->grouped_linear(x.c, w, c.G, y.c);
    gpu->grouped_linear(x.g, w, c.G, y.g);
    expect_close(m->host_c(y.c), m->host_g(y.g), 1e-4f,
                 fmt::format("grouped_linear T={} G={} in={} R={} fmt={}{}", c.T, c.G, c.in, c.R, int(c.fmt),
                             c.f32_scale ? " f32scale" : ""));
  }
}

// sincosf vs glibc sinf/cosf, both faithfully rounded after exact range reduction (theta up to
// 65535 rad): ~2 ulp per factor, 1e-5 of max |x| covers it.
TEST_F(CudaOps, Rope) {
  ModelConfig cfg;
  cfg.qk_rope_head_dim = 64;
  cfg.rope_theta = 10000;
  cfg.compress_rope_theta = 160000;
  cfg.yarn = {true, 16.0, 65536, 32, 1};
  for (bool compressed : {false, true}) {
    RopeTable tab = make_rope_table(cfg, compressed);
    for (auto [T, H, d] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{7, 64, 512}, {3, 1, 512}, {5, 64, 128}}) {
      Pair x = m->f32({T, H, d}, normal(T * H * d, T + H + d));
      std::vector<int32_t> p(T);
      for (int64_t t = 0; t < T; ++t) p[t] = int32_t(t == 0 ? 65535 : (t * 9973) % 65536);
      Pair pos = m->i32({T}, p);
      for (bool inv : {false, true}) {
        cpu->rope(x.c, pos.c, tab, 64, inv);
        gpu->rope(x.g, pos.g, tab, 64, inv);
        expect_close(m->host_c(x.c), m->host_g(x.g), 1e-5f,
                     fmt::format("rope T={} H={} d={} yarn={} inverse={}", T, H, d, compressed, inv));
      }
    }
  }
}

// mHC: mixing dot products over m*D = 16384 values (order differs: ~1e-6 relative), then
// sigmoid and 20 Sinkhorn passes (contractive normalisations); 5e-5 of the output scale.
TEST_F(CudaOps, HyperConnections) {
  uint64_t seed = 300;
  for (auto [T, D, iters] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 4096, 20}, {9, 4096, 20}, {4, 192, 7}, {2, 1100, 20} /* partial mix chunks and u slices */,
           {70, 4096, 20} /* many tokens: the tensor-core mixing kernel, a partial token tile */,
           {40, 1100, 20} /* many tokens, m * D not a multiple of its chunk: a partial last chunk */,
           {3, 1102, 20} /* D % 4 != 0: hc_post one channel a thread */}) {
    const int64_t mm = 4, mix = (2 + mm) * mm;
    HyperConn hc{ws.f32("fn", {mix, mm * D}, normal(mix * mm * D, ++seed, 1.f / std::sqrt(float(mm * D)))),
                 ws.f32("base", {mix}, normal(mix, ++seed, 0.5f)), ws.f32("scale", {3}, {0.7f, 1.2f, 0.9f})};
    Pair X = m->f32({T, mm, D}, normal(T * mm * D, ++seed, 2.f));
    Pair u = m->out({T, D}), post = m->out({T, mm}), comb = m->out({T, mm, mm});
    cpu->hc_pre(X.c, hc, iters, 1e-6f, 1e-6f, u.c, post.c, comb.c);
    gpu->hc_pre(X.g, hc, iters, 1e-6f, 1e-6f, u.g, post.g, comb.g);
    const std::string tag = fmt::format("T={} D={}", T, D);
    expect_close(m->host_c(u.c), m->host_g(u.g), 5e-5f, "hc_pre u " + tag);
    expect_close(m->host_c(post.c), m->host_g(post.g), 5e-5f, "hc_pre post " + tag);
    expect_close(m->host_c(comb.c), m->host_g(comb.g), 5e-5f, "hc_pre comb " + tag);
    // hc_post: identical arithmetic per element (same summation order): 1e-6.
    Pair y = m->f32({T, D}, normal(T * D, ++seed)), out = m->out({T, mm, D});
    cpu->hc_post(y.c, X.c, post.c, comb.c, out.c);
    gpu->hc_post(y.g, X.g, post.g, comb.g, out.g);
    // Same op fed the CPU's post/comb: isolates hc_post's own arithmetic.
    Pair post2 = m->f32({T, mm}, m->host_c(post.c)), comb2 = m->f32({T, mm, mm}, m->host_c(comb.c));
    Pair out2 = m->out({T, mm, D});
    gpu->hc_post(y.g, X.g, post2.g, comb2.g, out2.g);
    expect_close(m->host_c(out.c), m->host_g(out2.g), 1e-6f, "hc_post " + tag);
    expect_close(m->host_c(out.c), m->host_g(out.g), 1e-4f, "hc_post (own pre) " + tag);
    HyperConn hh{ws.f32("hfn", {mm, mm * D}, normal(mm * mm * D, ++seed, 1.f / std::sqrt(float(mm * D)))),
                 ws.f32("hbase", {mm}, normal(mm, ++seed, 0.5f)), ws.f32("hscale", {1}, {1.1f})};
    Pair uh = m->out({T, D});
    cpu->hc_head(X.c, hh, 1e-6f, 1e-6f, uh.c);
    gpu->hc_head(X.g, hh, 1e-6f, 1e-6f, uh.g);
    expect_close(m->host_c(uh.c), m->host_g(uh.g), 5e-5f, "hc_head " + tag);
  }
}

// Router: expert ids must match exactly (score gaps between neighbours are ~1e-3, numeric
// differences ~1e-6); weights 1e-5 of max (same formulas, logits from the GEMM at ~1e-6).
TEST_F(CudaOps, Route) {
  uint64_t seed = 700;
  for (const char* scoring : {"sqrtsoftplus", "softmax", "sigmoid"})
    for (bool hash : {false, true}) {
      ModelConfig cfg;
      cfg.n_routed_experts = 256;
      cfg.num_experts_per_tok = 6;
      cfg.scoring_func = scoring;
      cfg.routed_scaling_factor = 1.5;
      const int64_t T = 9, D = 4096, V = 50;
      MoEWeights moe;
      moe.gate = ws.bf16("gate", {256, D}, normal(256 * D, ++seed, 1.f / 64.f));
      moe.hash_routed = hash;
      if (hash) {
        std::vector<uint8_t> b(V * 6 * 8);
        Rng r(++seed);
        for (int64_t i = 0; i < V * 6; ++i) {
          const int64_t e = int64_t(r.below(256));
          std::memcpy(b.data() + 8 * i, &e, 8);
        }
        moe.tid2eid = ws.add("tid2eid", DType::I64, {V, 6}, b);
      } else {
        moe.bias = ws.f32("bias", {256}, normal(256, ++seed, 0.3f));
      }
      Pair x = m->f32({T, D}, normal(T * D, ++seed)), tok = m->i32({T}, rand_ints(T, V, ++seed));
      Pair w = m->out({T, 6}), e = m->out({T, 6}, ElemType::I32);
      {  // the router's logits alone (diagnoses a score bug vs a GEMM bug)
        Linear gl{WeightFormat::BF16, moe.gate, nullptr, 256, D};
        Pair lg = m->out({T, 256});
        cpu->linear(x.c, gl, lg.c);
        gpu->linear(x.g, gl, lg.g);
        expect_close(m->host_c(lg.c), m->host_g(lg.g), 1e-4f, fmt::format("route {} hash={} logits", scoring, hash));
      }
      cpu->route(x.c, moe, tok.c, cfg, w.c, e.c);
      gpu->route(x.g, moe, tok.g, cfg, w.g, e.g);
      const std::string tag = fmt::format("route {} hash={}", scoring, hash);
      expect_equal_ints(m->ints_c(e.c), m->ints_g(e.g), tag + " experts");
      expect_close(m->host_c(w.c), m->host_g(w.g), 1e-5f, tag + " weights");
    }
}

// MoE: two chained GEMMs (K = D, then K = F) with a clamped SwiGLU between; 1e-4 of max |out|
// as for Linear. Real shape uses 256 experts built from 8 distinct weight sets (host memory).
TEST_F(CudaOps, MoE) {
  struct C {
    int64_t T, D, F, E, k;
    WeightFormat fmt;
    bool hash, shared;
    float limit;
  };
  uint64_t seed = 800;
  for (auto c : std::vector<C>{{1, 4096, 2048, 256, 6, WeightFormat::FP4, false, true, 10.f},
                               {8, 4096, 2048, 256, 6, WeightFormat::FP4, false, true, 10.f},
                               {70, 1024, 512, 32, 6, WeightFormat::FP4, false, true, 10.f},
                               {100, 192, 96, 6, 3, WeightFormat::FP8, true, true, 2.f},
                               {5, 256, 64, 16, 4, WeightFormat::FP8, false, false, 0.f},
                               // GEMV path with a row loop (T*k <= 4E) and hash repeats: >8 rows per expert
                               {40, 256, 64, 64, 4, WeightFormat::FP4, true, true, 10.f},
                               // D % 4 != 0: the combine one channel a thread
                               {6, 98, 64, 8, 2, WeightFormat::FP8, false, true, 2.f}}) {
    RandomMoE rm = random_moe(ws, c.fmt, c.T, c.D, c.F, c.E, c.k, c.shared, c.hash, seed);
    MoEWeights& moe = rm.moe;
    const auto& ex = rm.experts;
    const auto& gw = rm.gates;
    moe.hash_routed = c.hash;
    Pair x = m->f32({c.T, c.D}, normal(c.T * c.D, ++seed, 2.f)), w = m->f32({c.T, c.k}, gw),
         e = m->i32({c.T, c.k}, ex), out = m->out({c.T, c.D});
    cpu->moe(x.c, moe, w.c, e.c, c.limit, out.c);
    gpu->moe(x.g, moe, w.g, e.g, c.limit, out.g);
    expect_close(m->host_c(out.c), m->host_g(out.g), 1e-4f,
                 fmt::format("moe T={} D={} F={} E={} k={} fmt={} hash={}", c.T, c.D, c.F, c.E, c.k, int(c.fmt), c.hash));
  }
}

// Production-KV round trip: the same power-of-two scale and RNE casts on both sides: exact.
// Every third row has one whole FP8 block (64 values of the nope part, or its partial tail)
// scaled by 1e-6 (amax ~1e-5), below the 1e-4 amax floor, cycling through the blocks.
TEST_F(CudaOps, QuantizeKv) {
  for (auto [rows, d, nope] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{100, 512, 448}, {7, 96, 72}, {3, 128, 100}}) {
    auto v = normal(rows * d, rows + d, 3.f);
    const int64_t nb = (nope + 63) / 64;
    int64_t floored = 0;
    for (int64_t r = 0; r < rows; r += 3) {
      const int64_t b0 = ((r / 3) % nb) * 64, b1 = std::min(nope, b0 + 64);
      float amax = 0;
      for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(v[r * d + i] *= 1e-6f));
      floored += amax < kFp8AmaxFloor;
    }
    ASSERT_EQ(floored, (rows + 2) / 3) << "every scaled block must fall below the amax floor";
    Pair x = m->f32({rows, d}, v);
    cpu->quantize_kv(x.c, nope);
    gpu->quantize_kv(x.g, nope);
    expect_close(m->host_c(x.c), m->host_g(x.g), 0.f, fmt::format("quantize_kv {}x{} nope={}", rows, d, nope));
  }
}

// Packed KV rows (tensor/kv_format.h): the GPU must write exactly the CPU's bytes (same scale
// from the bit pattern, same RNE E4M3/BF16 casts, zero padding) and decode them to the same
// floats, at the real shape (512 = 448 + 64, up to 64K rows: a 64K-token CSA context) and at
// the tiny presets' partial 64-blocks. Inputs: finite rows of magnitudes 1e-8..1e8, zero rows,
// rows below the 1e-4 amax floor, near-FLT_MAX rows (E4M3 saturation, BF16 overflow to inf).
namespace {
std::vector<float> kv_rows(int64_t rows, int64_t d, uint64_t seed) {
  std::vector<float> v = normal(rows * d, seed, 1.f);
  Rng r(seed + 1);
  for (int64_t row = 0; row < rows; ++row) {
    float* x = v.data() + row * d;
    const int kind = int(row % 7);
    const float mag = std::pow(10.f, r.uniform(-8.f, 8.f));
    for (int64_t i = 0; i < d; ++i) {
      if (kind == 1) x[i] = 0.f;
      else if (kind == 2) x[i] *= 3e-6f;
      else if (kind == 3) x[i] = (i % 2 ? -3e38f : 3.3e38f) * (0.5f + 0.5f * std::fabs(std::tanh(x[i])));
      else x[i] *= mag;
    }
  }
  return v;
}
// First differing byte per row, with both rows printed around it.
void expect_same_bytes(const std::vector<uint8_t>& ref, const std::vector<uint8_t>& got, int64_t row_bytes,
                       const std::string& what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  const auto [bad, first] = mismatches(ref, got);
  std::printf("[maxerr] %-48s n=%-9zu byte_mismatches=%lld\n", what.c_str(), ref.size(), (long long)bad);
  if (first >= 0) {
    const int64_t row = first / row_bytes, col = first % row_bytes;
    ADD_FAILURE() << what << ": " << bad << " packed bytes differ, first at row " << row << " byte " << col << " (cpu 0x" << std::hex
                  << int(ref[size_t(first)]) << ", gpu 0x" << int(got[size_t(first)]) << std::dec
                  << "); row bytes " << row_bytes << " = E4M3 codes, BF16 RoPE dims, UE8M0 scales, zero padding";
  }
}
void expect_same_floats(const std::vector<float>& ref, const std::vector<float>& got, const std::string& what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < ref.size(); ++i)
    if (std::memcmp(&ref[i], &got[i], 4) != 0) {
      if (first < 0) first = int64_t(i);
      ++bad;
    }
  std::printf("[maxerr] %-48s n=%-9zu bit_mismatches=%lld\n", what.c_str(), ref.size(), (long long)bad);
  if (first >= 0)
    ADD_FAILURE() << what << ": " << bad << " values differ bitwise, first at flat index " << first << ": cpu "
                  << ref[size_t(first)] << ", gpu " << got[size_t(first)];
}
}  // namespace

// The indexer QAT (tensor/index_qat.h, one definition on both sides): bit for bit, on index
// queries [T, 64, d] and keys [n, d] with magnitudes from 2^-30 to 2^30 per row, zero rows, a NaN
// and an infinity (their blocks keep them).
TEST_F(CudaOps, IndexQatBitExact) {
  uint64_t seed = 900;
  for (auto [rows, d] : std::vector<std::pair<int64_t, int64_t>>{{70 * 64, 128}, {333, 128}, {40, 64}, {9, 32}}) {
    auto v = normal(rows * d, ++seed);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) v[size_t(r * d + i)] *= std::ldexp(1.f, int(r % 61) - 30);
    std::fill(v.begin(), v.begin() + d, 0.f);
    v[size_t(d + 3)] = NAN;
    v[size_t(2 * d + 40 % d)] = INFINITY;
    Pair x = m->f32({rows, d}, v);
    cpu->index_qat(x.c);
    gpu->index_qat(x.g);
    const auto c = m->host_c(x.c), g = m->host_g(x.g);
    // Bit for bit, except NaN payloads (x86 keeps the operand's, the GPU makes the canonical one):
    // a NaN must stay a NaN on both sides.
    int64_t differ = 0;
    for (size_t i = 0; i < c.size(); ++i)
      differ += std::isnan(c[i]) ? !std::isnan(g[i]) : std::memcmp(&c[i], &g[i], 4) != 0;
    EXPECT_EQ(differ, 0) << "index_qat rows=" << rows << " d=" << d;
    EXPECT_TRUE(std::isnan(c[size_t(d + 5)])) << "the NaN row spreads through the rotation";
    EXPECT_NE(std::memcmp(c.data() + d * 5, v.data() + d * 5, size_t(d) * 4), 0) << "index_qat changed nothing";
  }
}

TEST_F(CudaOps, KvPackUnpackMatchCpuBytes) {
  struct C {
    int64_t rows, d, nope, gathered;
  };
  for (const C& c : std::vector<C>{{65536, 512, 448, 65536}, {4099, 512, 448, 300}, {1, 512, 448, 1},
                                    {333, 64, 48, 1000}, {200, 128, 96, 77}, {97, 130, 65, 50}, {64, 72, 72, 64},
                                    {30, 40, 0, 30}}) {
    const std::string what = fmt::format("kv {}x{} nope={}", c.rows, c.d, c.nope);
    const int64_t rb = kv_row_layout(c.d, c.nope).bytes;
    Pair x = m->f32({c.rows, c.d}, kv_rows(c.rows, c.d, uint64_t(c.rows + c.d))), packed = m->out({c.rows, rb}, ElemType::U8);
    cpu->pack_kv(x.c, c.nope, packed.c);
    gpu->pack_kv(x.g, c.nope, packed.g);
    expect_same_bytes(m->bytes_c(packed.c), m->bytes_g(packed.g), rb, "pack_kv " + what);
    // Gather + decode by index list (random rows, repeats), each side from its own bytes.
    auto idx = rand_ints(c.gathered, c.rows, uint64_t(c.rows * 3 + c.d));
    idx[0] = int32_t(c.rows - 1);
    Pair rows = m->i32({c.gathered}, idx), out = m->out({c.gathered, c.d});
    cpu->unpack_kv(packed.c, rows.c, c.nope, out.c);
    gpu->unpack_kv(packed.g, rows.g, c.nope, out.g);
    const auto ref = m->host_c(out.c);
    expect_same_floats(ref, m->host_g(out.g), "unpack_kv gather " + what);
    // Identity form on a row view.
    const int64_t r0 = c.rows / 3, r1 = c.rows;
    Pair vout = m->out({r1 - r0, c.d});
    cpu->unpack_kv(packed.c.rows_view(r0, r1), Tensor{}, c.nope, vout.c);
    gpu->unpack_kv(packed.g.rows_view(r0, r1), Tensor{}, c.nope, vout.g);
    const auto vref = m->host_c(vout.c);
    expect_same_floats(vref, m->host_g(vout.g), "unpack_kv view " + what);
    // quantize_kv on the GPU is unpack(pack) on the GPU.
    gpu->quantize_kv(x.g, c.nope);
    Pair all = m->out({c.rows, c.d});
    gpu->unpack_kv(packed.g, Tensor{}, c.nope, all.g);
    expect_same_floats(m->host_g(all.g), m->host_g(x.g), "quantize_kv == unpack(pack) on the GPU " + what);
  }
}

// ---- batched attention-family ops --------------------------------------------------------------
// Ragged batches as the batched forward pass builds them: sequences of mixed lengths (a decode of
// one token among prefill chunks), private state in slots given in non-identity order, chunks
// crossing compress windows and paged blocks, block tables whose blocks are scattered (and a
// prefix block shared by two sequences), F32 and packed production (U8) stores, -1 entries.

namespace {

// A U8 tensor on both backends with the same bytes.
Pair u8_pair(Backend& cpu, Backend& gpu, std::vector<int64_t> shape, const std::vector<uint8_t>& bytes) {
  Pair p{cpu.alloc(shape, ElemType::U8), gpu.alloc(shape, ElemType::U8)};
  EXPECT_EQ(p.c.numel(), int64_t(bytes.size()));
  cpu.upload(p.c, bytes.data());
  gpu.upload(p.g, bytes.data());
  return p;
}

// A store of random rows [n, d]: F32 values, or their packed production rows (packed on the CPU).
Pair kv_store(Backend& cpu, Backend& gpu, Mirror& m, int64_t n, int64_t d, int64_t nope, bool packed, uint64_t seed) {
  Pair x = m.f32({n, d}, normal(n * d, seed));
  if (!packed) return x;
  const int64_t rb = kv_row_layout(d, nope).bytes;
  Tensor p = cpu.alloc({n, rb}, ElemType::U8);
  cpu.pack_kv(x.c, nope, p);
  return u8_pair(cpu, gpu, {n, rb}, m.bytes_c(p));
}

// Scattered physical blocks: a random permutation of [0, n).
std::vector<int32_t> shuffled(int64_t n, uint64_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  Rng r(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(v[size_t(i)], v[size_t(r.below(uint64_t(i + 1)))]);
  return v;
}

}  // namespace

// attend over [window ring rows of the sequence's slot | this step's fresh rows] (idx_a) and
// compressed entries reached through the sequence's block table (idx_b). Softmax over up to 640
// keys + sink and a weighted sum of 512-dim rows: exp/sum order differences ~1e-6 relative;
// 2e-5 of max |out|. Packed rows decode to the same floats on both sides (KvPackUnpack test), so
// the same bound holds for them; with packed stores the fresh rows are what quantize_kv leaves,
// as in the model. From 128 query rows, packed stores of 512-dim rows and 32 or 64 heads run on
// the tensor-core kernel (exact split products), fewer on the split-K kernel.
TEST_F(CudaOps, AttendRaggedBatch) {
  struct Seq {
    int64_t rows, start;
  };
  struct C {
    int64_t H, d, nope, W, per_block, Kb;
    std::vector<Seq> seqs;
  };
  uint64_t seed = 400;
  const std::vector<C> cases = {
      // decode (1 token, long context), prefill chunk crossing the window (start 120), a fresh
      // prompt from 0, and another decode; real widths
      {64, 512, 448, 128, 64, 512, {{1, 5000}, {9, 120}, {6, 0}, {1, 129}}},
      // one decode token alone: 10 key tiles over 8 head-group blocks, split 10 ways
      {64, 512, 448, 128, 64, 512, {{1, 5000}}},
      // no compressed entries (idx_b empty), window ring only
      {64, 512, 448, 128, 64, 0, {{3, 300}, {1, 7}}},
      // prefill chunks (tensor cores when packed): crossing the window, from 0, beside a decode
      // row; 32 heads (tensor parallelism 2); window only
      {64, 512, 448, 128, 64, 512, {{90, 120}, {40, 0}, {1, 5000}}},
      {32, 512, 448, 128, 64, 512, {{130, 600}}},
      {64, 512, 448, 128, 64, 0, {{128, 10}}},
      // small shapes: partial 64-blocks (nope 72), many -1, blocks of 4 entries
      {5, 96, 72, 12, 4, 7, {{4, 30}, {1, 2}, {7, 11}, {1, 0}, {2, 60}}},
  };
  for (const C& c : cases)
    for (bool packed : {false, true}) {
      const int64_t S = int64_t(c.seqs.size()), slots = S + 2, Nw = slots * c.W, Ka = c.W;
      const auto slot_of = shuffled(slots, ++seed);  // sequence s owns window slot slot_of[s]
      int64_t T = 0, max_entries = 1;
      for (const Seq& s : c.seqs) {
        T += s.rows;
        max_entries = std::max(max_entries, (s.start + s.rows) / 4 + 1);
      }
      const int64_t max_blocks = (max_entries + c.per_block - 1) / c.per_block, NB = S * max_blocks + 3;
      const auto blocks = shuffled(NB, ++seed);  // sequence s's block b is blocks[s * max_blocks + b]
      Rng r(++seed);
      std::vector<int32_t> ia(size_t(T * Ka), -1), ib(size_t(T * c.Kb), -1);
      int64_t t = 0, first = 0;
      for (int64_t s = 0; s < S; ++s) {
        const Seq& q = c.seqs[size_t(s)];
        for (int64_t i = 0; i < q.rows; ++i, ++t) {
          const int64_t pos = q.start + i;
          // Window: positions max(0, pos - W + 1) .. pos; before the chunk in the slot's ring,
          // inside it among the fresh rows. One in nine knocked out (-1).
          int64_t k = 0;
          for (int64_t p = std::max<int64_t>(0, pos - c.W + 1); p <= pos; ++p, ++k) {
            const int64_t v = p < q.start ? slot_of[size_t(s)] * c.W + p % c.W : Nw + first + (p - q.start);
            ia[size_t(t * Ka + k)] = r.below(9) == 0 ? -1 : int32_t(v);
          }
          // Entries: distinct ones of the (pos + 1) / 4 usable (as top-k picks them), one in six
          // knocked out, at shuffled places of the list, through the block table.
          const int64_t usable = (pos + 1) / 4;
          const auto pick = shuffled(usable, r.next_u64());
          const auto place = shuffled(c.Kb, r.next_u64());
          for (int64_t j = 0; j < std::min(c.Kb, usable); ++j) {
            if (r.below(6) == 0) continue;
            const int64_t e = pick[size_t(j)];
            ib[size_t(t * c.Kb + place[size_t(j)])] =
                blocks[size_t(s * max_blocks + e / c.per_block)] * int32_t(c.per_block) + int32_t(e % c.per_block);
          }
        }
        first += q.rows;
      }
      Pair qt = m->f32({T, c.H, c.d}, normal(T * c.H * c.d, ++seed, 2.f));
      Pair window = kv_store(*cpu, *gpu, *m, Nw, c.d, c.nope, packed, ++seed);
      Pair fresh = m->f32({T, c.d}, normal(T * c.d, ++seed));
      if (packed) {
        cpu->quantize_kv(fresh.c, c.nope);
        gpu->quantize_kv(fresh.g, c.nope);
      }
      Pair entries = c.Kb ? kv_store(*cpu, *gpu, *m, NB * c.per_block, c.d, c.nope, packed, ++seed) : Pair{};
      Pair a = m->i32({T, Ka}, ia);
      Pair b = c.Kb ? m->i32({T, c.Kb}, ib) : Pair{};
      const TensorData* sinks = ws.f32("sink", {c.H}, normal(c.H, ++seed));
      Pair out = m->out({T, c.H, c.d});
      const float scale = 1.f / std::sqrt(float(c.d));
      cpu->attend(qt.c, window.c, fresh.c, a.c, entries.c, b.c, c.nope, *sinks, scale, out.c);
      gpu->attend(qt.g, window.g, fresh.g, a.g, entries.g, b.g, c.nope, *sinks, scale, out.g);
      expect_close(m->host_c(out.c), m->host_g(out.g), 2e-5f,
                   fmt::format("attend {} S={} T={} H={} d={} K={}+{}", packed ? "packed" : "f32", S, T, c.H, c.d,
                               Ka, c.Kb));
    }
}

// Batched compressor over several steps: sequences in slots given in non-identity order, each
// step a ragged chunk per sequence (0, 1 or many rows, crossing windows), state resumed from
// random contents (sequences may start mid-stream: windows w > 0 pool the saved prev halves).
// Entries at per-sequence out_first offsets; softmax over <= 2*ratio slots per channel: 1e-5.
// State rows are copies (gate + ape: one rounding, same on both sides): exact.
TEST_F(CudaOps, CompressorRaggedBatch) {
  struct C {
    int64_t ratio, d;
    bool overlap;
    std::vector<int64_t> starts;               // first position of each sequence
    std::vector<std::vector<int64_t>> steps;   // rows per sequence, per step
  };
  uint64_t seed = 500;
  const std::vector<C> cases = {
      {4, 512, true, {0, 6, 1, 37}, {{5, 1, 0, 13}, {1, 1, 1, 1}, {30, 2, 4, 3}, {0, 7, 1, 8}}},
      {128, 512, false, {0, 100, 250, 5}, {{100, 1, 27, 300}, {1, 128, 1, 5}, {28, 2, 300, 1}}},
      {4, 40, true, {3, 0, 8}, {{1, 9, 2}, {2, 1, 1}, {17, 4, 1}}},
      {16, 96, false, {0, 15, 31}, {{1, 1, 1}, {40, 2, 17}, {3, 33, 1}}},
  };
  for (const C& c : cases) {
    const int64_t S = int64_t(c.starts.size()), slots = S + 2, coff = c.overlap ? 2 : 1, width = coff * c.d;
    const auto slot_of = shuffled(slots, ++seed);
    const TensorData* ape = ws.f32("ape", {c.ratio, width}, normal(c.ratio * width, ++seed, 0.5f));
    auto state = [&](int64_t cols) { return m->f32({slots * c.ratio, cols}, normal(slots * c.ratio * cols, ++seed)); };
    Pair kvs = state(width), gates = state(width), pkv = c.overlap ? state(c.d) : Pair{},
         pgate = c.overlap ? state(c.d) : Pair{};
    CompressorSlots sc{kvs.c, gates.c, pkv.c, pgate.c}, sg{kvs.g, gates.g, pkv.g, pgate.g};
    std::vector<int64_t> pos = c.starts;
    for (const auto& step : c.steps) {
      std::vector<int32_t> seg;
      int64_t T = 0, n = 0;
      std::string lens;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t rows = step[size_t(s)], made = (pos[size_t(s)] + rows) / c.ratio - pos[size_t(s)] / c.ratio;
        seg.insert(seg.end(), {int32_t(T), int32_t(rows), int32_t(pos[size_t(s)]), slot_of[size_t(s)], int32_t(n)});
        lens += fmt::format(" {}@{}", rows, pos[size_t(s)]);
        T += rows;
        n += made;
        pos[size_t(s)] += rows;
      }
      Pair kv = m->f32({T, width}, normal(T * width, ++seed)), gate = m->f32({T, width}, normal(T * width, ++seed));
      Pair seqs = m->i32({S, kSegCols}, seg), e = m->out({std::max<int64_t>(n, 1), c.d});
      cpu->compress(kv.c, gate.c, *ape, seqs.c, c.ratio, c.overlap, sc, e.c);
      gpu->compress(kv.g, gate.g, *ape, seqs.g, c.ratio, c.overlap, sg, e.g);
      const std::string tag = fmt::format("compress r={} d={} overlap={} rows@start:{}", c.ratio, c.d, c.overlap, lens);
      if (n) expect_close(m->host_c(e.c.rows_view(0, n)), m->host_g(e.g.rows_view(0, n)), 1e-5f, tag + " entries");
      expect_close(m->host_c(sc.kv), m->host_g(sg.kv), 0.f, tag + " state kv");
      expect_close(m->host_c(sc.gate), m->host_g(sg.gate), 0.f, tag + " state gate");
      if (c.overlap) {
        expect_close(m->host_c(sc.prev_kv), m->host_g(sg.prev_kv), 0.f, tag + " prev kv");
        expect_close(m->host_c(sc.prev_gate), m->host_g(sg.prev_gate), 0.f, tag + " prev gate");
      }
    }
  }
}

// Indexer over paged keys: the chosen lists (pool rows) are mapped back to each sequence's
// logical key indices and must match exactly, except where two keys' scores are equal within
// float rounding (then either order is right): a swap is accepted only when the reference scores
// of the two picks at a position differ by <= 1e-5 of the largest score. Duplicated keys (logical j copies
// j - 1 for j % 97 == 1) create exact ties, which must resolve to the lower logical index on both
// sides: the GPU must pick the same members as the CPU, with j - 1 directly before j when both are
// picked. Every row's GPU picks must be distinct keys of its own sequence below usable.
// Sequences' blocks are scattered over the pool; the first two sequences share their first block
// (a shared prefix); usable varies per query (prefill chunks), down to 1 and below K (-1 padding).
// The qat cases round q and keys through the index QAT (BF16-exact values), where the GPU scores
// on tensor cores, at the same bounds.
TEST_F(CudaOps, IndexTopkPaged) {
  struct Seq {
    std::vector<int64_t> usable;  // one per query row of the sequence
  };
  struct C {
    int64_t H, d, per_block, max_blocks, K;
    std::vector<Seq> seqs;
    bool qat = false;  // q and keys through the index QAT: BF16-exact, tensor-core scoring at d = 128
  };
  auto rows_from = [](int64_t count, int64_t first) {  // a prefill chunk: usable first, first + 1, ...
    Seq q;
    for (int64_t i = 0; i < count; ++i) q.usable.push_back(first + i);
    return q;
  };
  uint64_t seed = 600;
  // 1M context: 262,144 CSA keys; 70 query rows, more than one scratch tile holds at that width
  // (kIndexScoreBytes: 64 rows), with rows at and around K among them.
  Seq million;
  for (int64_t t = 0; t < 66; ++t) million.usable.push_back(262144 - t * 3001);
  for (int64_t u : {1, 511, 512, 513}) million.usable.push_back(u);
  const std::vector<C> cases = {
      // real widths: one query at 64K context (16K keys), a prefill chunk crossing a block boundary
      // (usable 2047..2050 with 64-entry blocks), a short sequence (< K), a single key
      {64, 128, 64, 256, 512, {{{16384}}, {{2047, 2048, 2049, 2050}}, {{300}}, {{1}}}},
      {16, 32, 64, 4096, 512, {million}},
      {64, 128, 16, 40, 512, {{{600, 601}}, {{33}}, {{640}}, {{17, 18, 19}}}},
      {16, 40, 4, 6, 5, {{{20, 3}}, {{5}}, {{1, 2, 3, 4, 5, 6, 7, 8}}, {{24}}}},
      // Index-QAT operands: the real widths as above (a row or a few per sequence: the SIMT
      // kernel); tensor cores (from 16 rows per sequence): 40 rows of a chunk at 20K keys (41 key
      // tiles, a query group shared by two sequences); 32 heads, chunks of 50 and 30 rows, the
      // second below K.
      {64, 128, 64, 256, 512, {{{16384}}, {{2047, 2048, 2049, 2050}}, {{300}}, {{1}}}, true},
      {64, 128, 16, 1300, 512, {rows_from(40, 19961), {{600, 601}}}, true},
      {32, 128, 16, 80, 100, {rows_from(50, 1000), rows_from(30, 3)}, true},
  };
  for (const C& c : cases) {
    const int64_t S = int64_t(c.seqs.size()), NB = S * c.max_blocks + 5, N = NB * c.per_block;
    const int64_t n_max = c.max_blocks * c.per_block;
    // Block tables: scattered physical blocks; sequence 1 shares sequence 0's first block.
    const auto phys = shuffled(NB, ++seed);
    std::vector<int32_t> table(size_t(S * c.max_blocks));
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < c.max_blocks; ++b) table[size_t(s * c.max_blocks + b)] = phys[size_t(s * c.max_blocks + b)];
    if (S > 1) table[size_t(c.max_blocks)] = table[0];
    auto row_of = [&](int64_t s, int64_t j) {
      return int64_t(table[size_t(s * c.max_blocks + j / c.per_block)]) * c.per_block + j % c.per_block;
    };
    auto keys_h = normal(N * c.d, ++seed);
    if (c.qat)
      for (int64_t r = 0; r < N; ++r) index_qat_row(keys_h.data() + r * c.d, int(c.d));
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 1; j < n_max; j += 97)
        std::copy_n(keys_h.begin() + row_of(s, j - 1) * c.d, c.d, keys_h.begin() + row_of(s, j) * c.d);
    std::vector<int32_t> qseq, us;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t u : c.seqs[size_t(s)].usable) {
        qseq.push_back(int32_t(s));
        us.push_back(int32_t(u));
      }
    const int64_t T = int64_t(us.size()), K = c.K;
    auto q_h = normal(T * c.H * c.d, ++seed);
    if (c.qat)
      for (int64_t r = 0; r < T * c.H; ++r) index_qat_row(q_h.data() + r * c.d, int(c.d));
    Pair q = m->f32({T, c.H, c.d}, q_h), w = m->f32({T, c.H}, normal(T * c.H, ++seed));
    Pair keys = m->f32({N, c.d}, keys_h), bt = m->i32({S, c.max_blocks}, table), qs = m->i32({T}, qseq),
         usable = m->i32({T}, us), idx = m->out({T, K}, ElemType::I32);
    const float wsc = 1.f / std::sqrt(float(c.H * c.d));
    cpu->index_topk(q.c, w.c, wsc, keys.c, bt.c, c.per_block, qs.c, usable.c, idx.c, c.qat);
    gpu->index_topk(q.g, w.g, wsc, keys.g, bt.g, c.per_block, qs.g, usable.g, idx.g, c.qat);
    auto ic = m->ints_c(idx.c), ig = m->ints_g(idx.g);
    auto qh = m->host_c(q.c), wh = m->host_c(w.c);
    auto score = [&](int64_t t, int64_t s, int64_t j) {
      double sc = 0;
      const int64_t row = row_of(s, j);
      for (int64_t h = 0; h < c.H; ++h) {
        double dt = 0;
        for (int64_t i = 0; i < c.d; ++i) dt += double(qh[(t * c.H + h) * c.d + i]) * keys_h[row * c.d + i];
        sc += wh[t * c.H + h] * std::max(0.0, dt);
      }
      return sc * wsc;
    };
    int64_t exact = 0, near_tie = 0, bad = 0, repeats = 0, tie_mismatch = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = qseq[size_t(t)], n = us[size_t(t)];
      // Pool row -> logical index of this sequence (-1: not one of its first n keys).
      std::unordered_map<int32_t, int64_t> logical;
      for (int64_t j = 0; j < n; ++j) logical[int32_t(row_of(s, j))] = j;
      auto to_j = [&](int32_t row) -> int64_t {
        if (row < 0) return -1;
        auto it = logical.find(row);
        return it == logical.end() ? -2 : it->second;  // -2: a row outside the sequence's keys
      };
      std::vector<int64_t> pos_c(static_cast<size_t>(n_max), -1), pos_g(static_cast<size_t>(n_max), -1),
          jc(static_cast<size_t>(K)), jg(static_cast<size_t>(K));
      for (int64_t i = 0; i < K; ++i) {
        jc[size_t(i)] = to_j(ic[size_t(t * K + i)]);
        jg[size_t(i)] = to_j(ig[size_t(t * K + i)]);
        if (jc[size_t(i)] >= 0) pos_c[size_t(jc[size_t(i)])] = i;
        const int64_t b = jg[size_t(i)];
        if (b < 0) continue;
        if (pos_g[size_t(b)] >= 0) {
          ++repeats;
          ADD_FAILURE() << "index_topk row " << t << ": GPU key " << b << " at positions " << pos_g[size_t(b)] << " and " << i;
        }
        pos_g[size_t(b)] = i;
      }
      for (int64_t j = 1; j < n; j += 97) {
        const size_t a = size_t(j - 1), b = size_t(j);
        const bool in_c = pos_c[a] >= 0 && pos_c[b] >= 0, in_g = pos_g[a] >= 0 && pos_g[b] >= 0;
        const bool ok = (pos_c[a] >= 0) == (pos_g[a] >= 0) && (pos_c[b] >= 0) == (pos_g[b] >= 0) &&
                        (!in_c || pos_c[b] == pos_c[a] + 1) && (!in_g || pos_g[b] == pos_g[a] + 1);
        if (!ok) {
          ++tie_mismatch;
          ADD_FAILURE() << "index_topk row " << t << ": copied keys " << j - 1 << "," << j << " at CPU positions "
                        << pos_c[a] << "," << pos_c[b] << " but GPU positions " << pos_g[a] << "," << pos_g[b];
        }
      }
      double smax = 0;
      for (int64_t i = 0; i < K; ++i)
        if (jc[size_t(i)] >= 0) smax = std::max(smax, std::fabs(score(t, s, jc[size_t(i)])));
      for (int64_t i = 0; i < K; ++i) {
        const int64_t a = jc[size_t(i)], b = jg[size_t(i)];
        if (a == b && ic[size_t(t * K + i)] == ig[size_t(t * K + i)]) {
          ++exact;
        } else if (a >= 0 && b >= 0 && std::fabs(score(t, s, a) - score(t, s, b)) <= 1e-5 * smax) {
          ++near_tie;  // the order of exact ties (copied keys) is checked above, not here
        } else {
          ++bad;
          ADD_FAILURE() << "index_topk row " << t << " position " << i << ": CPU key " << a << " (score "
                        << (a >= 0 ? score(t, s, a) : 0) << "), GPU key " << b << " (score "
                        << (b >= 0 ? score(t, s, b) : 0) << "), largest score " << smax;
        }
      }
    }
    std::printf("[maxerr] index_topk paged%s S=%lld T=%lld H=%lld d=%lld blocks=%lldx%lld K=%lld exact=%lld "
                "near_tie_swaps=%lld bad=%lld repeats=%lld copied_tie_mismatch=%lld\n",
                c.qat ? " qat" : "", (long long)S, (long long)T, (long long)c.H, (long long)c.d, (long long)c.max_blocks,
                (long long)c.per_block, (long long)K, (long long)exact, (long long)near_tie, (long long)bad,
                (long long)repeats, (long long)tie_mismatch);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(repeats, 0);
    EXPECT_EQ(tie_mismatch, 0);
  }
}

// store_rows into F32 and packed stores: scattered rows, -1 entries skipped (those store rows
// keep their old contents). F32: exact copies; packed: the CPU's bytes exactly (same codecs as
// pack_kv).
TEST_F(CudaOps, StoreRows) {
  struct C {
    int64_t n, d, nope, N;
  };
  uint64_t seed = 650;
  for (const C& c : std::vector<C>{{7, 512, 448, 300}, {33, 96, 72, 40}, {1, 64, 48, 3}, {12, 130, 65, 20}}) {
    Rng r(++seed);
    auto perm = shuffled(c.N, ++seed);
    std::vector<int32_t> rows(size_t(c.n));
    for (int64_t i = 0; i < c.n; ++i) rows[size_t(i)] = i % 4 == 2 ? -1 : perm[size_t(i)];
    Pair x = m->f32({c.n, c.d}, kv_rows(c.n, c.d, ++seed)), ri = m->i32({c.n}, rows);
    const std::string what = fmt::format("store_rows n={} d={} nope={} N={}", c.n, c.d, c.nope, c.N);
    Pair f = m->f32({c.N, c.d}, normal(c.N * c.d, ++seed));
    cpu->store_rows(x.c, ri.c, c.nope, f.c);
    gpu->store_rows(x.g, ri.g, c.nope, f.g);
    expect_same_floats(m->host_c(f.c), m->host_g(f.g), what + " f32");
    const int64_t rb = kv_row_layout(c.d, c.nope).bytes;
    Pair p = m->out({c.N, rb}, ElemType::U8);  // 0xff bytes: rows not stored stay so on both sides
    cpu->store_rows(x.c, ri.c, c.nope, p.c);
    gpu->store_rows(x.g, ri.g, c.nope, p.g);
    expect_same_bytes(m->bytes_c(p.c), m->bytes_g(p.g), rb, what + " packed");
  }
}

// ---- sampling ---------------------------------------------------------------------------------
// Backend::sample. The kernel computes the host definition (backend/sampling.cpp) in double
// (top-p mass in 64-bit fixed point) with other summation orders, so its token must equal the
// CPU op's except where one of the row's decisions lies within rounding of a boundary.
// sample_margin() measures that on the CPU from the definition; rows closer than 1e-9 are not
// compared but counted (they must be rare); every other row must match exactly. The kernel's
// deviations are ~1e-14 (double sums, 2^-62 fixed point), so 1e-9 leaves a wide gap; a looser
// bound such as 1e-5 would skip almost every flat row at V = 129280 (CDF steps ~1e-5).

namespace {

struct SampleMargin {
  double cdf = HUGE_VAL;    // |u - c| / c for the running probability c at any token boundary (id order)
  double top_p = HUGE_VAL;  // |running top-p mass - top_p| on both sides of the cutoff
  double min_p = HUGE_VAL;  // |p - min_p * pmax| / pmax over the tokens top-k/top-p kept
  bool near() const { return cdf < 1e-9 || top_p < 1e-9 || min_p < 1e-9; }
};

SampleMargin sample_margin(std::span<const float> z, const SampleFilter& f, float u) {
  SampleMargin m;
  if (f.temperature <= 0) return m;  // greedy: exact comparisons only
  const size_t V = z.size();
  const double T = f.temperature;
  double mx = -HUGE_VAL, sum = 0;
  for (float v : z) mx = std::max(mx, double(v) / T);
  std::vector<double> p(V);
  for (size_t i = 0; i < V; ++i) sum += p[i] = std::exp(double(z[i]) / T - mx);
  for (auto& x : p) x /= sum;
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  size_t keep = f.top_k > 0 ? std::min(V, size_t(f.top_k)) : V;
  if (f.top_p < 1.f) {
    double mass = 0, cum = 0;
    for (size_t i = 0; i < keep; ++i) mass += p[order[i]];
    for (size_t i = 0; i < keep; ++i) {
      const double prev = cum;
      cum += p[order[i]] / mass;
      if (cum >= double(f.top_p)) {
        m.top_p = std::min(cum - double(f.top_p), double(f.top_p) - prev);
        keep = i + 1;
        break;
      }
    }
  }
  if (f.min_p > 0.f) {
    const double pmax = p[order[0]], thr = double(f.min_p) * pmax;
    for (size_t i = 0; i < keep; ++i) m.min_p = std::min(m.min_p, std::fabs(p[order[i]] - thr) / pmax);
  }
  const std::vector<float> probs = filtered_probs(z, f);
  double cum = 0;
  for (float q : probs)
    if (q > 0) {
      cum += q;
      m.cdf = std::min(m.cdf, std::fabs(double(u) - cum) / cum);  // sums differ relative to their size
    }
  return m;
}

// Logit rows of different character (kind % 8).
std::vector<float> sample_logits(int64_t V, int kind, uint64_t seed) {
  Rng r(seed);
  std::vector<float> z(size_t(V), 0.f);
  switch (kind % 8) {
    case 0: fill_normal(z.data(), V, seed, 1.f); break;   // flat: top-p keeps most of the vocabulary
    case 1: fill_normal(z.data(), V, seed, 4.f); break;
    case 2: fill_normal(z.data(), V, seed, 30.f); break;  // peaked: most probabilities underflow
    case 3:                                               // integer logits: ties at every cutoff
      fill_normal(z.data(), V, seed, 2.f);
      for (auto& x : z) x = std::round(x);
      break;
    case 4: std::fill(z.begin(), z.end(), 0.5f); break;   // all equal
    case 5:                                               // masked (-inf) entries, -0 and +0
      fill_normal(z.data(), V, seed, 2.f);
      for (int64_t i = 0; i < V; ++i) {
        if (i % 5 == 1) z[size_t(i)] = -INFINITY;
        if (i % 11 == 2) z[size_t(i)] = -0.f;
        if (i % 13 == 3) z[size_t(i)] = 0.f;
      }
      break;
    case 6:  // four distinct values: huge tie groups
      for (auto& x : z) x = float(r.below(4));
      break;
    case 7:  // LM-like: Zipf over a random permutation, a few large logits then a long tail
      for (int64_t i = 0; i < V; ++i) z[size_t(i)] = float(-1.2 * std::log(double(r.below(uint64_t(V)) + 1)) * 3.0);
      break;
  }
  return z;
}

std::vector<SampleFilter> sample_filters(int64_t V) {
  const int32_t v = int32_t(V);
  return {
      {0.f, 0, 1.f, 0.f},                     // greedy
      {0.f, 5, 0.5f, 0.3f},                   // greedy ignores the filters
      {1.f, 0, 1.f, 0.f},                     // temperature only
      {0.6f, 0, 1.f, 0.f},
      {0.05f, 0, 1.f, 0.f},                   // nearly greedy
      {3.f, 0, 1.f, 0.f},                     // hot
      {1.f, 1, 1.f, 0.f},                     // top-k 1: the greedy token
      {0.8f, 5, 1.f, 0.f},
      {1.2f, 50, 1.f, 0.f},
      {1.f, 5000, 1.f, 0.f},                  // large top-k
      {1.f, std::max(1, v - 1), 1.f, 0.f},
      {1.f, v, 1.f, 0.f},                     // top-k >= V: off
      {1.f, v + 10, 1.f, 0.f},
      {1.f, 0, 0.9f, 0.f},                    // top-p
      {0.7f, 0, 0.1f, 0.f},
      {1.f, 0, 0.99f, 0.f},
      {1.3f, 0, 0.3f, 0.f},
      {1.f, 0, 1.f, 0.05f},                   // min-p
      {0.9f, 0, 1.f, 0.5f},
      {1.f, 40, 0.9f, 0.f},                   // combinations
      {0.7f, 2000, 0.95f, 0.f},
      {1.1f, 0, 0.8f, 0.02f},
      {0.9f, 100, 0.95f, 0.1f},
      {1.5f, 7, 0.6f, 0.2f},
  };
}

std::string filter_str(const SampleFilter& f) {
  return fmt::format("T={} top_k={} top_p={} min_p={}", f.temperature, f.top_k, f.top_p, f.min_p);
}

}  // namespace

// Random rows of every kind with every filter, batch sizes 1..256, the real vocabulary and small
// ones (odd sizes, smaller than a block, a single token). Row b gets kind and filter from b.
TEST_F(CudaOps, SampleMatchesCpu) {
  uint64_t seed = 900;
  for (auto [B, V] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 129280}, {8, 129280}, {64, 129280}, {256, 129280}, {256, 1000}, {100, 37}, {24, 5000}, {9, 1}}) {
    const auto filters = sample_filters(V);
    std::vector<float> z, params(static_cast<size_t>(B * kSampleParams)), uni(static_cast<size_t>(B));
    std::vector<int> kinds(static_cast<size_t>(B));
    Rng r(++seed);
    for (int64_t b = 0; b < B; ++b) {
      kinds[size_t(b)] = int((b + seed) % 8);
      auto row = sample_logits(V, kinds[size_t(b)], seed * 1000 + uint64_t(b));
      z.insert(z.end(), row.begin(), row.end());
      write_sample_params(filters[size_t((b * 7 + seed) % filters.size())], &params[size_t(b * kSampleParams)]);
      uni[size_t(b)] = b % 17 == 5 ? 0.f : b % 17 == 6 ? 1.f - 0x1.0p-24f : r.uniform_f32();  // extremes too
    }
    Pair tz = m->f32({B, V}, z), tp = m->f32({B, kSampleParams}, params), tu = m->f32({B}, uni),
         out = m->out({B}, ElemType::I32);
    cpu->sample(tz.c, tp.c, tu.c, out.c);
    gpu->sample(tz.g, tp.g, tu.g, out.g);
    const auto want = m->ints_c(out.c), got = m->ints_g(out.g);
    int64_t bad = 0, near = 0, compared = 0;
    std::string first;
    for (int64_t b = 0; b < B; ++b) {
      const std::span<const float> row(z.data() + b * V, size_t(V));
      const SampleFilter f = read_sample_params(&params[size_t(b * kSampleParams)]);
      EXPECT_TRUE(got[size_t(b)] >= 0 && got[size_t(b)] < V)
          << "B=" << B << " V=" << V << " row " << b << ": token " << got[size_t(b)] << " out of range (unwritten = -1)";
      const SampleMargin mg = sample_margin(row, f, uni[size_t(b)]);
      if (mg.near()) {
        ++near;
        std::printf("  near a boundary, not compared: row %lld kind %d %s u=%.9g cdf=%.2e top_p=%.2e min_p=%.2e\n",
                    (long long)b, kinds[size_t(b)], filter_str(f).c_str(), double(uni[size_t(b)]), mg.cdf, mg.top_p,
                    mg.min_p);
        continue;
      }
      ++compared;
      if (got[size_t(b)] == want[size_t(b)]) continue;
      if (bad++ < 8) {
        const auto probs = filtered_probs(row, f);
        auto pr = [&](int32_t t) { return t >= 0 && t < V ? double(probs[size_t(t)]) : -1.0; };
        first += fmt::format(
            "\n  row {} kind {} {} u={:.9g}: cpu {} (logit {}, p {:.6g}) vs gpu {} (logit {}, p {:.6g}); margins cdf "
            "{:.2e} top_p {:.2e} min_p {:.2e}",
            b, kinds[size_t(b)], filter_str(f), double(uni[size_t(b)]), want[size_t(b)],
            want[size_t(b)] >= 0 ? row[size_t(want[size_t(b)])] : NAN, pr(want[size_t(b)]), got[size_t(b)],
            got[size_t(b)] >= 0 && got[size_t(b)] < V ? row[size_t(got[size_t(b)])] : NAN, pr(got[size_t(b)]), mg.cdf,
            mg.top_p, mg.min_p);
      }
    }
    std::printf("[maxerr] %-48s n=%-9lld mismatches=%lld near_boundary=%lld\n",
                fmt::format("sample B={} V={}", B, V).c_str(), (long long)compared, (long long)bad, (long long)near);
    EXPECT_EQ(bad, 0) << "sample B=" << B << " V=" << V << ": tokens differ from the CPU op on rows away from any "
                      << "rounding boundary (first " << std::min<int64_t>(bad, 8) << "):" << first;
    EXPECT_LE(near, std::max<int64_t>(2, B / 50)) << "sample B=" << B << " V=" << V
                                                  << ": too many rows near a boundary to be chance";
  }
}

// Exact cases that need no margins: greedy and top-k 1 take the lowest id among tied maxima,
// whatever the uniform; top-k k over distinct logits never leaves the k largest.
TEST_F(CudaOps, SampleGreedyTiesAndTopK) {
  const int64_t V = 129280, B = 12;
  std::vector<float> z, params(static_cast<size_t>(B * kSampleParams)), uni(static_cast<size_t>(B));
  std::vector<int32_t> want(static_cast<size_t>(B));
  Rng r(77);
  for (int64_t b = 0; b < B; ++b) {
    auto row = normal(V, 950 + uint64_t(b), 2.f);
    const float top = 50.f + float(b % 3);
    const int64_t a = int64_t(r.below(uint64_t(V))), c = int64_t(r.below(uint64_t(V)));
    row[size_t(a)] = top;  // two maxima (one if a == c)
    row[size_t(c)] = top;
    if (b == 0) std::fill(row.begin(), row.end(), -1.f);  // every token tied
    want[size_t(b)] = b == 0 ? 0 : int32_t(std::min(a, c));
    z.insert(z.end(), row.begin(), row.end());
    const SampleFilter f = b % 2 ? SampleFilter{0.f, 0, 1.f, 0.f} : SampleFilter{float(0.1 + b), 1, 0.9f, 0.f};
    write_sample_params(f, &params[size_t(b * kSampleParams)]);
    uni[size_t(b)] = b % 4 == 0 ? 1.f - 0x1.0p-24f : r.uniform_f32();
  }
  Pair tz = m->f32({B, V}, z), tp = m->f32({B, kSampleParams}, params), tu = m->f32({B}, uni),
       out = m->out({B}, ElemType::I32);
  gpu->sample(tz.g, tp.g, tu.g, out.g);
  cpu->sample(tz.c, tp.c, tu.c, out.c);
  expect_equal_ints(want, m->ints_c(out.c), "sample greedy / top-k 1 ties (cpu)");
  expect_equal_ints(want, m->ints_g(out.g), "sample greedy / top-k 1 ties (gpu)");

  // top-k 10 at a high temperature over distinct logits: always one of the 10 largest.
  const int64_t N = 64;
  auto row = normal(V, 4242, 1.f);
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + 10, order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  std::vector<float> zz, pp(static_cast<size_t>(N * kSampleParams)), uu(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    zz.insert(zz.end(), row.begin(), row.end());
    write_sample_params(SampleFilter{5.f, 10, 1.f, 0.f}, &pp[size_t(i * kSampleParams)]);
    uu[size_t(i)] = float(i) / float(N);
  }
  Pair tz2 = m->f32({N, V}, zz), tp2 = m->f32({N, kSampleParams}, pp), tu2 = m->f32({N}, uu),
       out2 = m->out({N}, ElemType::I32);
  gpu->sample(tz2.g, tp2.g, tu2.g, out2.g);
  std::set<int32_t> top10(order.begin(), order.begin() + 10), seen;
  for (int32_t t : m->ints_g(out2.g)) {
    EXPECT_TRUE(top10.count(t)) << "top-k 10 drew token " << t << ", not one of the 10 largest logits";
    seen.insert(t);
  }
  EXPECT_GE(seen.size(), 8u) << "uniforms spread over [0, 1) should reach most of the 10 tokens";
}

// Many draws of one row with independent uniforms: the GPU's token frequencies follow
// filtered_probs (chi-square bound), filtered-out tokens never appear, and every draw equals the
// CPU op's away from boundaries.
TEST_F(CudaOps, SampleDistribution) {
  const int64_t V = 60, N = 50000;
  for (const SampleFilter& f : {SampleFilter{0.8f, 0, 1.f, 0.f}, SampleFilter{1.f, 30, 0.9f, 0.f},
                                SampleFilter{1.3f, 0, 0.95f, 0.03f}}) {
    const auto row = sample_logits(V, 0, 31);  // flat enough that every filter keeps many tokens
    const auto probs = filtered_probs(row, f);
    std::vector<float> z, params(static_cast<size_t>(N * kSampleParams)), uni(static_cast<size_t>(N));
    Rng r(5);
    for (int64_t i = 0; i < N; ++i) {
      z.insert(z.end(), row.begin(), row.end());
      write_sample_params(f, &params[size_t(i * kSampleParams)]);
      uni[size_t(i)] = r.uniform_f32();
    }
    Pair tz = m->f32({N, V}, z), tp = m->f32({N, kSampleParams}, params), tu = m->f32({N}, uni),
         out = m->out({N}, ElemType::I32);
    cpu->sample(tz.c, tp.c, tu.c, out.c);
    gpu->sample(tz.g, tp.g, tu.g, out.g);
    const auto want = m->ints_c(out.c), got = m->ints_g(out.g);
    std::vector<int64_t> counts(static_cast<size_t>(V));
    int64_t bad = 0, near = 0;
    for (int64_t i = 0; i < N; ++i) {
      ASSERT_TRUE(got[size_t(i)] >= 0 && got[size_t(i)] < V) << filter_str(f) << " draw " << i << ": " << got[size_t(i)];
      ++counts[size_t(got[size_t(i)])];
      if (got[size_t(i)] == want[size_t(i)]) continue;
      if (sample_margin(row, f, uni[size_t(i)]).near()) ++near;
      else ++bad;
    }
    double chi2 = 0;
    int dof = -1;
    for (int64_t t = 0; t < V; ++t) {
      if (probs[size_t(t)] == 0) {
        EXPECT_EQ(counts[size_t(t)], 0) << filter_str(f) << ": filtered-out token " << t << " was drawn";
        continue;
      }
      const double e = double(probs[size_t(t)]) * double(N);
      chi2 += (double(counts[size_t(t)]) - e) * (double(counts[size_t(t)]) - e) / e;
      ++dof;
    }
    std::printf("[maxerr] %-48s n=%-9lld mismatches=%lld chi2=%.1f dof=%d\n",
                ("sample distribution " + filter_str(f)).c_str(), (long long)N, (long long)bad, chi2, dof);
    EXPECT_EQ(bad, 0) << filter_str(f) << ": draws differ from the CPU op away from boundaries";
    EXPECT_LE(near, 2) << filter_str(f);
    ASSERT_GT(dof, 3) << filter_str(f);
    // Mean dof, standard deviation sqrt(2 dof); 6 deviations is far beyond chance (fixed seeds).
    EXPECT_LT(chi2, dof + 6 * std::sqrt(2.0 * dof)) << filter_str(f) << ": frequencies do not follow filtered_probs";
  }
}

TEST(CudaDevice, Present) {
  DSV4_REQUIRE_GPU();
  SUCCEED();
}
