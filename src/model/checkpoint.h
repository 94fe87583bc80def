#pragma once
// An HF model directory: config.json + model.safetensors(.index.json + shards), mmapped.
// Opening validates every tensor the model needs (name, dtype, shape) before any compute.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dsv4 {

class Checkpoint {
 public:
  // Throws Error listing every problem found; nothing is half-loaded.
  static std::unique_ptr<Checkpoint> open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const std::vector<std::string>& shard_paths() const { return shard_paths_; }
  // Tensors present in the files but not used by the model (reported by inspect).
  std::vector<std::string> unused_tensors() const;
  // Every tensor the model uses, with its interpreted dtype (FP4 for packed experts).
  const std::vector<const TensorData*>& used_tensors() const { return used_; }

 private:
  friend class CheckpointProvider;
  std::string dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::vector<std::string> shard_paths_;
  std::map<std::string, const TensorData*> by_name_;
  std::vector<std::unique_ptr<TensorData>> reinterpreted_;  // I8 viewed as packed FP4
  std::vector<const TensorData*> used_;
  ModelWeights weights_;
};

// The model id of a model directory: the directory's own name, whatever trailing separators or
// "." components the path has ("/m/DeepSeek-V4/" -> "DeepSeek-V4"); the path as given for "/".
std::string model_dir_name(const std::string& dir);

}  // namespace dsv4
