#include <fmt/format.h>
#include "model/checkpoint.h"

#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/mapped_file.h"

namespace fs = std::filesystem;

namespace dsv4 {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

class CheckpointProvider : public TensorProvider {
 public:
  explicit CheckpointProvider(Checkpoint& ck) : ck_(ck) {}
  std::vector<std::string> problems;

  const TensorData* provide(const TensorRequest& req) override {
    auto it = ck_.by_name_.find(req.name);
    if (it == ck_.by_name_.end()) {
      problems.push_back(fmt::format("{}: tensor '{}' is missing", ck_.dir_, req.name));
      return nullptr;
    }
    const TensorData* t = it->second;
    bool wants_fp4 = req.dtypes.size() == 1 && req.dtypes[0] == DType::FP4_E2M1;
    bool ok_dtype = false;
    for (DType d : req.dtypes) ok_dtype |= d == t->dtype || (d == DType::FP4_E2M1 && t->dtype == DType::I8);
    if (!ok_dtype) {
      std::string want;
      for (DType d : req.dtypes) want += (want.empty() ? "" : " or ") + std::string(dtype_safetensors_name(d));
      problems.push_back(fmt::format("{}: tensor '{}' has dtype {}, expected {}", *t->file, req.name,
                                     dtype_name(t->dtype), want));
      return nullptr;
    }
    if (t->shape != req.shape) {
      problems.push_back(fmt::format("{}: tensor '{}' has shape {}, expected {}", *t->file, req.name,
                                     shape_str(t->shape), shape_str(req.shape)));
      return nullptr;
    }
    if (wants_fp4) {
      auto v = std::make_unique<TensorData>(*t);
      v->dtype = DType::FP4_E2M1;
      t = v.get();
      ck_.reinterpreted_.push_back(std::move(v));
    }
    ck_.used_.push_back(t);
    return t;
  }

 private:
  Checkpoint& ck_;
};

std::string model_dir_name(const std::string& dir) {
  std::string p = fs::absolute(dir).lexically_normal().string();  // "m/./" -> "/cwd/m/"
  while (p.size() > 1 && p.back() == fs::path::preferred_separator) p.pop_back();
  std::string name = fs::path(p).filename().string();
  return name.empty() ? dir : name;
}

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir) {
  auto ck = std::unique_ptr<Checkpoint>(new Checkpoint());
  ck->dir_ = dir;
  if (!fs::is_directory(dir)) fail("{}: not a model directory", dir);
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(cfg_path)) fail("{}: config.json not found", dir);
  ck->config_ = load_model_config(cfg_path);

  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single_path = (fs::path(dir) / "model.safetensors").string();
  if (fs::exists(index_path)) {
    nlohmann::json idx;
    try {
      idx = nlohmann::json::parse(read_text_file(index_path));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: invalid JSON: {}", index_path, e.what());
    }
    if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
      fail("{}: missing 'weight_map' object", index_path);
    std::map<std::string, std::string> wm;  // tensor -> shard file name
    std::set<std::string> shard_names;
    for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail("{}: weight_map entry '{}' must be a file name", index_path, it.key());
      std::string f = it.value().get<std::string>();
      if (f.find('/') != std::string::npos || f == "..")
        fail("{}: weight_map entry '{}' names '{}', which is not a file in the model directory", index_path, it.key(), f);
      wm[it.key()] = f;
      shard_names.insert(f);
    }
    std::map<std::string, const SafetensorsFile*> shard_by_name;
    for (const auto& s : shard_names) {
      std::string p = (fs::path(dir) / s).string();
      if (!fs::exists(p)) {
        std::string example;
        for (const auto& [t, f] : wm)
          if (f == s) { example = t; break; }
        fail("{}: shard '{}' (holding tensor '{}') not found in {}", index_path, s, example, dir);
      }
      ck->shards_.push_back(std::make_unique<SafetensorsFile>(p));
      ck->shard_paths_.push_back(p);
      shard_by_name[s] = ck->shards_.back().get();
    }
    for (const auto& [t, f] : wm) {
      const TensorData* td = shard_by_name[f]->find(t);
      if (!td) fail("{}: tensor '{}' is listed in shard '{}' but that file does not contain it", index_path, t, f);
      ck->by_name_[t] = td;
    }
  } else if (fs::exists(single_path)) {
    ck->shards_.push_back(std::make_unique<SafetensorsFile>(single_path));
    ck->shard_paths_.push_back(single_path);
    for (const auto& [t, td] : ck->shards_.back()->tensors()) ck->by_name_[t] = &td;
  } else {
    fail("{}: neither model.safetensors.index.json nor model.safetensors found", dir);
  }

  CheckpointProvider provider(*ck);
  ck->weights_ = bind_weights(ck->config_, provider);
  if (!provider.problems.empty()) {
    std::string msg = provider.problems.front();
    for (size_t i = 1; i < provider.problems.size(); ++i) msg += "\n" + provider.problems[i];
    if (provider.problems.size() > 1) msg += fmt::format("\n({} problems)", provider.problems.size());
    fail("{}", msg);
  }
  return ck;
}

std::vector<std::string> Checkpoint::unused_tensors() const {
  std::set<std::string> used;
  for (const auto* t : used_) used.insert(t->name);
  std::vector<std::string> out;
  for (const auto& [name, t] : by_name_)
    if (!used.count(name)) out.push_back(name);
  return out;
}

}  // namespace dsv4
