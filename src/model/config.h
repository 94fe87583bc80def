#pragma once
// DeepSeek-V4 config.json as published with the checkpoint (HF field names).
// Unknown fields (e.g. dspark_*) are kept in `raw` untouched.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv4 {

enum class AttnKind { Sliding, CSA, HCA };  // window only | +indexed ratio-4 entries | +all ratio-m entries
enum class WeightFormat { FP8, FP4, BF16 };

struct YarnConfig {
  bool enabled = false;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32, beta_slow = 1;
};

struct ModelConfig {
  std::string path;  // config.json it was read from (for messages)
  std::string model_type;
  int64_t vocab_size = 0, hidden_size = 0, num_hidden_layers = 0, num_attention_heads = 0;
  int64_t num_key_value_heads = 1, head_dim = 0, qk_rope_head_dim = 0;
  int64_t q_lora_rank = 0, o_lora_rank = 0, o_groups = 0;
  int64_t moe_intermediate_size = 0, n_routed_experts = 0, n_shared_experts = 1, num_experts_per_tok = 0;
  int64_t num_hash_layers = 0;
  int64_t sliding_window = 0;
  int64_t index_n_heads = 0, index_head_dim = 0, index_topk = 0;
  int64_t hc_mult = 4, hc_sinkhorn_iters = 20;
  int64_t num_nextn_predict_layers = 0;
  int64_t max_position_embeddings = 0;
  int64_t compress_rate_csa = 4;  // the ratio whose layers use overlap + the Lightning Indexer
  double hc_eps = 1e-6, rms_norm_eps = 1e-6;
  double routed_scaling_factor = 1.5, swiglu_limit = 10.0;
  double rope_theta = 10000.0, compress_rope_theta = 160000.0;
  std::string scoring_func = "sqrtsoftplus";
  bool norm_topk_prob = true;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 0, eos_token_id = 1;
  std::vector<int64_t> compress_ratios;  // main layers, then MTP layers (trailing entries)
  YarnConfig yarn;
  WeightFormat expert_format = WeightFormat::FP8;  // "expert_dtype": "fp4" selects FP4
  bool act_scale_pow2 = true;  // quantization_config.scale_fmt "ue8m0": FP8 activation scales are powers of two
  nlohmann::json raw;

  // Layer index l in [0, num_hidden_layers + num_nextn_predict_layers): MTP layers follow the main ones.
  int64_t compress_ratio(int64_t layer) const;
  AttnKind attn_kind(int64_t layer) const;
  bool is_hash_layer(int64_t layer) const { return layer < num_hash_layers; }
  int64_t rope_dim() const { return qk_rope_head_dim; }
  int64_t nope_dim() const { return head_dim - qk_rope_head_dim; }
  int64_t hc_mix() const { return (2 + hc_mult) * hc_mult; }
  int64_t total_layers() const { return num_hidden_layers + num_nextn_predict_layers; }
};

ModelConfig parse_model_config(const nlohmann::json& j, const std::string& path);
ModelConfig load_model_config(const std::string& path);
const char* attn_kind_name(AttnKind k);

}  // namespace dsv4
