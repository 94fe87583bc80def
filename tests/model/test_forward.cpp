// The CPU reference forward pass is one function of the token sequence: prefill, any chunk
// schedule and token-by-token feeding must give the same logits (main model and MTP block).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <numeric>

#include "backend/backend.h"
#include "model/forward.h"
#include "model/tiny.h"
#include "util/random.h"

using namespace dsv4;

namespace {

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(r.below(vocab));
  return t;
}

std::vector<int64_t> random_schedule(int64_t T, uint64_t seed) {
  Rng r(seed);
  std::vector<int64_t> s;
  for (int64_t left = T; left > 0;) {
    int64_t c = std::min<int64_t>(left, 1 + int64_t(r.below(uint64_t(std::min<int64_t>(left, 23)))));
    s.push_back(c);
    left -= c;
  }
  return s;
}

void expect_same_logits(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  float scale = 0;
  for (float x : a) scale = std::max(scale, std::fabs(x));
  ASSERT_GT(scale, 0.1f) << what << ": logits are degenerate";
  const int64_t rows = int64_t(a.size()) / vocab;
  for (int64_t r = 0; r < rows; ++r) {
    float err = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      ASSERT_FALSE(std::isnan(a[r * vocab + i]) || std::isnan(b[r * vocab + i])) << what << " row " << r;
      err = std::max(err, std::fabs(a[r * vocab + i] - b[r * vocab + i]));
    }
    EXPECT_LE(err, 1e-5f * scale) << what << " row " << r;
    auto am = [&](const std::vector<float>& v) {
      return std::max_element(v.begin() + r * vocab, v.begin() + (r + 1) * vocab) - (v.begin() + r * vocab);
    };
    EXPECT_EQ(am(a), am(b)) << what << " row " << r;
  }
}

class ForwardSchedules : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(ForwardSchedules, PrefillChunksAndTokenByTokenAgree) {
  GeneratedModel gm(tiny_preset_config(GetParam()), 21);
  auto be = make_cpu_backend();
  Model model(gm.config(), gm.weights(), *be);
  const auto& c = gm.config();
  // Long enough to pass the window several times, close many CSA/HCA windows and hold more
  // compressed entries than index_topk.
  const int64_t T = std::max<int64_t>(3 * c.sliding_window + 7, (c.index_topk + 3) * c.compress_rate_csa);
  auto tokens = random_tokens(T, c.vocab_size, 5);
  auto ref = run_chunked(model, tokens, {}, false);
  std::vector<int64_t> ones(T, 1);
  expect_same_logits(ref, run_chunked(model, tokens, ones, false), c.vocab_size, "token by token");
  for (uint64_t seed : {1, 2, 3}) {
    auto sched = random_schedule(T, seed);
    expect_same_logits(ref, run_chunked(model, tokens, sched, false), c.vocab_size, "schedule " + std::to_string(seed));
  }
  // Prefixes: the logits of a prefix do not depend on what follows.
  auto half = run_chunked(model, std::span(tokens).subspan(0, T / 2), {}, false);
  expect_same_logits(std::vector<float>(ref.begin(), ref.begin() + half.size()), half, c.vocab_size, "prefix");

  auto mtp_ref = run_chunked(model, tokens, {}, true);
  expect_same_logits(mtp_ref, run_chunked(model, tokens, ones, true), c.vocab_size, "mtp token by token");
  expect_same_logits(mtp_ref, run_chunked(model, tokens, random_schedule(T, 9), true), c.vocab_size, "mtp schedule");
}

// --kv fp8 stores packed rows (U8); the values attention reads must be exactly those of the F32
// simulation of the same format (FP8Simulated: quantize_kv in F32 storage), for every schedule,
// main model and MTP; and the format must change the logits relative to exact storage.
TEST_P(ForwardSchedules, KvFp8PackedStorageEqualsSimulation) {
  GeneratedModel gm(tiny_preset_config(GetParam()), 21);
  auto be = make_cpu_backend();
  const auto& c = gm.config();
  Model packed(c, gm.weights(), *be), simulated(c, gm.weights(), *be), exact(c, gm.weights(), *be);
  packed.set_kv_fp8(true);
  simulated.set_kv_format(KvFormat::FP8Simulated);

  // The sequence state really is packed: U8 rows of kv_row_layout bytes.
  SequenceState st = packed.new_sequence(64);
  const int64_t row = kv_row_layout(c.head_dim, c.nope_dim()).bytes;
  EXPECT_LT(row, c.head_dim * 4 / 2);
  for (const auto* layers : {&st.store->layers, &st.store->mtp_layers})
    for (const LayerStore& l : *layers) {
      EXPECT_EQ(l.window.type, ElemType::U8);
      EXPECT_EQ(l.window.cols(), row);
      if (!l.entries.empty()) {
        EXPECT_EQ(l.entries.type, ElemType::U8);
        EXPECT_EQ(l.entries.cols(), row);
      }
      if (!l.index_keys.empty()) {
        EXPECT_EQ(l.index_keys.type, ElemType::F32);
      }
    }

  const int64_t T = std::max<int64_t>(3 * c.sliding_window + 7, (c.index_topk + 3) * c.compress_rate_csa);
  auto tokens = random_tokens(T, c.vocab_size, 5);
  auto same_bits = [&](const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_FALSE(std::isnan(a[i])) << what << " logit " << i;
      ASSERT_EQ(std::bit_cast<uint32_t>(a[i]), std::bit_cast<uint32_t>(b[i]))
          << what << ": logit " << i << " (row " << i / size_t(c.vocab_size) << "): simulated " << a[i] << ", packed " << b[i];
    }
  };
  // Each schedule on both sides (the comparison must not rely on chunk invariance).
  const std::vector<std::pair<std::string, std::vector<int64_t>>> schedules = {
      {"prefill", {}},
      {"token by token", std::vector<int64_t>(T, 1)},
      {"schedule 1", random_schedule(T, 1)}};
  std::vector<float> ref;
  for (const auto& [what, sched] : schedules) {
    const auto sim = run_chunked(simulated, tokens, sched, false);
    same_bits(sim, run_chunked(packed, tokens, sched, false), what);
    if (ref.empty()) ref = sim;
  }
  const auto mtp_sched = random_schedule(T, 9);
  same_bits(run_chunked(simulated, tokens, mtp_sched, true), run_chunked(packed, tokens, mtp_sched, true), "mtp");

  // FP8 storage is not exact storage.
  const auto ex = run_chunked(exact, tokens, {}, false);
  float diff = 0, scale = 0;
  for (size_t i = 0; i < ex.size(); ++i) {
    diff = std::max(diff, std::fabs(ex[i] - ref[i]));
    scale = std::max(scale, std::fabs(ex[i]));
  }
  EXPECT_GT(diff, 1e-5f * scale) << "--kv fp8 had no effect on the logits";
  EXPECT_LT(diff, 0.2f * scale) << "--kv fp8 changed the logits far more than FP8 rounding can";
}

