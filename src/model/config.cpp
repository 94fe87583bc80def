#include "model/config.h"

#include "util/error.h"
#include "util/mapped_file.h"

namespace dsv4 {

namespace {

struct Reader {
  const nlohmann::json& j;
  const std::string& path;

  const nlohmann::json* find(const char* key) const {
    auto it = j.find(key);
    return (it == j.end() || it->is_null()) ? nullptr : &*it;
  }
  int64_t int_field(const char* key, int64_t lo, int64_t hi) const {
    const auto* v = find(key);
    if (!v) fail("{}: missing required field '{}'", path, key);
    return check_int(key, *v, lo, hi);
  }
  int64_t int_field(const char* key, int64_t lo, int64_t hi, int64_t def) const {
    const auto* v = find(key);
    return v ? check_int(key, *v, lo, hi) : def;
  }
  int64_t check_int(const char* key, const nlohmann::json& v, int64_t lo, int64_t hi) const {
    if (!v.is_number_integer()) fail("{}: field '{}' must be an integer, got {}", path, key, v.dump());
    int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) fail("{}: field '{}' = {} is out of range [{}, {}]", path, key, x, lo, hi);
    return x;
  }
  double num_field(const char* key, double def) const {
    const auto* v = find(key);
    if (!v) return def;
    if (!v->is_number()) fail("{}: field '{}' must be a number, got {}", path, key, v->dump());
    return v->get<double>();
  }
  std::string str_field(const char* key, const std::string& def) const {
    const auto* v = find(key);
    if (!v) return def;
    if (!v->is_string()) fail("{}: field '{}' must be a string, got {}", path, key, v->dump());
    return v->get<std::string>();
  }
  bool bool_field(const char* key, bool def) const {
    const auto* v = find(key);
    if (!v) return def;
    if (!v->is_boolean()) fail("{}: field '{}' must be true or false, got {}", path, key, v->dump());
    return v->get<bool>();
  }
  // eos_token_id may be a list; the first entry is the primary one.
  int64_t token_id(const char* key, int64_t def) const {
    const auto* v = find(key);
    if (!v) return def;
    if (v->is_array() && !v->empty()) return check_int(key, (*v)[0], 0, INT32_MAX);
    return check_int(key, *v, 0, INT32_MAX);
  }
};

constexpr int64_t kBig = int64_t(1) << 40;

}  // namespace

const char* attn_kind_name(AttnKind k) {
  switch (k) {
    case AttnKind::Sliding: return "sliding";
    case AttnKind::CSA: return "CSA";
    case AttnKind::HCA: return "HCA";
  }
  return "?";
}

int64_t ModelConfig::compress_ratio(int64_t layer) const {
  if (layer < 0 || layer >= total_layers()) fail("layer {} out of range", layer);
  if (layer < int64_t(compress_ratios.size())) {
    int64_t r = compress_ratios[layer];
    return r <= 1 ? 0 : r;  // some exports write 1 for "no compression"
  }
  return 0;  // MTP layer without a trailing entry: sliding-only
}

AttnKind ModelConfig::attn_kind(int64_t layer) const {
  int64_t r = compress_ratio(layer);
  if (r == 0) return AttnKind::Sliding;
  return r == compress_rate_csa ? AttnKind::CSA : AttnKind::HCA;
}

