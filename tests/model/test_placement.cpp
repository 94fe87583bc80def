// The expert offload plan (--offload-experts, model/placement.h): parsing, which layers each mode
// picks, and its memory arithmetic against the tensors themselves, on the generated models.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>

#include "model/placement.h"
#include "model/tiny.h"
#include "util/error.h"

using namespace dsv4;

namespace {

int64_t bytes_of(const std::vector<const TensorData*>& ts) {
  int64_t n = 0;
  for (const TensorData* t : ts) n += int64_t(t->nbytes);
  return n;
}

// Routed-expert tensors of block `layer`, computed here independently of the plan.
std::vector<const TensorData*> experts_of(const ModelWeights& w, int64_t layer) {
  std::vector<const TensorData*> ts;
  for (const BlockWeights* b : model_blocks(w))
    if (b->layer == layer)
      for (const ExpertWeights& e : b->ffn.experts)
        for (const Linear* l : {&e.w1, &e.w2, &e.w3}) {
          ts.push_back(l->weight);
          if (l->scale) ts.push_back(l->scale);
        }
  return ts;
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Placement, ParsesEveryForm) {
  EXPECT_EQ(parse_offload_spec("").kind, OffloadSpec::Kind::None);
  EXPECT_EQ(parse_offload_spec("none").kind, OffloadSpec::Kind::None);
  EXPECT_EQ(parse_offload_spec("auto").kind, OffloadSpec::Kind::Auto);
  const OffloadSpec n = parse_offload_spec("3");
  EXPECT_EQ(n.kind, OffloadSpec::Kind::Count);
  EXPECT_EQ(n.count, 3);
  const OffloadSpec l = parse_offload_spec("7,2,40");
  EXPECT_EQ(l.kind, OffloadSpec::Kind::Layers);
  EXPECT_EQ(l.layers, (std::vector<int64_t>{2, 7, 40}));
  for (const char* bad : {"x", "1,,2", "-1", "1,", "2.5", "auto,1"})
    expect_error([&] { parse_offload_spec(bad); }, "--offload-experts");
  expect_error([] { parse_offload_spec("4,4"); }, "twice");
}

TEST(Placement, PlanArithmeticOnGeneratedModels) {
  for (const std::string& preset : tiny_preset_names()) {
    GeneratedModel gm(tiny_preset_config(preset), 3);
    const ModelConfig& cfg = gm.config();
    const ModelWeights& w = gm.weights();
    const int64_t total = bytes_of(weight_tensors(w)), last_main = cfg.num_hidden_layers - 1;
    // Without drafting, the MTP block leaves first, then the main layers from the last one down.
    const bool mtp = cfg.num_nextn_predict_layers > 0;
    const int64_t first_out = mtp ? cfg.num_hidden_layers : last_main, second_out = mtp ? last_main : last_main - 1;
    const int64_t first_bytes = bytes_of(experts_of(w, first_out));
    ASSERT_GT(first_bytes, 0) << preset;

    const ExpertOffloadPlan none = plan_expert_offload(cfg, w, {}, 0);
    EXPECT_TRUE(none.layers.empty());
    EXPECT_EQ(none.weight_bytes, total);
    EXPECT_EQ(none.device_bytes, total);
    EXPECT_EQ(none.host_bytes, 0);

    // One routed expert (all experts of a layer have one size) and the smallest cache: one token's.
    const int64_t E = cfg.n_routed_experts, expert = first_bytes / E, min_cache = expert * cfg.num_experts_per_tok;
    const int64_t embed = int64_t(w.embed->nbytes), embed_row = embed / cfg.vocab_size;
    ASSERT_NE(w.embed, w.head) << preset;

    // Auto: nothing when the weights fit; the embedding alone when one byte is missing; with it
    // the first block out when one byte more is missing, the first two when one byte more than
    // that block's experts is missing. The cache takes what the budget leaves.
    OffloadSpec autos;
    autos.kind = OffloadSpec::Kind::Auto;
    const ExpertOffloadPlan fits = plan_expert_offload(cfg, w, autos, total);
    EXPECT_TRUE(fits.host_tensors.empty()) << preset;
    EXPECT_FALSE(fits.embedding);
    const ExpertOffloadPlan table = plan_expert_offload(cfg, w, autos, total - 1);
    EXPECT_TRUE(table.layers.empty()) << preset;
    EXPECT_TRUE(table.embedding);
    EXPECT_EQ(table.host_tensors, std::vector<const TensorData*>{w.embed});
    EXPECT_EQ(table.cache_bytes, 0);
    EXPECT_DOUBLE_EQ(table.bus_bytes_per_token, double(embed_row));
    const ExpertOffloadPlan one = plan_expert_offload(cfg, w, autos, total - embed - 1);
    EXPECT_EQ(one.layers, std::vector<int64_t>{first_out}) << preset;
    EXPECT_EQ(one.host_bytes, first_bytes + embed);
    EXPECT_EQ(one.device_bytes, total - first_bytes - embed);
    EXPECT_EQ(one.expert_bytes, expert);
    EXPECT_EQ(one.cache_bytes, first_bytes - 1);  // the budget less the device-resident weights
    EXPECT_LE(one.device_bytes + one.cache_bytes, total - embed - 1);
    const std::set<const TensorData*> host(one.host_tensors.begin(), one.host_tensors.end());
    auto expect_host = experts_of(w, first_out);
    expect_host.push_back(w.embed);
    EXPECT_EQ(host, std::set<const TensorData*>(expect_host.begin(), expect_host.end()));
    // Bus bytes per decoded token: top-k experts of that layer (none when it is the MTP block,
    // which does not run without drafting) and an embedding row.
    const double topk_bytes = double(first_bytes) / double(E) * double(cfg.num_experts_per_tok);
    EXPECT_DOUBLE_EQ(one.bus_bytes_per_token, (mtp ? 0.0 : topk_bytes) + double(embed_row));
    OffloadSpec drafting = autos;
    drafting.drafting = true;  // the last main layer leaves first, the MTP block last
    const ExpertOffloadPlan drafted = plan_expert_offload(cfg, w, drafting, total - embed - 1);
    EXPECT_EQ(drafted.layers, std::vector<int64_t>{last_main}) << preset;
    EXPECT_DOUBLE_EQ(drafted.bus_bytes_per_token,
                     double(bytes_of(experts_of(w, last_main))) / double(E) * double(cfg.num_experts_per_tok) +
                         double(embed_row));
    if (second_out >= 0) {
      const ExpertOffloadPlan two = plan_expert_offload(cfg, w, autos, total - embed - first_bytes - 1);
      EXPECT_EQ(two.layers, (std::vector<int64_t>{second_out, first_out})) << preset;
      EXPECT_EQ(two.host_bytes, first_bytes + bytes_of(experts_of(w, second_out)) + embed);
      // Exactly the smallest cache left beside the first block out alone is not enough: two layers.
      const ExpertOffloadPlan tight = plan_expert_offload(cfg, w, autos, total - embed - first_bytes + min_cache - 1);
      EXPECT_EQ(tight.layers.size(), 2u) << preset;
      EXPECT_EQ(plan_expert_offload(cfg, w, autos, total - embed - first_bytes + min_cache).layers,
                std::vector<int64_t>{first_out})
          << preset;
    }
    // A budget below the weights without any routed expert cannot be met, and says so.
    expect_error([&] { plan_expert_offload(cfg, w, autos, 1); }, "--offload-experts auto");

    // Count and explicit layers ignore the budget; the MTP block is layer num_hidden_layers.
    OffloadSpec count;
    count.kind = OffloadSpec::Kind::Count;
    count.count = 1;
    const ExpertOffloadPlan counted = plan_expert_offload(cfg, w, count, -1);
    EXPECT_EQ(counted.layers, std::vector<int64_t>{first_out});
    // Drafting reads the MTP block every step: the last main layer goes first instead.
    count.drafting = true;
    EXPECT_EQ(plan_expert_offload(cfg, w, count, -1).layers, std::vector<int64_t>{last_main});
    EXPECT_TRUE(counted.embedding);
    EXPECT_EQ(counted.cache_bytes, min_cache);  // no budget known: the smallest cache
    count.count = cfg.num_hidden_layers + cfg.num_nextn_predict_layers + 1;
    expect_error([&] { plan_expert_offload(cfg, w, count, -1); }, "layers asked");
    OffloadSpec layers;
    layers.kind = OffloadSpec::Kind::Layers;
    layers.layers = {0};
    if (cfg.num_nextn_predict_layers) layers.layers.push_back(cfg.num_hidden_layers);
    const ExpertOffloadPlan explicit_plan = plan_expert_offload(cfg, w, layers, -1);
    EXPECT_EQ(explicit_plan.layers, layers.layers);
    int64_t expect_bytes = 0;
    for (int64_t l : layers.layers) expect_bytes += bytes_of(experts_of(w, l));
    EXPECT_EQ(explicit_plan.host_bytes, expect_bytes + embed);
    EXPECT_EQ(explicit_plan.device_bytes + explicit_plan.host_bytes, total);
    layers.layers = {cfg.total_layers() + 5};
    expect_error([&] { plan_expert_offload(cfg, w, layers, -1); }, "has no routed experts");
    EXPECT_NE(describe(explicit_plan).find("pinned host memory"), std::string::npos);
  }
}
