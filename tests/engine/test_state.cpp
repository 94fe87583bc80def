// Paged sequence state: accounting and exactness of the paged forward pass.
#include <gtest/gtest.h>

#include "../model/agreement.h"
#include "batch_scenario.h"
#include "engine/state_manager.h"
#include "engine_test_util.h"
#include "model/memory.h"
#include "model/tiny.h"

using namespace dsv4;
using namespace dsv4::test;

namespace {

int64_t tensor_bytes(const Tensor& t) { return t.empty() ? 0 : t.nbytes(); }

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
  EXPECT_EQ(L.kv_row_bytes, 2048);
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(c, KvFormat::F32), 13760.0);
  // The same with the engine-independent accounting of `inspect` (the MTP layer is a sliding one).
  EXPECT_EQ(fixed_state_bytes(c, KvFormat::F32), L.tail_bytes + 128 * 2048);
  // A 1M-token sequence fits a 20 GiB budget with 64 sequence slots.
  const StatePlan p = plan_state(L, int64_t(20) << 30, 64, 0.1);
  EXPECT_GE(p.num_blocks * 256, int64_t(1) << 20);
  EXPECT_LE(p.num_blocks * L.block_bytes + p.num_slots * L.tail_bytes + p.num_snapshots * L.snapshot_bytes,
            int64_t(20) << 30);
  EXPECT_THROW(plan_state(L, int64_t(64) << 20, 64, 0.1), Error);
  EXPECT_THROW(state_layout(c, 192), Error);  // not a multiple of 128
}

// --kv fp8 on the V4-Flash shape: 584-byte rows (448 E4M3 + 64 BF16 + 7 UE8M0 + 1 pad) for
// window keys and compressed entries; indexer keys and compressor states stay F32.
TEST(EngineState, RealModelAccountingFp8) {
  const ModelConfig c = flash_config();
  const StateLayout L = state_layout(c, 256, KvFormat::FP8);
  const StateLayout F = state_layout(c, 256, KvFormat::F32);
  EXPECT_EQ(L.kv_row_bytes, 584);
  const int64_t csa = 21, hca = 20, layers = 43, W = 128;
  EXPECT_EQ(L.block_bytes, 256 * csa * (584 + 128 * 4) / 4 + 256 * hca * 584 / 128);
  EXPECT_DOUBLE_EQ(L.bytes_per_token(), 21 * (584 + 512) / 4.0 + 20 * 584 / 128.0);
  EXPECT_DOUBLE_EQ(L.bytes_per_token(), 5845.25);
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(c, KvFormat::FP8), 5845.25);
  // Window rings shrink from 2048 to 584 B per row in slots and snapshots; the rest is unchanged.
  EXPECT_EQ(F.tail_bytes - L.tail_bytes, layers * W * (2048 - 584));
  EXPECT_EQ(F.snapshot_bytes - L.snapshot_bytes, layers * W * (2048 - 584));
  EXPECT_EQ(fixed_state_bytes(c, KvFormat::FP8), L.tail_bytes + W * 584);
  // The simulation stores F32.
  EXPECT_EQ(state_layout(c, 256, KvFormat::FP8Simulated).block_bytes, F.block_bytes);
  // A 1M-token sequence fits an 8 GiB budget with 64 sequence slots (it needs 20 GiB in F32).
  const StatePlan p = plan_state(L, int64_t(8) << 30, 64, 0.1);
  EXPECT_GE(p.num_blocks * 256, int64_t(1) << 20);
}

