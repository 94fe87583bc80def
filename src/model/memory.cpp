#include "model/memory.h"

#include <set>


namespace dsv4 {

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

int64_t kv_row_bytes(const ModelConfig& c, KvFormat kv) {
  return kv == KvFormat::FP8 ? kv_row_layout(c.head_dim, c.nope_dim()).bytes : 4 * c.head_dim;
}

double kv_bytes_per_token(const ModelConfig& c, KvFormat kv) {
  double total = 0;
  for (int64_t l = 0; l < c.total_layers(); ++l) {
    const int64_t r = c.compress_ratio(l);
    if (!r) continue;
    total += double(kv_row_bytes(c, kv)) / double(r);
    if (c.attn_kind(l) == AttnKind::CSA) total += 4.0 * double(c.index_head_dim) / double(r);
  }
  return total;
}

int64_t fixed_state_bytes(const ModelConfig& c, KvFormat kv) {
  int64_t total = 0;
  for (int64_t l = 0; l < c.total_layers(); ++l) {
    total += c.sliding_window * kv_row_bytes(c, kv);
    const int64_t r = c.compress_ratio(l);
    if (!r) continue;
    const bool csa = c.attn_kind(l) == AttnKind::CSA;
    const int64_t coff = csa ? 2 : 1;
    total += 2 * r * coff * c.head_dim * 4;  // partial window: kv + gate rows
    if (csa) {
      total += 2 * r * c.head_dim * 4;  // previous window's first halves (kv + gate)
      total += 2 * r * 2 * c.index_head_dim * 4 + 2 * r * c.index_head_dim * 4;  // the indexer's compressor
    }
  }
  return total;
}

}  // namespace dsv4
