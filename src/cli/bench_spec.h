#pragma once
// dsv4 bench model --spec-accept (docs/PERF.md, "Speculative decoding"): decode throughput with
// and without speculative decoding on a random model, whose MTP block really drafts but whose
// drafts are accepted at an imposed rate (random weights predict nothing).
#include <cstdint>
#include <vector>

#include "engine/state_manager.h"
#include "model/forward.h"

namespace dsv4::cli {

struct SpecBenchOptions {
  std::vector<int64_t> ctxs, seq_counts;
  int steps = 5;
  int32_t drafts = 2;          // --speculative-tokens k
  double accept_length = 2.35;  // --spec-accept L: imposed mean tokens per verify pass
  KvFormat kv = KvFormat::F32;
};

// The probability a with which each draft is accepted (until the first rejection, as verification
// stops there) so that the mean tokens per verify pass 1 + a + a^2 + ... + a^k equals L.
double draft_accept_probability(double accept_length, int32_t drafts);

// Prints one table row per (context, sequence count).
void run_spec_bench(Model& model, const SpecBenchOptions& o);

}  // namespace dsv4::cli
