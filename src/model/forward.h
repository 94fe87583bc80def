#pragma once
// The DeepSeek-V4 forward pass, written once against the Backend interface
// (docs/MODEL.md Phase 2): embed -> mHC expand -> blocks -> hc_head -> norm -> head, and the MTP block.
#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

// Everything one layer keeps between steps. Sizes are fixed at creation (capacity in tokens),
// so the engine can page and snapshot it.
struct LayerState {
  Tensor window;           // [W, head_dim]: keys of the last W positions, slot = pos % W
  Tensor entries;          // [cap / ratio, head_dim]: compressed entries (normed, RoPE'd)
  Tensor index_keys;       // [cap / ratio, index_head_dim]: Lightning Indexer keys (CSA)
  int64_t num_entries = 0;
  CompressorState compressor, index_compressor;
};

struct SequenceState {
  int64_t num_tokens = 0;       // main model positions processed
  int64_t mtp_tokens = 0;       // MTP positions processed
  int64_t capacity = 0;         // max positions
  std::vector<LayerState> layers, mtp_layers;
};

class Model {
 public:
  Model(const ModelConfig& cfg, const ModelWeights& w, Backend& backend);

  SequenceState new_sequence(int64_t capacity_tokens) const;

  // Feeds tokens at positions state.num_tokens... and returns logits [T, vocab]. When streams is
  // given it receives the final residual streams [T, hc_mult, hidden] (the MTP block's input).
  Tensor forward(SequenceState& state, std::span<const int32_t> tokens, Tensor* streams = nullptr);

  // MTP draft logits [n, vocab] for positions state.mtp_tokens...: row i combines the main
  // streams of that position with the token that follows it (next_tokens[i]).
  Tensor forward_mtp(SequenceState& state, const Tensor& streams, std::span<const int32_t> next_tokens);

  // Production KV format simulation (Backend::quantize_kv on window keys and compressed entries).
  void set_kv_fp8(bool on) { kv_fp8_ = on; }
  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return be_; }

 private:
  Tensor block(const BlockWeights& b, LayerState& st, const Tensor& X, const Tensor& tokens, const Tensor& pos,
               int64_t start);
  Tensor attention(const AttentionWeights& a, LayerState& st, const Tensor& x, const Tensor& pos, int64_t start);
  Tensor compress(const CompressorWeights& c, CompressorState& cs, const Tensor& x, int64_t start, Tensor& store,
                  int64_t first_entry);
  Tensor logits(const Tensor& X, const HyperConn& hc, const TensorData& norm);
  LayerState new_layer_state(int64_t layer, int64_t capacity) const;
  Tensor int_tensor(const std::vector<int32_t>& v, std::vector<int64_t> shape);

  const ModelConfig& cfg_;
  const ModelWeights& w_;
  Backend& be_;
  RopeTable rope_main_, rope_compressed_;
  bool kv_fp8_ = false;
};

}  // namespace dsv4

namespace dsv4 {

// Feeds `tokens` in chunks of the given sizes (empty: one chunk) and returns row-major logits:
// main model [T, vocab], or with mtp the MTP block's [T-1, vocab] (row t: streams of position t
// with token t+1). Chunk sizes must be positive and sum to T.
std::vector<float> run_chunked(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> chunks,
                               bool mtp);

}  // namespace dsv4
