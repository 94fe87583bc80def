#pragma once
// Small random DeepSeek-V4 models in exactly the official layout and formats. Used by
// `dsv4 make-tiny`, the demo server and the tests.
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dsv4 {

std::vector<std::string> tiny_preset_names();
// config.json contents of a preset (throws naming the preset if unknown).
nlohmann::json tiny_preset_config(const std::string& preset);

// A model generated in memory: owns its tensors, exposes the same ModelWeights as a Checkpoint.
class GeneratedModel {
 public:
  GeneratedModel(const nlohmann::json& config_json, uint64_t seed);
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const nlohmann::json& config_json() const { return config_json_; }
  // Writes config.json, sharded safetensors + index and tokenizer.json into dir.
  void write(const std::string& dir, int num_shards) const;

 private:
  friend class GeneratingProvider;
  nlohmann::json config_json_;
  ModelConfig config_;
  std::deque<OwnedTensor> owned_;
  std::deque<TensorData> views_;
  ModelWeights weights_;
};

}  // namespace dsv4
