#include <fmt/format.h>
#include "model/tiny.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <numeric>

#include "tensor/numeric.h"
#include "tensor/quant.h"
#include "text/tiny_tokenizer.h"
#include "util/error.h"
#include "util/mapped_file.h"
#include "util/random.h"

namespace fs = std::filesystem;

namespace dsv4 {

std::vector<std::string> tiny_preset_names() { return {"tiny", "tiny-fp8", "small"}; }

namespace {

// transformers reads the layer kinds from layer_types/compress_rates (its legacy
// compress_ratios mapping only knows 0/4/128), so generated configs carry both.
nlohmann::json with_hf_layer_types(nlohmann::json c) {
  const auto ratios = c["compress_ratios"].get<std::vector<int64_t>>();
  const int64_t layers = c["num_hidden_layers"].get<int64_t>();
  int64_t hca = 128;
  nlohmann::json types = nlohmann::json::array();
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t r = ratios[l];
    if (r <= 1) types.push_back("sliding_attention");
    else if (r == 4) types.push_back("compressed_sparse_attention");
    else {
      types.push_back("heavily_compressed_attention");
      hca = r;
    }
  }
  c["layer_types"] = types;
  c["compress_rates"] = {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", hca}};
  return c;
}

nlohmann::json base_preset(const std::string& preset);

}  // namespace

nlohmann::json tiny_preset_config(const std::string& preset) { return with_hf_layer_types(base_preset(preset)); }

namespace {

nlohmann::json base_preset(const std::string& preset) {
  // Short prompts must cross every boundary: window 16, CSA ratio 4, HCA ratio 16, top-k 8.
  // 16 index heads: with fewer, relu-sum scores tie at the top-k boundary (see docs/TESTING.md).
  nlohmann::json c = {
      {"architectures", {"DeepseekV4ForCausalLM"}},
      {"model_type", "deepseek_v4"},
      {"vocab_size", 1024},
      {"hidden_size", 128},
      {"num_hidden_layers", 4},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 1},
      {"head_dim", 64},
      {"qk_rope_head_dim", 16},
      {"q_lora_rank", 64},
      {"o_lora_rank", 32},
      {"o_groups", 2},
      {"moe_intermediate_size", 64},
      {"n_routed_experts", 8},
      {"n_shared_experts", 1},
      {"num_experts_per_tok", 2},
      {"num_hash_layers", 2},
      {"scoring_func", "sqrtsoftplus"},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", 1.5},
      {"swiglu_limit", 10.0},
      {"sliding_window", 16},
      {"compress_ratios", {4, 16, 0, 4, 0}},
      {"index_n_heads", 16},
      {"index_head_dim", 32},
      {"index_topk", 8},
      {"hc_mult", 4},
      {"hc_sinkhorn_iters", 20},
      {"hc_eps", 1e-6},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 10000.0},
      {"compress_rope_theta", 160000.0},
      {"rope_scaling",
       {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 1024}, {"beta_fast", 32}, {"beta_slow", 1}}},
      {"max_position_embeddings", 4096},
      {"num_nextn_predict_layers", 1},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
      {"tie_word_embeddings", false},
      {"torch_dtype", "bfloat16"},
      {"expert_dtype", "fp4"},
      {"quantization_config",
       {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"scale_fmt", "ue8m0"}, {"activation_scheme", "dynamic"},
        {"weight_block_size", {128, 128}}}},
  };
  if (preset == "tiny") return c;
  if (preset == "tiny-fp8") {  // the all-FP8 variant: experts with 128x128 block scales
    c.erase("expert_dtype");
    c["compress_ratios"] = {0, 4, 16, 4, 0};
    c["num_hash_layers"] = 1;
    return c;
  }
  if (preset == "small") {  // wider, more layers, more experts: still seconds on a CPU
    c["hidden_size"] = 256;
    c["num_hidden_layers"] = 6;
    c["num_attention_heads"] = 8;
    c["head_dim"] = 128;
    c["qk_rope_head_dim"] = 32;
    c["q_lora_rank"] = 128;
    c["o_lora_rank"] = 64;
    c["o_groups"] = 4;
    c["moe_intermediate_size"] = 128;
    c["n_routed_experts"] = 16;
    c["num_experts_per_tok"] = 4;
    c["num_hash_layers"] = 3;
    c["sliding_window"] = 32;
    c["compress_ratios"] = {0, 0, 4, 32, 4, 32, 0};
    c["index_head_dim"] = 64;
    c["index_topk"] = 16;
    return c;
  }
  std::string names;
  for (const auto& n : tiny_preset_names()) names += (names.empty() ? "" : ", ") + n;
  fail("--preset: unknown preset '{}' (known: {})", preset, names);
}

}  // namespace

class GeneratingProvider : public TensorProvider {
 public:
  GeneratingProvider(GeneratedModel& m, uint64_t seed, const ModelConfig& cfg) : m_(m), rng_(seed), cfg_(cfg) {}

  const TensorData* provide(const TensorRequest& req) override {
    OwnedTensor t{req.name, req.dtypes.front(), req.shape, {}};
    const bool is_scale = req.name.size() > 6 && req.name.ends_with(".scale");
    if (is_scale) {
      auto it = pending_scales_.find(req.name);
      DSV4_CHECK(it != pending_scales_.end());
      t.bytes = std::move(it->second);
      pending_scales_.erase(it);
    } else {
      fill(req, t);
    }
    m_.owned_.push_back(std::move(t));
    const OwnedTensor& o = m_.owned_.back();
    m_.views_.push_back(TensorData{o.name, o.dtype, o.shape, o.bytes.data(), o.bytes.size(), nullptr});
    return &m_.views_.back();
  }

