#pragma once
// Bytes and multiply-adds of the model's weights per step, for the benchmarks' rooflines
// (dsv4 bench model): what one GPU reads when each weight it holds streams once per pass.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "model/config.h"
#include "model/weights.h"

namespace dsv4::cli {

inline size_t linear_bytes(const Linear& l) {
  return (l.weight ? l.weight->nbytes : 0) + (l.scale ? l.scale->nbytes : 0);
}

// Of one GPU: a rank of a --tp/--ep group holds a share of the heads and experts.
struct LayerCost {
  size_t fixed = 0;         // attention + shared expert + router + mHC: read once per pass
  size_t expert = 0;        // one routed expert (its slice under --tp without --ep)
  double expert_share = 1;  // the routed experts held here / all routed experts
  double macs = 0;          // per token, excluding attention scores
};

inline LayerCost layer_cost(const BlockWeights& b, const ModelConfig& c) {
  LayerCost k;
  const auto& a = b.attn;
  for (const Linear* l : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) {
    k.fixed += linear_bytes(*l);
    k.macs += double(l->out) * double(l->in);
  }
  if (a.has_compressor) {
    const auto& cw = a.compressor;
    k.fixed += cw.wkv->nbytes + cw.wgate->nbytes;
    k.macs += 2.0 * double(cw.wkv->shape[0]) * double(c.hidden_size);
  }
  if (a.has_indexer) {
    const auto& ix = a.indexer;
    k.fixed += linear_bytes(ix.wq_b) + ix.weights_proj->nbytes + ix.compressor.wkv->nbytes + ix.compressor.wgate->nbytes;
    k.macs += double(ix.wq_b.out) * double(ix.wq_b.in) + 2.0 * double(ix.compressor.wkv->shape[0]) * double(c.hidden_size);
  }
  k.fixed += b.hc_attn.fn->nbytes + b.hc_ffn.fn->nbytes + b.ffn.gate->nbytes;
  k.macs += double(b.ffn.gate->shape[0]) * double(c.hidden_size);
  const auto& e = b.ffn.experts.at(0);
  k.expert = linear_bytes(e.w1) + linear_bytes(e.w2) + linear_bytes(e.w3);
  k.expert_share = double(b.ffn.experts.size()) / double(c.n_routed_experts);
  k.macs += 3.0 * double(e.w1.out) * double(e.w1.in) * double(c.num_experts_per_tok) * k.expert_share;
  if (b.ffn.has_shared) {
    const auto& s = b.ffn.shared;
    k.fixed += linear_bytes(s.w1) + linear_bytes(s.w2) + linear_bytes(s.w3);
    k.macs += 3.0 * double(s.w1.out) * double(s.w1.in);
  }
  return k;
}

// Expected distinct routed experts of `rows` tokens that each pick top-k of E uniformly (random
// weights route so; real text reuses experts more).
inline double distinct_experts(const ModelConfig& c, double rows) {
  const double E = double(c.n_routed_experts), K = double(c.num_experts_per_tok);
  return E * (1.0 - std::pow(1.0 - K / E, rows));
}

// Weight bytes of one pass over `rows` tokens: every layer's fixed weights and its distinct
// experts, plus the head (read once whatever the rows). mtp: the MTP block (its layer and
// projections) instead of the main layers.
inline double pass_weight_bytes(const ModelConfig& c, const ModelWeights& w, double rows, bool mtp) {
  double bytes = double(w.head->nbytes + (mtp ? w.mtp.at(0).hc_head.fn->nbytes : w.hc_head.fn->nbytes));
  auto layer = [&](const BlockWeights& b) {
    const LayerCost k = layer_cost(b, c);
    bytes += double(k.fixed) + distinct_experts(c, rows) * k.expert_share * double(k.expert);
  };
  if (mtp) {
    layer(w.mtp.at(0).block);
    bytes += double(linear_bytes(w.mtp[0].e_proj) + linear_bytes(w.mtp[0].h_proj));
  } else {
    for (const BlockWeights& b : w.layers) layer(b);
  }
  return bytes;
}

}  // namespace dsv4::cli
