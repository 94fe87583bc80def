#include "backend/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace dsv4 {

void write_sample_params(const SampleFilter& f, float* row) {
  row[0] = f.temperature;
  row[1] = float(f.top_k);  // exact: vocabularies are far below 2^24
  row[2] = f.top_p;
  row[3] = f.min_p;
}

SampleFilter read_sample_params(const float* row) {
  SampleFilter f;
  f.temperature = row[0];
  f.top_k = int32_t(row[1]);
  f.top_p = row[2];
  f.min_p = row[3];
  return f;
}

int32_t greedy_token(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

std::vector<float> filtered_probs(std::span<const float> z, const SampleFilter& f) {
  const size_t V = z.size();
  const double temp = f.temperature > 0 ? double(f.temperature) : 1.0;
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
  if (f.top_k > 0) keep = std::min(keep, size_t(f.top_k));
  if (f.top_p < 1.0f) {
    double mass = 0;
    for (size_t i = 0; i < keep; ++i) mass += prob[order[i]];
    double cum = 0;
    for (size_t i = 0; i < keep; ++i) {
      cum += prob[order[i]] / mass;
      if (cum >= double(f.top_p)) {
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
    if (f.min_p > 0 && v < double(f.min_p) * pmax) break;  // sorted: the rest are smaller still
    kept += v;
  }
  for (size_t i = 0; i < keep; ++i) {
    const double v = prob[order[i]];
    if (f.min_p > 0 && v < double(f.min_p) * pmax) break;
    out[size_t(order[i])] = float(v / kept);
  }
  return out;
}

int32_t draw_token(std::span<const float> probs, float u) {
  double cum = 0;
  int32_t last = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0) continue;
    last = int32_t(i);
    cum += probs[i];
    if (double(u) < cum) return int32_t(i);
  }
  return last;  // rounding: u beyond the summed mass
}

int32_t sample_row(std::span<const float> logits, const SampleFilter& f, float u) {
  if (f.temperature <= 0) return greedy_token(logits);
  return draw_token(filtered_probs(logits, f), u);
}

}  // namespace dsv4
