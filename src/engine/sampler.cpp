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

std::vector<float> sampling_probs(std::span<const float> logits, const SamplingParams& p, const SamplerState& s) {
  std::vector<float> z = apply_penalties(logits, p, s);
  const size_t V = z.size();
  const double temp = p.temperature > 0 ? double(p.temperature) : 1.0;
  double mx = -std::numeric_limits<double>::infinity();
  for (float v : z) mx = std::max(mx, double(v) / temp);
  std::vector<double> prob(V);
  double sum = 0;
  for (size_t i = 0; i < V; ++i) sum += prob[i] = std::exp(double(z[i]) / temp - mx);
  for (auto& v : prob) v /= sum;
  // Most likely first; ties: lower id first.
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return prob[a] > prob[b]; });
  size_t keep = V;
  if (p.top_k > 0) keep = std::min(keep, size_t(p.top_k));
  if (p.top_p < 1.0f) {
    double mass = 0;
    for (size_t i = 0; i < keep; ++i) mass += prob[order[i]];
    double cum = 0;
    for (size_t i = 0; i < keep; ++i) {
      cum += prob[order[i]] / mass;
      if (cum >= double(p.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  std::vector<float> out(V, 0.f);
  const double pmax = prob[order[0]];
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) {
    const double v = prob[order[i]];
    if (p.min_p > 0 && v < double(p.min_p) * pmax) break;  // sorted: the rest are smaller still
    kept += v;
  }
  for (size_t i = 0; i < keep; ++i) {
    const double v = prob[order[i]];
    if (p.min_p > 0 && v < double(p.min_p) * pmax) break;
    out[size_t(order[i])] = float(v / kept);
  }
  return out;
}

int32_t sample_token(std::span<const float> logits, const SamplingParams& p, SamplerState& s) {
  if (p.temperature <= 0) {
    std::vector<float> z = apply_penalties(logits, p, s);
    return int32_t(std::max_element(z.begin(), z.end()) - z.begin());
  }
  std::vector<float> probs = sampling_probs(logits, p, s);
  const double u = s.rng.uniform();
  double cum = 0;
  int32_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0) continue;
    last = int32_t(i);
    cum += probs[i];
    if (u < cum) return int32_t(i);
  }
  return last;  // rounding: u beyond the summed mass
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
