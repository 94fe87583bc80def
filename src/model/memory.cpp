#include "model/memory.h"

#include <set>

#include "tensor/quant.h"

namespace dsv4 {

namespace {

// One stored cache entry of width `dim`: FP8 for the no-RoPE part with one f32 scale per 64,
// BF16 for the RoPE part.
double entry_bytes(int64_t dim, int64_t rope) {
  const int64_t nope = dim - rope;
  return double(nope) + 4.0 * double(ceil_div(nope, 64)) + 2.0 * double(rope);
}

}  // namespace

WeightStats weight_stats(const ModelConfig&, const ModelWeights& w) {
  WeightStats s;
  std::set<const TensorData*> seen;
  auto add = [&](const TensorData* t, bool expert, bool vocab) {
    if (!t || !seen.insert(t).second) return;
    int64_t elems = t->numel() * (t->dtype == DType::FP4_E2M1 ? 2 : 1);
    bool is_scale = t->name.ends_with(".scale");
    if (!is_scale) s.params += elems;
    s.bytes += int64_t(t->nbytes);
    auto& e = s.by_dtype[std::string(dtype_name(t->dtype))];
    e.first += elems;
    e.second += int64_t(t->nbytes);
    if (expert) s.routed_expert_bytes += int64_t(t->nbytes);
    if (vocab) s.vocab_bytes += int64_t(t->nbytes);
  };
  auto lin = [&](const Linear& l, bool expert = false) {
    add(l.weight, expert, false);
    add(l.scale, expert, false);
  };
  auto hc = [&](const HyperConn& h) { add(h.fn, false, false); add(h.base, false, false); add(h.scale, false, false); };
  auto comp = [&](const CompressorWeights& c) {
    add(c.ape, false, false); add(c.wkv, false, false); add(c.wgate, false, false); add(c.norm, false, false);
  };
  auto block = [&](const BlockWeights& b) {
    add(b.attn_norm, false, false);
    add(b.ffn_norm, false, false);
    hc(b.hc_attn);
    hc(b.hc_ffn);
    const auto& a = b.attn;
    for (const Linear* l : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) lin(*l);
    add(a.q_norm, false, false); add(a.kv_norm, false, false); add(a.attn_sink, false, false);
    if (a.has_compressor) comp(a.compressor);
    if (a.has_indexer) { lin(a.indexer.wq_b); add(a.indexer.weights_proj, false, false); comp(a.indexer.compressor); }
    add(b.ffn.gate, false, false); add(b.ffn.bias, false, false); add(b.ffn.tid2eid, false, false);
    for (const auto& e : b.ffn.experts) { lin(e.w1, true); lin(e.w2, true); lin(e.w3, true); }
    if (b.ffn.has_shared) { lin(b.ffn.shared.w1); lin(b.ffn.shared.w2); lin(b.ffn.shared.w3); }
  };
  add(w.embed, false, true);
  add(w.head, false, true);
  add(w.norm, false, false);
  hc(w.hc_head);
  for (const auto& b : w.layers) block(b);
  for (const auto& m : w.mtp) {
    block(m.block);
    lin(m.e_proj); lin(m.h_proj);
    add(m.enorm, false, false); add(m.hnorm, false, false); add(m.norm, false, false);
    hc(m.hc_head);
  }
  return s;
}

double kv_bytes_per_token(const ModelConfig& c) {
  double total = 0;
  for (int64_t l = 0; l < c.total_layers(); ++l) {
    int64_t r = c.compress_ratio(l);
    if (!r) continue;
    total += entry_bytes(c.head_dim, c.rope_dim()) / double(r);
    if (c.attn_kind(l) == AttnKind::CSA) total += 2.0 * double(c.index_head_dim) / double(r);  // BF16 index keys
  }
  return total;
}

int64_t fixed_state_bytes(const ModelConfig& c) {
  int64_t total = 0;
  for (int64_t l = 0; l < c.total_layers(); ++l) {
    total += int64_t(double(c.sliding_window) * entry_bytes(c.head_dim, c.rope_dim()));
    int64_t r = c.compress_ratio(l);
    if (!r) continue;
    const int64_t coff = c.attn_kind(l) == AttnKind::CSA ? 2 : 1;
    total += 2 * 4 * coff * r * coff * c.head_dim;  // f32 kv + score partial windows
    if (c.attn_kind(l) == AttnKind::CSA) total += 2 * 4 * coff * r * coff * c.index_head_dim;
  }
  return total;
}

int64_t weight_bytes_per_gpu(const WeightStats& s, int tp) {
  const int64_t replicated = s.bytes - s.routed_expert_bytes - s.vocab_bytes;
  return replicated + (s.routed_expert_bytes + s.vocab_bytes + tp - 1) / tp;
}

}  // namespace dsv4
