// The one-layer FP8-activation fixtures of the GPU test (fp8_fixtures.h) are stable: the CPU
// reference against itself, with every FP32 weight moved by one ulp, meets the bounds the GPU
// must meet. For contrast it prints the same comparison for the 6-layer `small` preset, where
// requantisation cascades through depth (docs/TESTING.md, "FP8 activations and depth").
#include <gtest/gtest.h>

#include "backend/backend.h"
#include "fp8_fixtures.h"

using namespace dsv4;
using namespace dsv4::test;

TEST(Fp8Fixtures, OneLayerReferenceAgreesWithItselfUpToFp32Rounding) {
  auto cpu = make_cpu_backend();
  Fp8Tally tally;
  for (const Fp8Case& c : fp8_one_layer_cases()) {
    GeneratedModel gm(c.config, 11);
    Model ref_model(gm.config(), gm.weights(), *cpu);
    ref_model.set_fp8_activations(true);
    const std::vector<float> ref = fp8_case_logits(ref_model);
    for (uint64_t seed : {1, 2}) {
      GeneratedModel nudged(c.config, 11);
      nudge_f32_weights(nudged, seed);
      Model m(nudged.config(), nudged.weights(), *cpu);
      m.set_fp8_activations(true);
      tally.add(c.name + "/nudge" + std::to_string(seed), ref, fp8_case_logits(m), gm.config().vocab_size);
    }
  }
  tally.expect_agreement("one-layer CPU reference vs nudged");

  GeneratedModel deep(tiny_preset_config("small"), 11);
  Model a(deep.config(), deep.weights(), *cpu);
  a.set_fp8_activations(true);
  const std::vector<float> deep_ref = fp8_case_logits(a);
  Fp8Tally contrast;
  for (uint64_t seed : {1, 2, 3, 4}) {
    GeneratedModel nudged(tiny_preset_config("small"), 11);
    nudge_f32_weights(nudged, seed);
    Model b(nudged.config(), nudged.weights(), *cpu);
    b.set_fp8_activations(true);
    contrast.add("small (6 layers)/nudge" + std::to_string(seed), deep_ref, fp8_case_logits(b), deep.config().vocab_size);
  }
}
