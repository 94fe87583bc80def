#pragma once
// Host-side sampling: one logits row in, one token out. Every sample of every request owns a
// SamplerState (its RNG and token counts), so results do not depend on batch mates. Without
// penalties this is Backend::sample (backend/sampling.h) fed with draw_uniform().
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "backend/sampling.h"
#include "engine/engine.h"
#include "util/random.h"

namespace dsv4 {

struct SamplerState {
  explicit SamplerState(uint64_t seed) : rng(seed) {}
  Rng rng;
  std::unordered_map<int32_t, int32_t> generated;  // token -> count (presence/frequency penalties)
  std::vector<uint8_t> seen;                        // prompt or generated (repetition penalty), by id
  void add_prompt(std::span<const int32_t> prompt, int64_t vocab);
  void add_generated(int32_t token, int64_t vocab);
};

// The per-request seed of sample `index`: from params.seed when given, else from `fallback`.
uint64_t sample_seed(const SamplingParams& p, int32_t index, uint64_t fallback);

// The filters of p as the sample op takes them.
SampleFilter sample_filter(const SamplingParams& p);
// Whether p needs the logits row on the host: penalties or logprobs (Backend::sample has neither).
bool needs_host_sampling(const SamplingParams& p);
// The uniform sample_token draws for the next token from s's RNG (one draw per sampled token;
// greedy draws none and gets 0).
float draw_uniform(const SamplingParams& p, SamplerState& s);

// Penalised logits (repetition, then frequency and presence), as a new row.
std::vector<float> apply_penalties(std::span<const float> logits, const SamplingParams& p, const SamplerState& s);

// The distribution sampling draws from for non-greedy params: penalties, temperature, softmax,
// then top-k, top-p (smallest set of most likely tokens whose mass reaches top_p) and min-p
// (drop tokens below min_p times the largest probability), renormalised. Zero = filtered out.
// (filtered_probs of the penalised logits.)
std::vector<float> sampling_probs(std::span<const float> logits, const SamplingParams& p, const SamplerState& s);

// Draws the next token (greedy when temperature == 0: the lowest id among the maxima of the
// penalised logits) and advances the state's RNG by draw_uniform().
int32_t sample_token(std::span<const float> logits, const SamplingParams& p, SamplerState& s);

// log-softmax of the raw logits: the chosen token's logprob and the top `k` alternatives.
TokenLogprob token_logprobs(std::span<const float> logits, int32_t token, int32_t k);

}  // namespace dsv4
