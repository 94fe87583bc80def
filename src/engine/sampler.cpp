#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace dsv4 {

void SamplerState::add_prompt(std::span<const int32_t> prompt, int64_t vocab) {
  if (int64_t(seen.size()) < vocab) seen.resize(size_t(vocab), 0);
  for (int32_t t : prompt)
    if (t >= 0 && t < vocab) seen[size_t(t)] = 1;
}

void SamplerState::add_generated(int32_t token, int64_t vocab) {
  if (int64_t(seen.size()) < vocab) seen.resize(size_t(vocab), 0);
  if (token >= 0 && token < vocab) seen[size_t(token)] = 1;
  ++generated[token];
}

uint64_t sample_seed(const SamplingParams& p, int32_t index, uint64_t fallback) {
  const uint64_t base = p.seed ? *p.seed : fallback;
  Rng mix(base ^ (0x9e3779b97f4a7c15ull * uint64_t(index + 1)));
  return mix.next_u64();
}

std::vector<float> apply_penalties(std::span<const float> logits, const SamplingParams& p, const SamplerState& s) {
  std::vector<float> out(logits.begin(), logits.end());
  if (p.repetition_penalty != 1.0f)
    for (size_t i = 0; i < s.seen.size() && i < out.size(); ++i)
      if (s.seen[i]) out[i] = out[i] > 0 ? out[i] / p.repetition_penalty : out[i] * p.repetition_penalty;
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f)
    for (const auto& [tok, count] : s.generated)
      if (tok >= 0 && size_t(tok) < out.size())
        out[size_t(tok)] -= p.frequency_penalty * float(count) + p.presence_penalty * (count > 0 ? 1.f : 0.f);
  return out;
}

SampleFilter sample_filter(const SamplingParams& p) { return {p.temperature, p.top_k, p.top_p, p.min_p}; }

bool needs_host_sampling(const SamplingParams& p) {
  return p.logprobs >= 0 || p.prompt_logprobs >= 0 || p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
}

float draw_uniform(const SamplingParams& p, SamplerState& s) { return p.temperature > 0 ? s.rng.uniform_f32() : 0.f; }

std::vector<float> sampling_probs(std::span<const float> logits, const SamplingParams& p, const SamplerState& s) {
  return filtered_probs(apply_penalties(logits, p, s), sample_filter(p));
}

int32_t sample_token(std::span<const float> logits, const SamplingParams& p, SamplerState& s) {
  const std::vector<float> z = apply_penalties(logits, p, s);
  return sample_row(z, sample_filter(p), draw_uniform(p, s));
}

TokenLogprob token_logprobs(std::span<const float> logits, int32_t token, int32_t k) {
  double mx = -std::numeric_limits<double>::infinity();
  for (float v : logits) mx = std::max(mx, double(v));
  double sum = 0;
  for (float v : logits) sum += std::exp(double(v) - mx);
  const double lse = mx + std::log(sum);
  TokenLogprob r{token, float(double(logits[size_t(token)]) - lse), {}};
  if (k > 0) {
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    const size_t kk = std::min(size_t(k), order.size());
    std::partial_sort(order.begin(), order.begin() + kk, order.end(), [&](int32_t a, int32_t b) {
      return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
    });
    for (size_t i = 0; i < kk; ++i) r.top.emplace_back(order[i], float(double(logits[size_t(order[i])]) - lse));
  }
  return r;
}

}  // namespace dsv4
