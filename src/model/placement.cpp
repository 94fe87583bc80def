#include "model/placement.h"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "util/error.h"

namespace dsv4 {

namespace {

int64_t parse_index(std::string_view s, const std::string& text) {
  int64_t v = -1;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v < 0)
    fail("--offload-experts: '{}' is not none, auto, a layer count or a comma-separated list of layer indices "
         "('{}' is not a non-negative integer)",
         text, s);
  return v;
}

// Routed-expert tensors of a block (weights and scales), in model order.
std::vector<const TensorData*> routed_tensors(const BlockWeights& b) {
  std::vector<const TensorData*> ts;
  for (const ExpertWeights& e : b.ffn.experts)
    for (const Linear* l : {&e.w1, &e.w2, &e.w3})
      for (const TensorData* t : {l->weight, l->scale})
        if (t) ts.push_back(t);
  return ts;
}

int64_t bytes_of(const std::vector<const TensorData*>& ts) {
  int64_t n = 0;
  for (const TensorData* t : ts) n += int64_t(t->nbytes);
  return n;
}

constexpr double kGiB = double(1 << 30);

}  // namespace

OffloadSpec parse_offload_spec(const std::string& text, bool drafting) {
  OffloadSpec s;
  s.drafting = drafting;
  if (text.empty() || text == "none") return s;
  if (text == "auto") {
    s.kind = OffloadSpec::Kind::Auto;
    return s;
  }
  if (text.find(',') == std::string::npos && text.find_first_not_of("0123456789") == std::string::npos) {
    s.kind = OffloadSpec::Kind::Count;
    s.count = parse_index(text, text);
    return s;
  }
  s.kind = OffloadSpec::Kind::Layers;
  std::string_view rest(text);
  while (true) {
    const size_t comma = rest.find(',');
    s.layers.push_back(parse_index(rest.substr(0, comma), text));
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  std::sort(s.layers.begin(), s.layers.end());
  if (std::adjacent_find(s.layers.begin(), s.layers.end()) != s.layers.end())
    fail("--offload-experts: '{}' names a layer twice", text);
  return s;
}

std::vector<const BlockWeights*> model_blocks(const ModelWeights& w) {
  std::vector<const BlockWeights*> bs;
  for (const BlockWeights& b : w.layers) bs.push_back(&b);
  for (const MtpWeights& m : w.mtp) bs.push_back(&m.block);
  return bs;
}

ExpertOffloadPlan plan_expert_offload(const ModelConfig& cfg, const ModelWeights& w, const OffloadSpec& spec,
                                      int64_t device_budget_bytes) {
  ExpertOffloadPlan p;
  p.weight_bytes = bytes_of(weight_tensors(w));
  const auto blocks = model_blocks(w);
  auto has_experts = [](const BlockWeights* b) { return !b->ffn.experts.empty(); };
  for (const BlockWeights* b : blocks)
    if (has_experts(b)) {
      p.expert_bytes = bytes_of(routed_tensors(*b)) / int64_t(b->ffn.experts.size());
      break;
    }
  const int64_t min_cache = p.expert_bytes * cfg.num_experts_per_tok;
  // The embedding is only gathered (a row per token): it leaves the GPU first.
  const TensorData* embed = w.embed && w.embed != w.head ? w.embed : nullptr;
  std::vector<const BlockWeights*> chosen;
  switch (spec.kind) {
    case OffloadSpec::Kind::None: break;
    case OffloadSpec::Kind::Layers:
      for (int64_t l : spec.layers) {
        auto it = std::find_if(blocks.begin(), blocks.end(), [&](const BlockWeights* b) { return b->layer == l; });
        if (it == blocks.end() || !has_experts(*it))
          fail("--offload-experts: layer {} has no routed experts (the model has layers 0..{}, MTP from {})", l,
               cfg.num_hidden_layers - 1, cfg.num_hidden_layers);
        chosen.push_back(*it);
      }
      p.embedding = embed != nullptr;
      break;
    case OffloadSpec::Kind::Count:
    case OffloadSpec::Kind::Auto: {
      // Main layers from the last one down; the MTP blocks before them when nothing drafts.
      std::vector<const BlockWeights*> order, mtp;
      for (auto it = w.layers.rbegin(); it != w.layers.rend(); ++it)
        if (has_experts(&*it)) order.push_back(&*it);
      for (const MtpWeights& m : w.mtp)
        if (has_experts(&m.block)) mtp.push_back(&m.block);
      order.insert(spec.drafting ? order.end() : order.begin(), mtp.begin(), mtp.end());
      if (spec.kind == OffloadSpec::Kind::Count) {
        if (spec.count > int64_t(order.size()))
          fail("--offload-experts: {} layers asked, the model has {} with routed experts", spec.count, order.size());
        chosen.assign(order.begin(), order.begin() + spec.count);
        p.embedding = embed != nullptr;
        break;
      }
      int64_t device = p.weight_bytes;
      auto fits = [&] { return device + (chosen.empty() ? 0 : min_cache) <= device_budget_bytes; };
      if (!fits() && embed) {
        device -= int64_t(embed->nbytes);
        p.embedding = true;
      }
      for (size_t i = 0; i < order.size() && !fits(); ++i) {
        device -= bytes_of(routed_tensors(*order[i]));
        chosen.push_back(order[i]);
      }
      if (!fits())
        fail("--offload-experts auto: the weights and the smallest expert cache need {:.2f} GiB on the GPU even with "
             "every routed expert in host memory, {:.2f} GiB are available for them (free memory minus "
             "--offload-reserve)",
             double(device + min_cache) / kGiB, double(device_budget_bytes) / kGiB);
      break;
    }
  }
  if (p.embedding) {
    p.host_tensors.push_back(embed);
    p.bus_bytes_per_token += double(embed->nbytes) / double(cfg.vocab_size);
  }
  std::sort(chosen.begin(), chosen.end(), [](const BlockWeights* a, const BlockWeights* b) { return a->layer < b->layer; });
  for (const BlockWeights* b : chosen) {
    p.layers.push_back(b->layer);
    const auto ts = routed_tensors(*b);
    p.host_tensors.insert(p.host_tensors.end(), ts.begin(), ts.end());
    // The MTP block runs once per drafted token, and only when drafting.
    if (b->layer >= cfg.num_hidden_layers && !spec.drafting) continue;
    const int64_t experts = int64_t(b->ffn.experts.size());
    p.bus_bytes_per_token += double(bytes_of(ts)) / double(experts) * double(std::min(cfg.num_experts_per_tok, experts));
  }
  p.host_bytes = bytes_of(p.host_tensors);
  p.device_bytes = p.weight_bytes - p.host_bytes;
  if (!p.layers.empty()) {
    const int64_t host_experts = p.host_bytes - (p.embedding ? int64_t(embed->nbytes) : 0);
    const int64_t left = device_budget_bytes < 0 ? 0 : device_budget_bytes - p.device_bytes;
    p.cache_bytes = std::max(min_cache, std::min(left, host_experts));
  }
  return p;
}

std::optional<ExpertOffloadPlan> offload_experts(Backend& be, const ModelConfig& cfg, const ModelWeights& w,
                                                 const OffloadSpec& spec, int64_t reserve) {
  const std::optional<size_t> free = be.device_free_bytes();
  if (spec.kind == OffloadSpec::Kind::None || !free) return std::nullopt;
  ExpertOffloadPlan plan = plan_expert_offload(cfg, w, spec, int64_t(*free) - reserve);
  be.set_host_resident(plan.host_tensors, size_t(plan.cache_bytes));
  return plan;
}

std::string describe(const ExpertOffloadPlan& p) {
  if (p.host_tensors.empty()) return fmt::format("all {:.2f} GiB of weights on the GPU", double(p.weight_bytes) / kGiB);
  const std::string what =
      p.layers.empty() ? std::string("the token embedding")
                       : fmt::format("{}routed experts of {} layer(s) [{}]", p.embedding ? "the token embedding and " : "",
                                     p.layers.size(), fmt::join(p.layers, ","));
  const std::string cache =
      p.layers.empty() ? std::string()
                       : fmt::format(", expert cache {:.2f} GiB ({} experts)", double(p.cache_bytes) / kGiB,
                                     p.expert_bytes ? p.cache_bytes / p.expert_bytes : 0);
  return fmt::format("{} in pinned host memory: {:.2f} GiB on the GPU, {:.2f} GiB in host memory{}, {:.1f} MB over the "
                     "bus per decoded token without cache hits",
                     what, double(p.device_bytes) / kGiB, double(p.host_bytes) / kGiB, cache,
                     p.bus_bytes_per_token / 1e6);
}

}  // namespace dsv4
