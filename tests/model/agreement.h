#pragma once
// Row-by-row agreement of two logit tensors (whole-model checks of the CPU and GPU tests).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dsv4::test {

// Logits [rows, V] of two runs, row by row: error relative to the row's max |ref| (NaN in got
// counts as infinite), the worst of them, and how many rows pick the same argmax.
struct Agreement {
  std::vector<float> row_rel;
  float worst_rel = 0;
  int64_t rows = 0, argmax_same = 0;
};

inline Agreement agree(const std::vector<float>& ref, const std::vector<float>& got, int64_t V) {
  Agreement a;
  a.rows = int64_t(ref.size()) / V;
  for (int64_t r = 0; r < a.rows; ++r) {
    float scale = 0, err = 0;
    int64_t am = 0, ag = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float x = ref[r * V + i], y = got[r * V + i];
      scale = std::max(scale, std::fabs(x));
      err = std::max(err, std::isnan(y) ? INFINITY : std::fabs(x - y));
      if (x > ref[r * V + am]) am = i;
      if (y > got[r * V + ag]) ag = i;
    }
    a.row_rel.push_back(err / std::max(scale, 1e-30f));
    a.worst_rel = std::max(a.worst_rel, a.row_rel.back());
    a.argmax_same += am == ag;
  }
  return a;
}

}  // namespace dsv4::test