ModelConfig parse_model_config(const nlohmann::json& j, const std::string& path) {
  if (!j.is_object()) fail("{}: config must be a JSON object", path);
  Reader r{j, path};
  ModelConfig c;
  c.path = path;
  c.raw = j;
  c.model_type = r.str_field("model_type", "");
  if (c.model_type.empty()) fail("{}: missing required field 'model_type'", path);
  if (c.model_type != "deepseek_v4")
    fail("{}: unknown model_type '{}' (dsv4 serves 'deepseek_v4')", path, c.model_type);

  c.vocab_size = r.int_field("vocab_size", 1, INT32_MAX);
  c.hidden_size = r.int_field("hidden_size", 1, kBig);
  c.num_hidden_layers = r.int_field("num_hidden_layers", 1, 4096);
  c.num_attention_heads = r.int_field("num_attention_heads", 1, 4096);
  c.num_key_value_heads = r.int_field("num_key_value_heads", 1, 1, 1);
  c.head_dim = r.int_field("head_dim", 2, 65536);
  c.qk_rope_head_dim = r.int_field("qk_rope_head_dim", 2, c.head_dim);
  if (c.qk_rope_head_dim % 2) fail("{}: field 'qk_rope_head_dim' must be even", path);
  c.q_lora_rank = r.int_field("q_lora_rank", 1, kBig);
  c.o_lora_rank = r.int_field("o_lora_rank", 1, kBig);
  c.o_groups = r.int_field("o_groups", 1, c.num_attention_heads);
  if (c.num_attention_heads % c.o_groups)
    fail("{}: 'num_attention_heads' ({}) must be a multiple of 'o_groups' ({})", path, c.num_attention_heads, c.o_groups);
  c.moe_intermediate_size = r.int_field("moe_intermediate_size", 1, kBig);
  c.n_routed_experts = r.int_field("n_routed_experts", 1, 65536);
  c.n_shared_experts = r.int_field("n_shared_experts", 0, 1, 1);
  c.num_experts_per_tok = r.int_field("num_experts_per_tok", 1, c.n_routed_experts);
  c.num_hash_layers = r.int_field("num_hash_layers", 0, c.num_hidden_layers, 0);
  c.sliding_window = r.int_field("sliding_window", 1, kBig);
  c.index_n_heads = r.int_field("index_n_heads", 1, 4096);
  c.index_head_dim = r.int_field("index_head_dim", 2, 65536);
  if (c.index_head_dim < c.qk_rope_head_dim)
    fail("{}: 'index_head_dim' ({}) must be >= 'qk_rope_head_dim' ({})", path, c.index_head_dim, c.qk_rope_head_dim);
  c.index_topk = r.int_field("index_topk", 1, kBig);
  c.hc_mult = r.int_field("hc_mult", 1, 64, 4);
  c.hc_sinkhorn_iters = r.int_field("hc_sinkhorn_iters", 0, 1000, 20);
  c.num_nextn_predict_layers = r.int_field("num_nextn_predict_layers", 0, 16, 0);
  c.max_position_embeddings = r.int_field("max_position_embeddings", 1, kBig, 1 << 20);
  // The official code hard-wires overlapping windows and the indexer to ratio 4.
  c.compress_rate_csa = r.int_field("compress_rate_csa", 4, 4, 4);
  c.hc_eps = r.num_field("hc_eps", 1e-6);
  c.rms_norm_eps = r.num_field("rms_norm_eps", 1e-6);
  c.routed_scaling_factor = r.num_field("routed_scaling_factor", 1.5);
  c.swiglu_limit = r.num_field("swiglu_limit", 10.0);
  c.rope_theta = r.num_field("rope_theta", 10000.0);
  c.compress_rope_theta = r.num_field("compress_rope_theta", 160000.0);
  c.scoring_func = r.str_field("scoring_func", "sqrtsoftplus");
  if (c.scoring_func != "sqrtsoftplus" && c.scoring_func != "sigmoid" && c.scoring_func != "softmax")
    fail("{}: field 'scoring_func' = '{}' is not one of sqrtsoftplus, sigmoid, softmax", path, c.scoring_func);
  c.norm_topk_prob = r.bool_field("norm_topk_prob", true);
  c.tie_word_embeddings = r.bool_field("tie_word_embeddings", false);
  if (c.tie_word_embeddings) fail("{}: 'tie_word_embeddings' = true is not a DeepSeek-V4 layout", path);
  c.bos_token_id = r.token_id("bos_token_id", 0);
  c.eos_token_id = r.token_id("eos_token_id", 1);

  const auto* cr = r.find("compress_ratios");
  if (!cr) fail("{}: missing required field 'compress_ratios'", path);
  if (!cr->is_array()) fail("{}: field 'compress_ratios' must be a list of integers", path);
  for (size_t i = 0; i < cr->size(); ++i) {
    const auto& v = (*cr)[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      fail("{}: 'compress_ratios[{}]' must be a non-negative integer, got {}", path, i, v.dump());
    c.compress_ratios.push_back(v.get<int64_t>());
  }
  if (int64_t(c.compress_ratios.size()) < c.num_hidden_layers)
    fail("{}: 'compress_ratios' has {} entries but 'num_hidden_layers' is {}", path, c.compress_ratios.size(),
         c.num_hidden_layers);

  if (const auto* rs = r.find("rope_scaling")) {
    if (!rs->is_object()) fail("{}: field 'rope_scaling' must be an object", path);
    Reader y{*rs, path};
    std::string type = y.str_field("type", y.str_field("rope_type", "default"));
    if (type == "yarn") {
      c.yarn.enabled = true;
      c.yarn.factor = y.num_field("factor", 1.0);
      c.yarn.original_max_position_embeddings = y.int_field("original_max_position_embeddings", 1, kBig);
      c.yarn.beta_fast = y.num_field("beta_fast", 32);
      c.yarn.beta_slow = y.num_field("beta_slow", 1);
    } else if (type != "default") {
      fail("{}: 'rope_scaling.type' = '{}' is not supported (yarn or default)", path, type);
    }
  }

  std::string expert_dtype = r.str_field("expert_dtype", "");
  if (expert_dtype == "fp4") c.expert_format = WeightFormat::FP4;
  else if (expert_dtype.empty() || expert_dtype == "fp8") c.expert_format = WeightFormat::FP8;
  else fail("{}: field 'expert_dtype' = '{}' is not fp4 or fp8", path, expert_dtype);

  if (const auto* q = r.find("quantization_config")) {
    if (!q->is_object()) fail("{}: field 'quantization_config' must be an object", path);
    Reader qr{*q, path};
    std::string method = qr.str_field("quant_method", "fp8");
    if (method != "fp8") fail("{}: 'quantization_config.quant_method' = '{}' is not supported (fp8)", path, method);
    if (const auto* bs = qr.find("weight_block_size")) {
      if (!bs->is_array() || bs->size() != 2 || (*bs)[0] != 128 || (*bs)[1] != 128)
        fail("{}: 'quantization_config.weight_block_size' must be [128, 128], got {}", path, bs->dump());
    }
    if (const auto* sf = qr.find("scale_fmt")) {
      if (sf->is_null()) c.act_scale_pow2 = false;
      else if (sf->is_string() && sf->get<std::string>() == "ue8m0") c.act_scale_pow2 = true;
      else fail("{}: 'quantization_config.scale_fmt' = {} is not \"ue8m0\" or null", path, sf->dump());
    }
  }
  if (c.expert_format == WeightFormat::FP4 && c.hidden_size % 32) fail("{}: FP4 experts need hidden_size % 32 == 0", path);
  if (c.expert_format == WeightFormat::FP4 && c.moe_intermediate_size % 32)
    fail("{}: FP4 experts need moe_intermediate_size % 32 == 0", path);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::string text = read_text_file(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
  return parse_model_config(j, path);
}

}  // namespace dsv4
