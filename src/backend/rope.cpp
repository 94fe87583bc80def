#include <cmath>

#include "backend/backend.h"

namespace dsv4 {

// Frequencies in float32 as both references compute them. Compressed layers use
// compress_rope_theta with YaRN (when configured); sliding-only layers plain rope_theta.
RopeTable make_rope_table(const ModelConfig& cfg, bool compressed_layer) {
  const int64_t dim = cfg.rope_dim();
  const double base = compressed_layer ? cfg.compress_rope_theta : cfg.rope_theta;
  RopeTable t;
  t.inv_freq.resize(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) t.inv_freq[i] = 1.f / std::pow(float(base), float(2 * i) / float(dim));
  if (!compressed_layer || !cfg.yarn.enabled) return t;
  auto correction_dim = [&](double rotations) {
    return double(dim) * std::log(double(cfg.yarn.original_max_position_embeddings) / (rotations * 2 * M_PI)) /
           (2 * std::log(base));
  };
  double lo = std::max(std::floor(correction_dim(cfg.yarn.beta_fast)), 0.0);
  double hi = std::min(std::ceil(correction_dim(cfg.yarn.beta_slow)), double(dim - 1));
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < dim / 2; ++i) {
    float ramp = std::clamp(float((double(i) - lo) / (hi - lo)), 0.f, 1.f);  // 0: keep, 1: interpolate
    float keep = 1.f - ramp;
    float f = t.inv_freq[i];
    t.inv_freq[i] = f / float(cfg.yarn.factor) * (1.f - keep) + f * keep;
  }
  return t;
}

}  // namespace dsv4
