#pragma once
// Size accounting shared by `inspect` and the engine's memory planner.
#include <cstdint>
#include <map>
#include <string>

#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

struct WeightStats {
  int64_t params = 0;  // logical elements of weights (scales not counted)
  int64_t bytes = 0;   // stored bytes including scales
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // dtype -> (elements, bytes)
  int64_t routed_expert_bytes = 0;
  int64_t vocab_bytes = 0;  // embed + head
};
WeightStats weight_stats(const ModelConfig& cfg, const ModelWeights& w);

// Bytes of per-sequence state for one token of context in production format
// (FP8 no-RoPE dims with per-64 scales + BF16 RoPE dims), summed over layers,
// excluding the fixed-size sliding window and compressor partial windows.
double kv_bytes_per_token(const ModelConfig& cfg);
// Fixed per-sequence state (sliding windows, compressor partial windows), in bytes.
int64_t fixed_state_bytes(const ModelConfig& cfg);

// Weight bytes per GPU with routed experts split over `tp` ranks (expert parallel),
// vocab-parallel embed/head, everything else replicated.
int64_t weight_bytes_per_gpu(const WeightStats& s, int tp);

}  // namespace dsv4