 private:
  std::vector<float> values(const TensorRequest& req, int64_t n) {
    std::vector<float> v(n);
    const float dense_std = 1.f / std::sqrt(float(std::max<int64_t>(req.fan_in, 1)));
    for (auto& x : v) {
      switch (req.init) {
        case Init::Dense: x = dense_std * rng_.normal(); break;
        case Init::Embedding: x = rng_.normal(); break;
        case Init::NormWeight: x = 1.f + 0.2f * rng_.normal(); break;
        case Init::Sink: x = rng_.normal(); break;
        case Init::RouterBias: x = 0.2f * rng_.normal(); break;
        case Init::Ape: x = 0.5f * rng_.normal(); break;
        case Init::HcFn: x = dense_std * rng_.normal(); break;
        case Init::HcBase: x = 0.5f * rng_.normal(); break;
        case Init::HcScale: x = rng_.uniform(0.5f, 1.5f); break;
        case Init::TokenToExpert: x = 0; break;
      }
    }
    return v;
  }

  void fill(const TensorRequest& req, OwnedTensor& t) {
    int64_t n = 1;
    for (auto d : req.shape) n *= d;
    const std::string scale_name = req.name.substr(0, req.name.size() - std::string(".weight").size()) + ".scale";
    switch (t.dtype) {
      case DType::F8_E4M3: {
        const int64_t rows = req.shape[0], cols = req.shape[1];
        auto v = values(req, n);
        t.bytes.resize(n);
        std::vector<uint8_t> s(ceil_div(rows, kFp8Block) * ceil_div(cols, kFp8Block));
        quant_fp8_blocks(v.data(), rows, cols, t.bytes.data(), s.data());
        pending_scales_[scale_name] = std::move(s);
        break;
      }
      case DType::FP4_E2M1: {
        const int64_t rows = req.shape[0], cols = req.shape[1] * 2;
        auto v = values(req, rows * cols);
        t.bytes.resize(rows * cols / 2);
        std::vector<uint8_t> s(rows * cols / kFp4Group);
        quant_fp4_groups(v.data(), rows, cols, t.bytes.data(), s.data());
        pending_scales_[scale_name] = std::move(s);
        break;
      }
      case DType::BF16: {
        auto v = values(req, n);
        t.bytes.resize(2 * n);
        auto* p = reinterpret_cast<uint16_t*>(t.bytes.data());
        for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(v[i]);
        break;
      }
      case DType::F32: {
        auto v = values(req, n);
        t.bytes.resize(4 * n);
        std::memcpy(t.bytes.data(), v.data(), 4 * n);
        break;
      }
      case DType::I32: {  // tid2eid: distinct experts per token
        DSV4_CHECK(req.init == Init::TokenToExpert);
        const int64_t rows = req.shape[0], k = req.shape[1];
        t.bytes.resize(4 * n);
        auto* p = reinterpret_cast<int32_t*>(t.bytes.data());
        std::vector<int32_t> perm(cfg_.n_routed_experts);
        for (int64_t r = 0; r < rows; ++r) {
          std::iota(perm.begin(), perm.end(), 0);
          for (int64_t i = 0; i < k; ++i) {
            std::swap(perm[i], perm[i + rng_.below(perm.size() - i)]);
            p[r * k + i] = perm[i];
          }
        }
        break;
      }
      default: fail("make-tiny: cannot generate dtype {} for '{}'", dtype_name(t.dtype), req.name);
    }
  }

  GeneratedModel& m_;
  Rng rng_;
  const ModelConfig& cfg_;
  std::map<std::string, std::vector<uint8_t>> pending_scales_;
};

GeneratedModel::GeneratedModel(const nlohmann::json& config_json, uint64_t seed)
    : config_json_(config_json), config_(parse_model_config(config_json, "<generated config>")) {
  GeneratingProvider p(*this, seed, config_);
  weights_ = bind_weights(config_, p);
}

void GeneratedModel::write(const std::string& dir, int num_shards) const {
  fs::create_directories(dir);
  const std::string cfg = config_json_.dump(2) + "\n";
  write_binary_file((fs::path(dir) / "config.json").string(), cfg.data(), cfg.size());
  const std::string tok = tiny_tokenizer_json(config_.vocab_size, config_.bos_token_id, config_.eos_token_id);
  write_binary_file((fs::path(dir) / "tokenizer.json").string(), tok.data(), tok.size());

  size_t total = 0;
  for (const auto& t : owned_) total += t.bytes.size();
  num_shards = std::max(1, num_shards);
  const size_t per_shard = (total + num_shards - 1) / num_shards;
  std::vector<std::vector<const OwnedTensor*>> shards(1);
  size_t acc = 0;
  for (const auto& t : owned_) {
    if (acc >= per_shard && int(shards.size()) < num_shards) {
      shards.emplace_back();
      acc = 0;
    }
    shards.back().push_back(&t);
    acc += t.bytes.size();
  }
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  auto& wm = index["weight_map"] = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
    write_safetensors((fs::path(dir) / name).string(), shards[i]);
    for (const auto* t : shards[i]) wm[t->name] = name;
  }
  const std::string idx = index.dump(2) + "\n";
  write_binary_file((fs::path(dir) / "model.safetensors.index.json").string(), idx.data(), idx.size());
}

}  // namespace dsv4
