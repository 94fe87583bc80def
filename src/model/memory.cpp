#include "model/memory.h"

namespace dsv4 {

WeightStats weight_stats(const ModelConfig&, const ModelWeights& w) {
  WeightStats s;
  for (const TensorData* t : weight_tensors(w)) {
    const int64_t elems = t->numel() * (t->dtype == DType::FP4_E2M1 ? 2 : 1);
    if (!t->name.ends_with(".scale")) s.params += elems;
    s.bytes += int64_t(t->nbytes);
    auto& e = s.by_dtype[std::string(dtype_name(t->dtype))];
    e.first += elems;
    e.second += int64_t(t->nbytes);
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
