#pragma once
// Size accounting shared by `inspect` and the engine's memory planner.
#include <cstdint>
#include <map>
#include <string>

#include "model/config.h"
#include "model/weights.h"
#include "tensor/kv_format.h"

namespace dsv4 {

struct WeightStats {
  int64_t params = 0;  // logical elements of weights (scales not counted)
  int64_t bytes = 0;   // stored bytes including scales
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // dtype -> (elements, bytes)
};
WeightStats weight_stats(const ModelConfig& cfg, const ModelWeights& w);

// Bytes of one stored window key or compressed entry: 4 * head_dim (F32 storage, also the
// simulation), or the packed production row (tensor/kv_format.h; 584 for DeepSeek-V4).
int64_t kv_row_bytes(const ModelConfig& cfg, KvFormat kv);
// Bytes of per-sequence state per token of context as stored in format kv (compressed entries
// and the always-F32 Lightning Indexer keys), summed over all layers (MTP included), excluding
// the fixed-size state below.
double kv_bytes_per_token(const ModelConfig& cfg, KvFormat kv);
// Fixed per-sequence state (sliding-window rings in format kv, F32 compressor partial windows
// and previous-window halves), in bytes, all layers (MTP included).
int64_t fixed_state_bytes(const ModelConfig& cfg, KvFormat kv);

}  // namespace dsv4