INSTANTIATE_TEST_SUITE_P(Presets, ForwardSchedules, ::testing::Values("tiny", "tiny-fp8", "small"));

TEST(Forward, DifferentContextsGiveDifferentLogits) {
  // Guards against a forward pass that ignores context (which would pass the schedule tests).
  GeneratedModel gm(tiny_preset_config("tiny"), 3);
  auto be = make_cpu_backend();
  Model model(gm.config(), gm.weights(), *be);
  auto a = random_tokens(40, gm.config().vocab_size, 1);
  auto b = a;
  b[0] = (b[0] + 1) % int32_t(gm.config().vocab_size);
  auto la = run_chunked(model, a, {}, false), lb = run_chunked(model, b, {}, false);
  const int64_t V = gm.config().vocab_size;
  float diff = 0;
  for (int64_t i = 39 * V; i < 40 * V; ++i) diff = std::max(diff, std::fabs(la[i] - lb[i]));
  EXPECT_GT(diff, 1e-3f);
}

TEST(Forward, BadInputIsRejectedWithClearErrors) {
  GeneratedModel gm(tiny_preset_config("tiny"), 3);
  auto be = make_cpu_backend();
  Model model(gm.config(), gm.weights(), *be);
  auto expect_msg = [&](std::vector<int32_t> toks, std::vector<int64_t> chunks, bool mtp, const char* needle) {
    try {
      run_chunked(model, toks, chunks, mtp);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_msg({1, 2, 1024}, {}, false, "token id 1024 at position 2 is out of range");
  expect_msg({1, -1}, {}, false, "token id -1");
  expect_msg({}, {}, false, "empty");
  expect_msg({1, 2, 3}, {1, 1}, false, "sum to 2 but there are 3 tokens");
  expect_msg({1, 2, 3}, {3, 0}, false, "must be positive");
  expect_msg({1}, {}, true, "at least 2 tokens");
}

TEST(CpuOps, IndexerTopKBreaksTiesByLowestIndex) {
  auto be = make_cpu_backend();
  const int64_t T = 2, H = 2, d = 4, N = 10, K = 4;
  Tensor q = be->alloc({T, H, d}), w = be->alloc({T, H}), keys = be->alloc({N, d});
  be->fill(q, 1.f);
  be->fill(w, 1.f);
  be->fill(keys, -1.f);  // every relu(q.k) = 0: all scores tie
  std::vector<float> k7(d, 2.f);
  be->upload(keys.rows_view(7, 8), k7.data());  // key 7 scores highest
  // One block of all 10 keys for query 0; query 1's sequence has blocks {1, 0} of 5 rows each,
  // so its logical keys 0, 1, 2 live in rows 5, 6, 7 and the tie order follows the logical index.
  std::vector<int32_t> usable = {10, 3}, table = {0, -1, 1, 0};
  Tensor u = be->alloc({T}, ElemType::I32), idx = be->alloc({T, K}, ElemType::I32);
  Tensor bt = be->alloc({2, 2}, ElemType::I32);
  be->upload(u, usable.data());
  be->upload(bt, table.data());
  // Query 0 reads the table with 10 rows per block, query 1 with 5: two calls.
  Tensor bt0 = be->alloc({1, 1}, ElemType::I32);
  const int32_t zero = 0;
  be->upload(bt0, &zero);
  Tensor qs0 = be->alloc({1}, ElemType::I32);
  be->upload(qs0, &zero);
  be->index_topk(q.rows_view(0, 1), w.rows_view(0, 1), 0.5f, keys, bt0, 10, qs0, u.rows_view(0, 1), idx.rows_view(0, 1),
                 false);
  be->index_topk(q.rows_view(1, 2), w.rows_view(1, 2), 0.5f, keys, bt.rows_view(1, 2), 5, qs0, u.rows_view(1, 2),
                 idx.rows_view(1, 2), false);
  std::vector<int32_t> got(T * K);
  be->download(idx, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{7, 0, 1, 2, 7, 5, 6, -1}));
}