TEST(EngineState, LayoutMatchesAllocatedTensors) {
  auto lm = tiny_model();
  Model& model = *lm->model;
  const ModelConfig& c = model.config();
  for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
    SCOPED_TRACE(kv_format_name(kv));
    StateManager mgr(model, 32, 5, 2, 3, kv);
    const StateLayout& L = mgr.layout();
    auto s = mgr.acquire();
    EXPECT_EQ(s.st.kv(), kv);
    int64_t tail = 0, pools = 0;
    const int64_t slots = s.st.store->num_slots;
    EXPECT_EQ(slots, 2);
    for (const LayerStore& l : s.st.store->layers) {
      EXPECT_EQ(l.window.type, kv == KvFormat::FP8 ? ElemType::U8 : ElemType::F32);
      EXPECT_EQ(l.window.cols() * elem_size(l.window.type), L.kv_row_bytes);
      if (!l.entries.empty()) {
        EXPECT_EQ(l.entries.type, l.window.type);
      }
      if (!l.index_keys.empty()) {
        EXPECT_EQ(l.index_keys.type, ElemType::F32);
      }
      tail += tensor_bytes(l.window) / slots;
      for (const CompressorSlots* cs : {&l.compressor, &l.index_compressor})
        tail += (tensor_bytes(cs->kv) + tensor_bytes(cs->gate) + tensor_bytes(cs->prev_kv) + tensor_bytes(cs->prev_gate)) /
                slots;
      pools += tensor_bytes(l.entries) + tensor_bytes(l.index_keys);
    }
    EXPECT_EQ(tail, L.tail_bytes);
    EXPECT_EQ(pools, 5 * L.block_bytes);
    // Tiny preset: head_dim 64 = 48 no-RoPE + 16 RoPE: 48 + 32 + 1 scale byte -> 88-byte rows.
    const int64_t row = kv == KvFormat::FP8 ? 88 : 64 * 4;
    EXPECT_EQ(L.kv_row_bytes, row);
    int64_t direct = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const int64_t r = c.compress_ratio(l);
      if (r) direct += 32 / r * (row + (c.attn_kind(l) == AttnKind::CSA ? c.index_head_dim * 4 : 0));
    }
    EXPECT_EQ(L.block_bytes, direct);
    EXPECT_EQ(L.snapshot_bytes - state_layout(c, 32, KvFormat::F32).snapshot_bytes,
              c.num_hidden_layers * c.sliding_window * (row - 64 * 4));
    mgr.release(s);
    EXPECT_EQ(mgr.free_slots(), 2);
  }
}

// A sequence whose blocks are scattered over a shared pool gives the same logits as a
// self-contained one, for any chunking; with --kv fp8 the packed rows are read through the
// block table.
TEST(EngineState, PagedForwardIsExact) {
  auto lm = tiny_model();
  const ModelConfig& c = lm->config();
  Backend& be = lm->model->backend();
  const int64_t V = c.vocab_size, T = 40;
  auto tokens = random_prompt(T, 11);
  std::vector<float> f32_ref;
  for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
    SCOPED_TRACE(kv_format_name(kv));
    Model model(c, lm->generated->weights(), be);  // own format setting; the shared model stays as is
    model.set_kv_format(kv);
    auto ref = run_chunked(model, tokens, {}, false);
    if (kv == KvFormat::F32) f32_ref = ref;
    else EXPECT_NE(ref, f32_ref) << "--kv fp8 had no effect";

    StateManager mgr(model, 16, 12, 2, 0, kv);
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
    for (int64_t ch : chunks) {
      Tensor lg = model.forward(a.st, std::span(tokens).subspan(size_t(at), size_t(ch)));
      be.download(lg, got.data() + at * V);
      at += ch;
    }
    ASSERT_EQ(at, T);
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], ref[i]) << "logit " << i;
    mgr.release(a);
    mgr.release(b);
    EXPECT_EQ(mgr.free_blocks(), 12);
  }
}

// One batched forward pass over a mixed batch (decodes, prefill chunks, a chunk crossing a block
// boundary, two sequences sharing prefix blocks, scattered block tables) gives every sequence
// the logits it gets alone, within 1e-5 of the logit scale, in F32 and FP8 KV, and leaves each
// sequence's state as running alone does (a second, all-decode step checks it).
TEST(EngineState, MixedBatchEqualsEachSequenceAlone) {
  for (const std::string preset : {"tiny", "small"}) {
    GeneratedModel gm(tiny_preset_config(preset), 17);
    auto be = make_cpu_backend();
    Model batched(gm.config(), gm.weights(), *be), alone(gm.config(), gm.weights(), *be);
    for (KvFormat kv : {KvFormat::F32, KvFormat::FP8}) {
      SCOPED_TRACE(preset + " " + kv_format_name(kv));
      const test::BatchScenario r = test::run_batch_scenario(batched, alone, kv, 5);
      ASSERT_EQ(r.batched.size(), r.alone.size());
      EXPECT_GT(r.rows, 8 + 8);
      const float worst = test::agree(r.alone, r.batched, gm.config().vocab_size).worst_rel;
      std::printf("[batch] %s kv=%s rows=%lld worst_rel=%.3e\n", preset.c_str(), kv_format_name(kv), (long long)r.rows,
                  worst);
      EXPECT_LE(worst, 1e-5f);
    }
  }
}
