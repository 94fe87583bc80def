#pragma once
// Where the weights live when the model does not fit the GPU: the routed experts of whole layers
// go to pinned host memory (`--offload-experts`) and are used from a device cache: only the experts
// a step selects and the cache lacks cross the bus (docs/ENGINE.md "Experts in host memory").
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

// --offload-experts: none | auto | N (the first N MoE blocks of auto's order) | L1,L2,... (block
// indices; the MTP block is n_layers).
struct OffloadSpec {
  enum class Kind { None, Auto, Count, Layers } kind = Kind::None;
  int64_t count = 0;
  std::vector<int64_t> layers;
  // Speculative decoding runs the MTP blocks every step: Auto / Count take them last. Without it
  // they never run, and go first.
  bool drafting = false;
};
// Errors name the flag and the offending text. drafting: speculative decoding is on.
OffloadSpec parse_offload_spec(const std::string& text, bool drafting = false);
// --offload-reserve's default: device memory auto keeps free for the state pool, activations
// and graphs.
inline constexpr const char* kDefaultOffloadReserve = "16G";

struct ExpertOffloadPlan {
  std::vector<int64_t> layers;      // blocks whose routed experts are in host memory, ascending
  bool embedding = false;           // the token embedding in host memory (a row per token read)
  int64_t weight_bytes = 0;         // all weights
  int64_t host_bytes = 0;           // of which in host memory
  int64_t device_bytes = 0;         // weight_bytes - host_bytes
  int64_t expert_bytes = 0;         // one routed expert of those layers (weights and scales)
  int64_t cache_bytes = 0;          // device cache the host-resident experts are used from
  double bus_bytes_per_token = 0;   // decode without cache hits: routed experts a token selects
                                    // (in the MTP blocks too when drafting) and an embedding row
  std::vector<const TensorData*> host_tensors;  // the tensors placed in host memory
};
// The blocks in model order: layers 0..n-1, then the MTP blocks (n, n + 1, ...).
std::vector<const BlockWeights*> model_blocks(const ModelWeights& w);
// The token embedding (unless the head shares it) goes to host memory first: always with Count /
// Layers, with Auto when the weights do not fit. Auto then takes as few layers as make the
// device-resident weights and the smallest expert cache fit device_budget_bytes: the MTP blocks
// and the main layers from the last one down (MTP first or last: OffloadSpec::drafting); fails, saying
// what would be needed, when even all routed experts in host memory do not fit. Count / Layers:
// those layers whatever the budget (a budget < 0 means unknown: no check). The expert cache gets
// what the budget leaves (at most every host-resident expert), at least one token's experts
// (num_experts_per_tok).
ExpertOffloadPlan plan_expert_offload(const ModelConfig& cfg, const ModelWeights& w, const OffloadSpec& spec,
                                      int64_t device_budget_bytes);
// One line for logs and `inspect`: layers, GiB on each side, expert cache, bus bytes per decoded
// token.
std::string describe(const ExpertOffloadPlan& plan);
// Before the weights are placed on `be`: plans with the device memory free now less `reserve` and
// marks the planned tensors host-resident (with the plan's expert cache). Nothing (nullopt) for
// Kind::None or a backend without device memory (its weights are host memory already).
std::optional<ExpertOffloadPlan> offload_experts(Backend& be, const ModelConfig& cfg, const ModelWeights& w,
                                                 const OffloadSpec& spec, int64_t reserve);

}  // namespace dsv4
