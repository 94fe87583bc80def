#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "util/error.h"

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

int32_t draft_token(std::span<const float> mtp_logits, const SamplingParams& p, SamplerState& s,
                    std::vector<float>& probs) {
  probs.clear();
  if (p.temperature <= 0) return greedy_token(mtp_logits);
  probs = filtered_probs(mtp_logits, sample_filter(p));
  return draw_token(probs, s.rng.uniform_f32());
}

DraftVerdict verify_draft(std::span<const float> logits, int32_t draft, std::span<const float> draft_probs,
                          const SamplingParams& p, SamplerState& s) {
  if (p.temperature <= 0) {
    const int32_t target = sample_token(logits, p, s);
    return {target == draft, target};
  }
  const std::vector<float> target = sampling_probs(logits, p, s);
  DSV4_CHECK(draft_probs.size() == target.size() && draft >= 0 && size_t(draft) < target.size());
  const double pd = target[size_t(draft)], qd = draft_probs[size_t(draft)];
  if (double(s.rng.uniform_f32()) * qd < pd) return {true, draft};
  std::vector<float> residual(target.size());
  double mass = 0;
  for (size_t i = 0; i < target.size(); ++i) mass += residual[i] = std::max(0.f, target[i] - draft_probs[i]);
  const float u = s.rng.uniform_f32();
  // p == q up to rounding: the rejection had probability ~0; fall back to the target itself.
  if (!(mass > 0)) return {false, draw_token(target, u)};
  for (float& v : residual) v = float(double(v) / mass);
  return {false, draw_token(residual, u)};
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
