#pragma once
// Drawing one token from one logits row: the definition shared by the host sampler
// (engine/sampler.cpp, after its penalties) and Backend::sample. The CPU backend's op calls these
// functions; the CUDA kernel (backend/cuda/sample.cu) computes the same without sorting.
#include <cstdint>
#include <span>
#include <vector>

namespace dsv4 {

// One row's filters; Backend::sample takes them as an F32 row of kSampleParams values in this order.
struct SampleFilter {
  float temperature = 1.0f;  // <= 0: greedy
  int32_t top_k = 0;         // <= 0 or >= vocab: off
  float top_p = 1.0f;        // >= 1: off
  float min_p = 0.0f;        // <= 0: off
};
constexpr int64_t kSampleParams = 4;
void write_sample_params(const SampleFilter& f, float* row);
SampleFilter read_sample_params(const float* row);

// The lowest id among the maxima.
int32_t greedy_token(std::span<const float> logits);

// The distribution drawn from (temperature <= 0 counts as 1 here): softmax(logits / T) in double,
// then over tokens ordered by (probability desc, id asc): top-k, top-p (the smallest prefix
// whose mass within the top-k set reaches top_p), min-p (drop tokens below min_p times the
// largest probability); renormalised, as float. Zero = filtered out.
std::vector<float> filtered_probs(std::span<const float> logits, const SampleFilter& f);

// Inverse CDF in id order: the first token with probs > 0 whose running sum (double) exceeds u;
// if rounding leaves u beyond the total, the last such token.
int32_t draw_token(std::span<const float> probs, float u);

// greedy_token when temperature <= 0 (u unused), else draw_token(filtered_probs(logits), u).
int32_t sample_row(std::span<const float> logits, const SampleFilter& f, float u);

}  // namespace dsv4
