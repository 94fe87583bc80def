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
    const int64_t total = bytes_of(weight_tensors(w)), last = cfg.num_hidden_layers - 1;
    const int64_t last_bytes = bytes_of(experts_of(w, last));
    ASSERT_GT(last_bytes, 0) << preset;

    const ExpertOffloadPlan none = plan_expert_offload(cfg, w, {}, 0);
    EXPECT_TRUE(none.layers.empty());
    EXPECT_EQ(none.weight_bytes, total);
    EXPECT_EQ(none.device_bytes, total);
    EXPECT_EQ(none.host_bytes, 0);

    // Auto: nothing when the weights fit, the last layer when one byte is missing, the last two
    // when one byte more than the last layer's experts is missing.
    OffloadSpec autos;
    autos.kind = OffloadSpec::Kind::Auto;
    EXPECT_TRUE(plan_expert_offload(cfg, w, autos, total).layers.empty()) << preset;
    const ExpertOffloadPlan one = plan_expert_offload(cfg, w, autos, total - 1);
    EXPECT_EQ(one.layers, std::vector<int64_t>{last}) << preset;
    EXPECT_EQ(one.host_bytes, last_bytes);
    EXPECT_EQ(one.device_bytes, total - last_bytes);
    EXPECT_LE(one.device_bytes, total - 1);
    const std::set<const TensorData*> host(one.host_tensors.begin(), one.host_tensors.end());
    const auto expect_host = experts_of(w, last);
    EXPECT_EQ(host, std::set<const TensorData*>(expect_host.begin(), expect_host.end()));
    // Bus bytes per decoded token: top-k experts of that layer.
    const int64_t E = cfg.n_routed_experts;
    EXPECT_DOUBLE_EQ(one.bus_bytes_per_token, double(last_bytes) / double(E) * double(cfg.num_experts_per_tok));
    if (cfg.num_hidden_layers >= 2) {
      const ExpertOffloadPlan two = plan_expert_offload(cfg, w, autos, total - last_bytes - 1);
      EXPECT_EQ(two.layers, (std::vector<int64_t>{last - 1, last})) << preset;
      EXPECT_EQ(two.host_bytes, last_bytes + bytes_of(experts_of(w, last - 1)));
    }
    // A budget below the weights without any routed expert cannot be met, and says so.
    expect_error([&] { plan_expert_offload(cfg, w, autos, 1); }, "--offload-experts auto");

    // Count and explicit layers ignore the budget; the MTP block is layer num_hidden_layers.
    OffloadSpec count;
    count.kind = OffloadSpec::Kind::Count;
    count.count = 1;
    EXPECT_EQ(plan_expert_offload(cfg, w, count, -1).layers, std::vector<int64_t>{last});
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
    EXPECT_EQ(explicit_plan.host_bytes, expect_bytes);
    EXPECT_EQ(explicit_plan.device_bytes + explicit_plan.host_bytes, total);
    layers.layers = {cfg.total_layers() + 5};
    expect_error([&] { plan_expert_offload(cfg, w, layers, -1); }, "has no routed experts");
    EXPECT_NE(describe(explicit_plan).find("pinned host memory"), std::string::npos);
  }
}
