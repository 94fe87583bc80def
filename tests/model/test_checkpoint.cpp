// Loader: a generated model round-trips, and each corruption listed in the foundation issue
// makes `dsv4 inspect` exit non-zero with one message naming the file and the tensor/field.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "model/memory.h"
#include "model/tiny.h"
#include "util/mapped_file.h"

namespace fs = std::filesystem;
using namespace dsv4;

namespace {

struct RunResult {
  int exit_code;  // -1 when killed by a signal
  std::string output;
};

RunResult run(const std::string& cmd) {
  RunResult r{0, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  int st = pclose(p);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("dsv4_ck_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    GeneratedModel(tiny_preset_config("tiny"), 5).write(dir_.string(), 2);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string shard(int i) const { return (dir_ / fmt::format("model-{:05d}-of-00002.safetensors", i)).string(); }
  std::string index_path() const { return (dir_ / "model.safetensors.index.json").string(); }

  // Rewrites a shard's JSON header through `edit`, keeping the data section as is.
  void edit_header(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
    std::string bytes = read_text_file(path);
    uint64_t hl;
    std::memcpy(&hl, bytes.data(), 8);
    auto h = nlohmann::json::parse(bytes.substr(8, hl));
    edit(h);
    std::string hs = h.dump();
    std::string out(8, '\0');
    uint64_t nl = hs.size();
    std::memcpy(out.data(), &nl, 8);
    out += hs + bytes.substr(8 + hl);
    write_binary_file(path, out.data(), out.size());
  }
  void edit_json(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(read_text_file(path));
    edit(j);
    std::string s = j.dump();
    write_binary_file(path, s.data(), s.size());
  }
  // Which shard holds `tensor` according to the index.
  std::string shard_of(const std::string& tensor) {
    auto j = nlohmann::json::parse(read_text_file(index_path()));
    return (dir_ / j["weight_map"][tensor].get<std::string>()).string();
  }
  RunResult inspect() { return run(std::string(DSV4_BINARY) + " inspect --model " + dir_.string()); }
  // Expect exit 1 (a handled error, not a crash) and one "error:" message mentioning every needle.
  void expect_error(const std::vector<std::string>& needles) {
    RunResult r = inspect();
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
    EXPECT_EQ(r.output.find("error:", 1), std::string::npos) << "more than one error message:\n" << r.output;
    for (const auto& n : needles) EXPECT_NE(r.output.find(n), std::string::npos) << "missing '" << n << "' in:\n" << r.output;
    EXPECT_EQ(r.output.find("problems: none"), std::string::npos);
  }

  fs::path dir_;
};

}  // namespace

TEST_F(CheckpointTest, GeneratedModelLoadsAndBindsEveryTensor) {
  auto ck = Checkpoint::open(dir_.string());
  const auto& c = ck->config();
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(ck->weights().layers.size(), 4u);
  EXPECT_EQ(ck->weights().mtp.size(), 1u);
  EXPECT_TRUE(ck->unused_tensors().empty());
  // Layer kinds follow compress_ratios {4, 16, 0, 4 | mtp 0}.
  EXPECT_EQ(ck->weights().layers[0].attn.kind, AttnKind::CSA);
  EXPECT_TRUE(ck->weights().layers[0].attn.has_indexer);
  EXPECT_EQ(ck->weights().layers[1].attn.kind, AttnKind::HCA);
  EXPECT_FALSE(ck->weights().layers[1].attn.has_indexer);
  EXPECT_EQ(ck->weights().layers[2].attn.kind, AttnKind::Sliding);
  EXPECT_FALSE(ck->weights().layers[2].attn.has_compressor);
  EXPECT_TRUE(ck->weights().layers[0].ffn.hash_routed);
  EXPECT_FALSE(ck->weights().layers[2].ffn.hash_routed);
  EXPECT_EQ(ck->weights().layers[0].ffn.experts[0].w1.format, WeightFormat::FP4);
  EXPECT_EQ(ck->weights().layers[0].ffn.experts[0].w1.weight->dtype, DType::FP4_E2M1);
  EXPECT_EQ(ck->weights().mtp[0].block.attn.kind, AttnKind::Sliding);
  // Generated and reloaded bytes are identical (zero-copy views into the mmapped shards).
  GeneratedModel again(tiny_preset_config("tiny"), 5);
  const auto* a = again.weights().layers[3].attn.wq_b.weight;
  const auto* b = ck->weights().layers[3].attn.wq_b.weight;
  ASSERT_EQ(a->nbytes, b->nbytes);
  EXPECT_EQ(std::memcmp(a->data, b->data, a->nbytes), 0);
  // Every parameter is random (never the zero/one defaults).
  // Tensors are views at their offsets in the shard, not always 4-byte aligned: copy each float out.
  const auto* sink = ck->weights().layers[0].attn.attn_sink;
  for (int64_t i = 0; i < sink->numel(); ++i) {
    float v;
    std::memcpy(&v, sink->data + i * int64_t(sizeof v), sizeof v);
    EXPECT_NE(v, 0.f);
  }
}

TEST_F(CheckpointTest, InspectPrintsScheduleAndSizes) {
  RunResult r = inspect();
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* s : {"layer  0   CSA ratio 4", "layer  1   HCA ratio 16", "layer  2   sliding", "mtp    0",
                        "hash-routed MoE", "FP4_E2M1", "F8_E4M3", "problems: none"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
}

// The placement report (serve --offload-experts): with one byte too few for all weights, the token
// embedding goes to host memory; one byte too few for the rest, the MTP block's routed experts too
// (it never runs without drafting), with an expert cache; with far too little, a clear error.
TEST_F(CheckpointTest, InspectPrintsExpertPlacement) {
  int64_t total = 0, embed = 0;
  {
    auto ck = Checkpoint::open(dir_.string());
    for (const TensorData* t : weight_tensors(ck->weights())) total += int64_t(t->nbytes);
    embed = int64_t(ck->weights().embed->nbytes);
  }
  const std::string base = std::string(DSV4_BINARY) + " inspect --model " + dir_.string();
  RunResult r = run(base + " --gpu-memory " + std::to_string(total) + " --offload-reserve 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("the token embedding in pinned host memory"), std::string::npos) << r.output;
  r = run(base + " --gpu-memory " + std::to_string(total - embed) + " --offload-reserve 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("the token embedding and routed experts of 1 layer(s) [4] in pinned host memory"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("expert cache"), std::string::npos) << r.output;
  r = run(base + " --gpu-memory " + std::to_string(total + 1) + " --offload-reserve 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("all "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("of weights on the GPU"), std::string::npos) << r.output;
  r = run(base + " --gpu-memory 1K --offload-reserve 1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--offload-experts auto"), std::string::npos) << r.output;
  r = run(base + " --gpu-memory 1G --offload-experts 7,x");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("--offload-experts: '7,x'"), std::string::npos) << r.output;
}

TEST_F(CheckpointTest, AllFp8VariantLoads) {
  fs::remove_all(dir_);
  GeneratedModel(tiny_preset_config("tiny-fp8"), 3).write(dir_.string(), 1);
  auto ck = Checkpoint::open(dir_.string());
  EXPECT_EQ(ck->weights().layers[1].ffn.experts[3].w2.format, WeightFormat::FP8);
  EXPECT_EQ(ck->weights().layers[1].ffn.experts[3].w2.scale->shape, (std::vector<int64_t>{1, 1}));
}

TEST_F(CheckpointTest, MissingConfigField) {
  edit_json((dir_ / "config.json").string(), [](nlohmann::json& j) { j.erase("hidden_size"); });
  expect_error({"config.json", "'hidden_size'"});
}

TEST_F(CheckpointTest, UnknownModelType) {
  edit_json((dir_ / "config.json").string(), [](nlohmann::json& j) { j["model_type"] = "llama"; });
  expect_error({"config.json", "model_type", "llama"});
}

TEST_F(CheckpointTest, MissingShard) {
  fs::remove(shard(2));
  expect_error({"model.safetensors.index.json", "model-00002-of-00002.safetensors", "not found"});
}

TEST_F(CheckpointTest, TruncatedHeader) {
  fs::resize_file(shard(1), 5);
  expect_error({"model-00001-of-00002.safetensors", "truncated safetensors header"});
}

TEST_F(CheckpointTest, HeaderLengthLargerThanFile) {
  std::string bytes = read_text_file(shard(1));
  uint64_t huge = bytes.size() * 2;
  std::memcpy(bytes.data(), &huge, 8);
  write_binary_file(shard(1), bytes.data(), bytes.size());
  expect_error({"model-00001-of-00002.safetensors", "header length", "larger than the file"});
}

TEST_F(CheckpointTest, DataOffsetsOutOfRange) {
  const std::string t = "embed.weight";
  edit_header(shard_of(t), [&](nlohmann::json& h) {
    auto& off = h[t]["data_offsets"];
    off[1] = off[1].get<uint64_t>() + (1ull << 40);
    off[0] = off[0].get<uint64_t>() + (1ull << 40);
  });
  expect_error({shard_of(t), "'embed.weight'", "out of range"});
}

TEST_F(CheckpointTest, DataOffsetsOverlap) {
  const std::string t = "layers.0.attn.attn_sink";
  std::string other;
  edit_header(shard_of(t), [&](nlohmann::json& h) {
    // Point another same-sized tensor of this shard at the sink's bytes.
    auto size = h[t]["data_offsets"][1].get<uint64_t>() - h[t]["data_offsets"][0].get<uint64_t>();
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == t || it.key() == "__metadata__") continue;
      auto& o = it.value()["data_offsets"];
      if (o[1].get<uint64_t>() - o[0].get<uint64_t>() == size) {
        other = it.key();
        o = h[t]["data_offsets"];
        break;
      }
    }
  });
  ASSERT_FALSE(other.empty());
  expect_error({shard_of(t), "overlap"});
}

TEST_F(CheckpointTest, WrongDtype) {
  const std::string t = "layers.1.attn.wq_a.weight";
  edit_header(shard_of(t), [&](nlohmann::json& h) { h[t]["dtype"] = "I8"; });  // same size, wrong type
  expect_error({shard_of(t), "'" + t + "'", "dtype I8", "expected F8_E4M3"});
}

TEST_F(CheckpointTest, WrongShape) {
  const std::string t = "layers.2.attn.wkv.weight";  // [64, 128]
  edit_header(shard_of(t), [&](nlohmann::json& h) { h[t]["shape"] = {128, 64}; });
  expect_error({shard_of(t), "'" + t + "'", "shape [128, 64]", "expected [64, 128]"});
}

TEST_F(CheckpointTest, MissingScaleTensor) {
  const std::string t = "layers.3.ffn.shared_experts.w2.scale";
  edit_header(shard_of(t), [&](nlohmann::json& h) { h.erase(t); });
  edit_json(index_path(), [&](nlohmann::json& j) { j["weight_map"].erase(t); });
  expect_error({"'" + t + "'", "missing"});
}

TEST_F(CheckpointTest, IndexPointsAtShardWithoutTheTensor) {
  const std::string t = "layers.3.ffn.shared_experts.w2.scale";
  edit_header(shard_of(t), [&](nlohmann::json& h) { h.erase(t); });
  expect_error({"model.safetensors.index.json", "'" + t + "'", "does not contain"});
}

TEST_F(CheckpointTest, NonUtf8TensorName) {
  const std::string t = "layers.0.attn_norm.weight";
  std::string path = shard_of(t);
  std::string bytes = read_text_file(path);
  size_t pos = bytes.find("\"" + t + "\"");
  ASSERT_NE(pos, std::string::npos);
  bytes[pos + 1 + 7] = char(0xff);  // "layers.0" -> "layers.\xff"
  write_binary_file(path, bytes.data(), bytes.size());
  expect_error({path, "not valid UTF-8", "layers.\\xff.attn_norm.weight"});
}

TEST_F(CheckpointTest, MissingConfigFile) {
  fs::remove(dir_ / "config.json");
  expect_error({"config.json not found"});
}

TEST(MemoryAccounting, RealModelStateBytesPerToken) {
  // DeepSeek-V4-Flash schedule: 2 sliding, then CSA/HCA alternating, MTP sliding.
  nlohmann::json c = tiny_preset_config("tiny");
  c["num_hidden_layers"] = 43;
  c["head_dim"] = 512;
  c["qk_rope_head_dim"] = 64;
  c["index_head_dim"] = 128;
  std::vector<int> ratios = {0, 0};
  for (int l = 2; l < 43; ++l) ratios.push_back(l % 2 == 0 ? 4 : 128);
  ratios.push_back(0);
  c["compress_ratios"] = ratios;
  c["compress_rate_hca"] = 128;
  auto cfg = parse_model_config(c, "test");
  // Per token: 21 CSA layers (one entry + one F32 128-dim indexer key per 4 tokens), 20 HCA
  // layers (one entry per 128 tokens). Entry rows: 2048 B in F32, 584 B packed.
  EXPECT_EQ(kv_row_bytes(cfg, KvFormat::F32), 2048);
  EXPECT_EQ(kv_row_bytes(cfg, KvFormat::FP8), 584);
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(cfg, KvFormat::F32), 21 * (2048 + 512) / 4.0 + 20 * 2048 / 128.0);  // 13760
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(cfg, KvFormat::FP8), 21 * (584 + 512) / 4.0 + 20 * 584 / 128.0);   // 5845.25
  EXPECT_DOUBLE_EQ(kv_bytes_per_token(cfg, KvFormat::FP8Simulated), kv_bytes_per_token(cfg, KvFormat::F32));
}

// The model id of a directory (LoadedModel::load and dsv4 serve's scripted path): its own name,
// with or without trailing separators.
TEST(ModelDirName, IgnoresTrailingSeparatorsAndDots) {
  EXPECT_EQ(model_dir_name("/models/DeepSeek-V4"), "DeepSeek-V4");
  EXPECT_EQ(model_dir_name("/models/DeepSeek-V4/"), "DeepSeek-V4");
  EXPECT_EQ(model_dir_name("/models/DeepSeek-V4//"), "DeepSeek-V4");
  EXPECT_EQ(model_dir_name("/models/DeepSeek-V4/."), "DeepSeek-V4");
  EXPECT_EQ(model_dir_name("."), fs::current_path().filename().string());
  EXPECT_EQ(model_dir_name("/"), "/");
}
