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

// Speculative decoding (docs/ENGINE.md). A draft token is drawn from the MTP logits through the
// request's filters (temperature, top-k, top-p, min-p; no penalties): greedy requests take its
// argmax (`probs` left empty), others draw from `probs` = that distribution with one uniform of
// s's RNG. Whatever q is, the rejection rule below makes the output distribution the target's.
int32_t draft_token(std::span<const float> mtp_logits, const SamplingParams& p, SamplerState& s,
                    std::vector<float>& probs);

// Verifies draft `draft` (drawn from `draft_probs`, empty for greedy) against the target logits
// of its position, with the penalties of s. Greedy: accepted iff it is the target's greedy token.
// Otherwise the standard rejection rule on the filtered target distribution p and q: accept with
// probability min(1, p(d) / q(d)) (one uniform), else draw from normalised max(0, p - q) (a
// second uniform). `token` is the draft when accepted, else the replacement.
struct DraftVerdict {
  bool accepted = false;
  int32_t token = -1;
};
DraftVerdict verify_draft(std::span<const float> logits, int32_t draft, std::span<const float> draft_probs,
                          const SamplingParams& p, SamplerState& s);

// log-softmax of the raw logits: the chosen token's logprob and the top `k` alternatives.
TokenLogprob token_logprobs(std::span<const float> logits, int32_t token, int32_t k);

}  // namespace dsv4
