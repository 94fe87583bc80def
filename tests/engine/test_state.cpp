// Paged sequence state: accounting and exactness of the paged forward pass.
#include <gtest/gtest.h>

#include "engine/state_manager.h"
#include "engine_test_util.h"
#include "model/memory.h"
#include "model/tiny.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

int64_t tensor_bytes(const Tensor& t) { return t.empty() ? 0 : t.numel() * 4; }

ModelConfig flash_config() {
  // The published DeepSeek-V4-Flash shape (docs/MODEL.md 1a), on top of a tiny config's fields.
  nlohmann::json j = tiny_preset_config("tiny");
  j.erase("layer_types");
  j["num_hidden_layers"] = 43;
  j["head_dim"] = 512;
  j["qk_rope_head_dim"] = 64;
  j["sliding_window"] = 128;
  j["index_head_dim"] = 128;
  j["index_n_heads"] = 64;
  j["index_topk"] = 512;
  std::vector<int64_t> ratios{0, 0};
  for (int i = 2; i <= 42; ++i) ratios.push_back(i % 2 ? 128 : 4);
  ratios.push_back(0);
  j["compress_ratios"] = ratios;
  return parse_model_config(j, "<flash>");
}

}  // namespace

TEST(EngineState, RealModelAccounting) {
  const ModelConfig c = flash_config();
  const StateLayout L = state_layout(c, 256);
  // Per token, stored as f32: 21 CSA layers (512-dim entry and 128-dim indexer key per 4 tokens)
  // and 20 HCA layers (one 512-dim entry per 128 tokens).
  const int64_t csa = 21, hca = 20;
  EXPECT_EQ(L.block_bytes, 256 * (csa * (512 + 128) * 4 / 4 + hca * 512 * 4 / 128));
  EXPECT_DOUBLE_EQ(L.bytes_per_token(), 13760.0);
  // Production format (FP8 + BF16 RoPE dims + BF16 indexer keys): about 4.5 KB per token.
  EXPECT_NEAR(kv_bytes_per_token(c), 4609, 1);
  // A 1M-token sequence fits a 20 GiB budget with 64 sequence slots.
  const StatePlan p = plan_state(L, int64_t(20) << 30, 64, 0.1);
  EXPECT_GE(p.num_blocks * 256, int64_t(1) << 20);
  EXPECT_LE(p.num_blocks * L.block_bytes + p.num_slots * L.tail_bytes + p.num_snapshots * L.snapshot_bytes,
            int64_t(20) << 30);
  EXPECT_THROW(plan_state(L, int64_t(64) << 20, 64, 0.1), Error);
  EXPECT_THROW(state_layout(c, 192), Error);  // not a multiple of 128
}

TEST(EngineState, LayoutMatchesAllocatedTensors) {
  auto lm = tiny_model();
  Model& model = *lm->model;
  const ModelConfig& c = model.config();
  StateManager mgr(model, 32, 5, 2, 3);
  const StateLayout& L = mgr.layout();
  auto s = mgr.acquire();
  int64_t tail = 0, pools = 0;
  for (const LayerState& l : s.st.layers) {
    tail += tensor_bytes(l.window);
    for (const CompressorState* cs : {&l.compressor, &l.index_compressor})
      tail += tensor_bytes(cs->kv) + tensor_bytes(cs->gate) + tensor_bytes(cs->prev_kv) + tensor_bytes(cs->prev_gate);
    pools += tensor_bytes(l.entries) + tensor_bytes(l.index_keys);
  }
  EXPECT_EQ(tail, L.tail_bytes);
  EXPECT_EQ(pools, 5 * L.block_bytes);
  int64_t direct = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const int64_t r = c.compress_ratio(l);
    if (r) direct += 32 / r * (c.head_dim + (c.attn_kind(l) == AttnKind::CSA ? c.index_head_dim : 0)) * 4;
  }
  EXPECT_EQ(L.block_bytes, direct);
  mgr.release(s);
  EXPECT_EQ(mgr.free_slots(), 2);
}

// A sequence whose blocks are scattered over a shared pool gives the same logits as a
// self-contained one, for any chunking.
TEST(EngineState, PagedForwardIsExact) {
  auto lm = tiny_model();
  Model& model = *lm->model;
  Backend& be = model.backend();
  const int64_t V = model.config().vocab_size, T = 40;
  auto tokens = random_prompt(T, 11);
  auto ref = run_chunked(model, tokens, {}, false);

  StateManager mgr(model, 16, 12, 2, 0);
  auto a = mgr.acquire(), b = mgr.acquire();
  // Interleave the two sequences' blocks, so neither table is contiguous.
  for (int64_t n = 16; n <= 80; n += 16) {
    ASSERT_TRUE(mgr.reserve(a, n));
    ASSERT_TRUE(mgr.reserve(b, n));
  }
  EXPECT_NE(a.st.blocks[1], a.st.blocks[0] + 1);
  const std::vector<int64_t> chunks{7, 16, 1, 16};
  int64_t at = 0;
  std::vector<float> got(size_t(T * V));
  for (int64_t c : chunks) {
    Tensor lg = model.forward(a.st, std::span(tokens).subspan(size_t(at), size_t(c)));
    be.download(lg, got.data() + at * V);
    at += c;
  }
  ASSERT_EQ(at, T);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], ref[i]) << "logit " << i;
  mgr.release(a);
  mgr.release(b);
  EXPECT_EQ(mgr.free_blocks(), 12);
}
