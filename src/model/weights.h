#pragma once
// The model's weights as one typed description. `bind_weights` walks the architecture once
// and asks a TensorProvider for every tensor by official name, dtype and shape. The same walk
// validates a checkpoint (CheckpointProvider) and generates random ones (make-tiny).
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"

namespace dsv4 {

// How a generator should fill a tensor (a checkpoint provider ignores it).
enum class Init { Dense, Embedding, NormWeight, Sink, RouterBias, Ape, HcFn, HcBase, HcScale, TokenToExpert };

struct TensorRequest {
  std::string name;
  std::vector<DType> dtypes;  // accepted stored dtypes, preferred first
  std::vector<int64_t> shape;  // stored shape (FP4: [rows, cols/2])
  Init init = Init::Dense;
  int64_t fan_in = 1;  // for Init::Dense scaling
};

class TensorProvider {
 public:
  virtual ~TensorProvider() = default;
  // Returns the tensor, or nullptr after recording a problem.
  virtual const TensorData* provide(const TensorRequest& req) = 0;
};

struct Linear {
  WeightFormat format = WeightFormat::BF16;
  const TensorData* weight = nullptr;
  const TensorData* scale = nullptr;  // FP8: [ceil(out/128), ceil(in/128)]; FP4: [out, in/32]
  int64_t out = 0, in = 0;
};

// A plain BF16/F32 matrix [out, in] (router gate, compressor projections, head) as a Linear.
inline Linear dense_linear(const TensorData& t) {
  return Linear{WeightFormat::BF16, &t, nullptr, t.shape[0], t.shape.size() > 1 ? t.shape[1] : 1};
}

struct HyperConn {  // mHC mixing parameters (fn: [mix, hc*dim], base: [mix], scale: [3] or [1])
  const TensorData *fn = nullptr, *base = nullptr, *scale = nullptr;
};

struct CompressorWeights {
  int64_t ratio = 0, head_dim = 0;
  bool overlap = false;  // CSA: two interleaved windows (Ca/Cb), coff = 2
  const TensorData *ape = nullptr, *wkv = nullptr, *wgate = nullptr, *norm = nullptr;
};

struct IndexerWeights {
  Linear wq_b;
  const TensorData* weights_proj = nullptr;
  CompressorWeights compressor;
};

struct AttentionWeights {
  AttnKind kind = AttnKind::Sliding;
  Linear wq_a, wq_b, wkv, wo_a, wo_b;
  const TensorData *q_norm = nullptr, *kv_norm = nullptr, *attn_sink = nullptr;
  bool has_compressor = false, has_indexer = false;
  CompressorWeights compressor;
  IndexerWeights indexer;
};

struct ExpertWeights {
  Linear w1, w2, w3;
};

struct MoEWeights {
  bool hash_routed = false;
  const TensorData* gate = nullptr;
  const TensorData* bias = nullptr;     // score-routed layers
  const TensorData* tid2eid = nullptr;  // hash-routed layers: [vocab, top_k]
  std::vector<ExpertWeights> experts;  // experts[i] is expert first_expert + i
  int64_t first_expert = 0;             // expert parallelism: this rank holds a range (model/parallel.h)
  bool has_shared = false;
  ExpertWeights shared;
  // Routed experts of the whole layer (all ranks): the router's rows; a MoE without a router (ops
  // fed explicit routing, as the op tests do) holds all of its experts.
  int64_t routed_experts() const { return gate ? gate->shape[0] : first_expert + int64_t(experts.size()); }
};

struct BlockWeights {
  int64_t layer = 0;
  const TensorData *attn_norm = nullptr, *ffn_norm = nullptr;
  HyperConn hc_attn, hc_ffn;
  AttentionWeights attn;
  MoEWeights ffn;
};

struct MtpWeights {
  BlockWeights block;
  Linear e_proj, h_proj;
  const TensorData *enorm = nullptr, *hnorm = nullptr, *norm = nullptr;
  HyperConn hc_head;
};

struct ModelWeights {
  const TensorData *embed = nullptr, *head = nullptr, *norm = nullptr;
  HyperConn hc_head;
  std::vector<BlockWeights> layers;
  std::vector<MtpWeights> mtp;
};

// Walks the whole architecture; pointers are null where the provider reported a problem.
ModelWeights bind_weights(const ModelConfig& cfg, TensorProvider& provider);

// Every distinct tensor the weights reference (scales included), in model order.
std::vector<const TensorData*> weight_tensors(const ModelWeights& w);

}  // namespace dsv4
