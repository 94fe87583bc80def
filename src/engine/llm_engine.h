#pragma once
// The engine implementation: a model bundle (weights + backend + forward + tokenizer), the
// engine configuration and the factory. See docs/ENGINE.md.
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "engine/engine.h"
#include "model/forward.h"
#include "model/placement.h"
#include "text/tokenizer.h"

namespace dsv4 {

class Checkpoint;
class GeneratedModel;

// Everything the engine runs: owns the weights (a checkpoint or a generated model), the
// backend and the forward pass; the tokenizer is optional (no text, no stop strings without it).
// With --tp/--ep (model/parallel.h) it holds one rank per backend (CPU: threads of one process;
// CUDA: device r), and `model` is rank 0, the leader that drives the others in lock step.
struct LoadedModel {
  struct Rank {
    std::unique_ptr<WeightShard> shard;  // null when unsharded
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Model> model;
  };
  std::unique_ptr<Checkpoint> checkpoint;
  std::unique_ptr<GeneratedModel> generated;
  std::vector<std::unique_ptr<Communicator>> comms;  // one per rank (none when unsharded)
  std::unique_ptr<RankThreads> threads;
  std::vector<Rank> ranks;
  Model* model = nullptr;  // ranks[0].model
  std::optional<Tokenizer> tokenizer;
  std::string name;  // model id reported to clients

  const ModelConfig& config() const { return model->config(); }
  ~LoadedModel();

  // A model directory (config.json, safetensors, tokenizer.json when present); backend "cpu"
  // (or "cuda" when compiled in); par: the --tp/--ep split (each rank reads only its shard).
  // offload: where routed experts go when the weights do not fit the device (model/placement.h);
  // offload_reserve_bytes of the free device memory stay for the state pool and activations (Auto
  // offloads until they do; the expert cache gets the rest). The plan is logged.
  static std::shared_ptr<LoadedModel> load(const std::string& dir, const std::string& backend = "cpu",
                                           const ParallelConfig& par = {}, const OffloadSpec& offload = {},
                                           int64_t offload_reserve_bytes = 0);
  // Weights described without host data (random benchmark models): prepare(r, backend, weights
  // of rank r) fills them on rank r's backend before its Model is made. cfg and w must outlive
  // the result (it does not own them).
  using PrepareRank = std::function<void(int, Backend&, const ModelWeights&)>;
  static std::shared_ptr<LoadedModel> from_weights(const ModelConfig& cfg, const ModelWeights& w,
                                                   const std::string& backend, const ParallelConfig& par,
                                                   const PrepareRank& prepare);
  // The built-in demo: a GeneratedModel of a tiny preset with tiny_tokenizer_json.
  static std::shared_ptr<LoadedModel> demo(const std::string& preset = "tiny", uint64_t seed = 1,
                                           const ParallelConfig& par = {});
};

struct EngineConfig {
  // State memory budget in bytes (--kv-memory); 0: 256 MiB on the CPU backend; on CUDA,
  // gpu_memory_utilization of the device memory free at engine start (after the weights) less
  // the activation headroom (docs/ENGINE.md, "Device memory").
  int64_t kv_memory_bytes = 0;
  double gpu_memory_utilization = 0.9;  // in (0, 1]
  int64_t num_blocks = 0;                // > 0: overrides the budget (tests)
  int64_t block_size = 0;                // tokens per block; 0: 256 (must be a multiple of every ratio)
  int64_t max_running_requests = 64;     // running sequences (samples)
  int64_t max_batched_tokens = 2048;     // tokens fed per scheduler step
  int64_t max_model_len = 0;             // 0: max_position_embeddings
  bool enable_prefix_caching = true;
  // --kv fp8: window keys and compressed entries stored as production rows (tensor/kv_format.h:
  // FP8 no-RoPE dims with per-64 UE8M0 scales, BF16 RoPE dims; 584 B instead of 2048 B per row
  // on DeepSeek-V4). Off (f32, the default): exact, HF-faithful storage.
  bool kv_fp8 = false;
  double snapshot_fraction = 0.15;       // share of the budget for prefix-cache boundary snapshots
  int64_t num_snapshots = -1;            // >= 0: overrides the share (tests)
  uint64_t seed = 0;                     // seeds of requests without one
  // --speculative-tokens k: the MTP block drafts k tokens (1..3) per decode step, verified in
  // the next batched pass (docs/ENGINE.md, "Speculative decoding"); 0: off.
  int32_t speculative_tokens = 0;
  // Sample with Backend::sample (only token ids leave the device) for requests without
  // penalties or logprobs; the tokens equal the host sampler's. Unset: on unless the backend is
  // the CPU reference (tests force it on there).
  std::optional<bool> device_sampling;
  bool log_startup = true;               // print the state layout and capacity to stderr
  // Test/diagnostic hook, engine thread: every logits row a token is sampled from (raw model
  // output), with the request id, sample index and the position whose logits these are.
  std::function<void(const std::string& id, int32_t index, int64_t position, std::span<const float> logits)>
      on_logits;
};

// "1073741824", "512M", "4G", "1.5GiB" -> bytes; Error naming `flag` otherwise.
int64_t parse_memory_size(const std::string& text, const std::string& flag = "--kv-memory");

// The concrete engine exposes a few extras for tests and the CLI.
class LLMEngine : public Engine {
 public:
  // Blocks until every request in flight has finished (test helper; engine keeps running).
  virtual void wait_idle() = 0;
  // Drops unreferenced prefix-cache blocks (engine thread, synchronously).
  virtual void clear_prefix_cache() = 0;
  virtual int64_t block_size() const = 0;
  virtual int64_t block_bytes() const = 0;  // state bytes of one block (all layers)
};

std::unique_ptr<LLMEngine> make_engine(const EngineConfig& cfg, std::shared_ptr<LoadedModel> model);

}  // namespace dsv4
