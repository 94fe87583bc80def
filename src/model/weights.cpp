#include "model/weights.h"

#include <unordered_set>

#include "tensor/quant.h"
#include "util/error.h"

namespace dsv4 {

namespace {

struct Binder {
  const ModelConfig& c;
  TensorProvider& p;

  const TensorData* plain(const std::string& name, std::vector<DType> dtypes, std::vector<int64_t> shape, Init init,
                          int64_t fan_in = 1) {
    return p.provide({name, std::move(dtypes), std::move(shape), init, fan_in});
  }
  const TensorData* norm(const std::string& name, int64_t dim) {
    return plain(name, {DType::BF16, DType::F32}, {dim}, Init::NormWeight);
  }
  // Checkpoint linears: "<prefix>.weight" (+ "<prefix>.scale" when quantised), weight [out, in].
  Linear linear(const std::string& prefix, int64_t out, int64_t in, WeightFormat fmt) {
    Linear l;
    l.format = fmt;
    l.out = out;
    l.in = in;
    switch (fmt) {
      case WeightFormat::FP8:
        l.weight = plain(prefix + ".weight", {DType::F8_E4M3}, {out, in}, Init::Dense, in);
        l.scale = plain(prefix + ".scale", {DType::F8_E8M0, DType::F32},
                        {ceil_div(out, kFp8Block), ceil_div(in, kFp8Block)}, Init::Dense);
        break;
      case WeightFormat::FP4:
        l.weight = plain(prefix + ".weight", {DType::FP4_E2M1}, {out, in / 2}, Init::Dense, in);
        l.scale = plain(prefix + ".scale", {DType::F8_E8M0, DType::F32}, {out, in / kFp4Group}, Init::Dense);
        break;
      case WeightFormat::BF16:
        l.weight = plain(prefix + ".weight", {DType::BF16, DType::F32}, {out, in}, Init::Dense, in);
        break;
    }
    return l;
  }
  HyperConn hyper(const std::string& prefix, int64_t mix, int64_t scales) {
    const int64_t hc_dim = c.hc_mult * c.hidden_size;
    return {plain(prefix + "_fn", {DType::F32}, {mix, hc_dim}, Init::HcFn, hc_dim),
            plain(prefix + "_base", {DType::F32}, {mix}, Init::HcBase),
            plain(prefix + "_scale", {DType::F32}, {scales}, Init::HcScale)};
  }
  CompressorWeights compressor(const std::string& prefix, int64_t ratio, int64_t head_dim) {
    CompressorWeights w;
    w.ratio = ratio;
    w.head_dim = head_dim;
    w.overlap = ratio == c.compress_rate_csa;
    const int64_t width = (w.overlap ? 2 : 1) * head_dim;
    w.ape = plain(prefix + ".ape", {DType::F32}, {ratio, width}, Init::Ape);
    w.wkv = plain(prefix + ".wkv.weight", {DType::BF16, DType::F32}, {width, c.hidden_size}, Init::Dense, c.hidden_size);
    w.wgate = plain(prefix + ".wgate.weight", {DType::BF16, DType::F32}, {width, c.hidden_size}, Init::Dense, c.hidden_size);
    w.norm = norm(prefix + ".norm.weight", head_dim);
    return w;
  }
  ExpertWeights expert(const std::string& prefix, WeightFormat fmt) {
    const int64_t d = c.hidden_size, f = c.moe_intermediate_size;
    return {linear(prefix + ".w1", f, d, fmt), linear(prefix + ".w2", d, f, fmt), linear(prefix + ".w3", f, d, fmt)};
  }
  BlockWeights block(const std::string& p0, int64_t layer) {
    BlockWeights b;
    b.layer = layer;
    const int64_t d = c.hidden_size, H = c.num_attention_heads, hd = c.head_dim;
    b.attn_norm = norm(p0 + ".attn_norm.weight", d);
    b.ffn_norm = norm(p0 + ".ffn_norm.weight", d);
    b.hc_attn = hyper(p0 + ".hc_attn", c.hc_mix(), 3);
    b.hc_ffn = hyper(p0 + ".hc_ffn", c.hc_mix(), 3);

    auto& a = b.attn;
    const std::string pa = p0 + ".attn";
    a.kind = c.attn_kind(layer);
    a.wq_a = linear(pa + ".wq_a", c.q_lora_rank, d, WeightFormat::FP8);
    a.q_norm = norm(pa + ".q_norm.weight", c.q_lora_rank);
    a.wq_b = linear(pa + ".wq_b", H * hd, c.q_lora_rank, WeightFormat::FP8);
    a.wkv = linear(pa + ".wkv", hd, d, WeightFormat::FP8);
    a.kv_norm = norm(pa + ".kv_norm.weight", hd);
    a.wo_a = linear(pa + ".wo_a", c.o_groups * c.o_lora_rank, H * hd / c.o_groups, WeightFormat::FP8);
    a.wo_b = linear(pa + ".wo_b", d, c.o_groups * c.o_lora_rank, WeightFormat::FP8);
    a.attn_sink = plain(pa + ".attn_sink", {DType::F32}, {H}, Init::Sink);
    const int64_t ratio = c.compress_ratio(layer);
    if (ratio) {
      a.has_compressor = true;
      a.compressor = compressor(pa + ".compressor", ratio, hd);
      if (a.kind == AttnKind::CSA) {
        a.has_indexer = true;
        auto& ix = a.indexer;
        ix.wq_b = linear(pa + ".indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank, WeightFormat::FP8);
        ix.weights_proj = plain(pa + ".indexer.weights_proj.weight", {DType::BF16, DType::F32}, {c.index_n_heads, d},
                                Init::Dense, d);
        ix.compressor = compressor(pa + ".indexer.compressor", ratio, c.index_head_dim);
      }
    }

    auto& m = b.ffn;
    const std::string pf = p0 + ".ffn";
    m.hash_routed = c.is_hash_layer(layer);
    m.gate = plain(pf + ".gate.weight", {DType::BF16, DType::F32}, {c.n_routed_experts, d}, Init::Dense, d);
    if (m.hash_routed)
      m.tid2eid = plain(pf + ".gate.tid2eid", {DType::I32, DType::I64}, {c.vocab_size, c.num_experts_per_tok},
                        Init::TokenToExpert);
    else
      m.bias = plain(pf + ".gate.bias", {DType::F32}, {c.n_routed_experts}, Init::RouterBias);
    m.experts.reserve(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      m.experts.push_back(expert(pf + ".experts." + std::to_string(e), c.expert_format));
    m.has_shared = c.n_shared_experts > 0;
    if (m.has_shared) m.shared = expert(pf + ".shared_experts", WeightFormat::FP8);
    return b;
  }
};

}  // namespace

ModelWeights bind_weights(const ModelConfig& c, TensorProvider& provider) {
  Binder b{c, provider};
  ModelWeights w;
  const int64_t d = c.hidden_size;
  w.embed = b.plain("embed.weight", {DType::BF16, DType::F32}, {c.vocab_size, d}, Init::Embedding);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) w.layers.push_back(b.block("layers." + std::to_string(l), l));
  w.norm = b.norm("norm.weight", d);
  w.hc_head = b.hyper("hc_head", c.hc_mult, 1);
  w.head = b.plain("head.weight", {DType::BF16, DType::F32}, {c.vocab_size, d}, Init::Dense, d);
  for (int64_t i = 0; i < c.num_nextn_predict_layers; ++i) {
    const std::string p = "mtp." + std::to_string(i);
    MtpWeights m;
    m.block = b.block(p, c.num_hidden_layers + i);
    m.e_proj = b.linear(p + ".e_proj", d, d, WeightFormat::FP8);
    m.h_proj = b.linear(p + ".h_proj", d, d, WeightFormat::FP8);
    m.enorm = b.norm(p + ".enorm.weight", d);
    m.hnorm = b.norm(p + ".hnorm.weight", d);
    m.norm = b.norm(p + ".norm.weight", d);
    m.hc_head = b.hyper(p + ".hc_head", c.hc_mult, 1);
    w.mtp.push_back(std::move(m));
  }
  return w;
}

namespace {

void collect(const Linear& l, std::vector<const TensorData*>& v) {
  v.push_back(l.weight);
  v.push_back(l.scale);
}
void collect(const HyperConn& h, std::vector<const TensorData*>& v) {
  v.insert(v.end(), {h.fn, h.base, h.scale});
}
void collect(const CompressorWeights& c, std::vector<const TensorData*>& v) {
  v.insert(v.end(), {c.ape, c.wkv, c.wgate, c.norm});
}
void collect(const ExpertWeights& e, std::vector<const TensorData*>& v) {
  collect(e.w1, v);
  collect(e.w2, v);
  collect(e.w3, v);
}
void collect(const BlockWeights& b, std::vector<const TensorData*>& v) {
  v.insert(v.end(), {b.attn_norm, b.ffn_norm});
  collect(b.hc_attn, v);
  collect(b.hc_ffn, v);
  const auto& a = b.attn;
  for (const Linear* l : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) collect(*l, v);
  v.insert(v.end(), {a.q_norm, a.kv_norm, a.attn_sink});
  if (a.has_compressor) collect(a.compressor, v);
  if (a.has_indexer) {
    collect(a.indexer.wq_b, v);
    v.push_back(a.indexer.weights_proj);
    collect(a.indexer.compressor, v);
  }
  const auto& m = b.ffn;
  v.insert(v.end(), {m.gate, m.bias, m.tid2eid});
  for (const auto& e : m.experts) collect(e, v);
  if (m.has_shared) collect(m.shared, v);
}
}  // namespace

std::vector<const TensorData*> weight_tensors(const ModelWeights& w) {
  std::vector<const TensorData*> v{w.embed, w.head, w.norm};
  collect(w.hc_head, v);
  for (const auto& b : w.layers) collect(b, v);
  for (const auto& m : w.mtp) {
    collect(m.block, v);
    collect(m.e_proj, v);
    collect(m.h_proj, v);
    v.insert(v.end(), {m.enorm, m.hnorm, m.norm});
    collect(m.hc_head, v);
  }
  std::vector<const TensorData*> out;
  std::unordered_set<const TensorData*> seen;
  for (auto* t : v)
    if (t && seen.insert(t).second) out.push_back(t);
  return out;
}

}  // namespace dsv4
