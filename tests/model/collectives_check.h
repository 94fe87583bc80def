#pragma once
// The communicator tests' shared part (thread group on the CPU: tests/model/test_parallel.cpp;
// NCCL on GPUs: tests/cuda/test_nccl.cpp): one rank's collectives on its input, and the check of
// every rank's results against a double-precision reference of all inputs.
#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"

namespace dsv4::test {

struct CollectiveResults {
  std::vector<float> reduced, gathered, scattered;
};

// x: this rank's input [n * len]. Reduce-scatter (this rank's len slice of the sum), all-gather of
// the first len values, then all-reduce of the whole input, each downloaded.
inline CollectiveResults run_collectives(Backend& be, Communicator& comm, const std::vector<float>& x, int n,
                                         int64_t len) {
  Tensor t = be.alloc({n * len}), g = be.alloc({n, len}), s = be.alloc({len});
  be.upload(t, x.data());
  comm.reduce_scatter_sum(t, s);
  comm.all_gather(t.rows_view(0, len), g);
  comm.all_reduce_sum(t);
  CollectiveResults out;
  for (auto [v, src] : {std::pair{&out.reduced, t}, {&out.gathered, g}, {&out.scattered, s}}) {
    v->resize(size_t(src.numel()));
    be.download(src, v->data());
  }
  return out;
}

// Sums within tol of the double reference, identical all-reduce results on every rank, exact gathers.
inline void expect_collectives_match(const std::vector<std::vector<float>>& in, const std::vector<CollectiveResults>& out,
                                     int64_t len, double tol) {
  const int n = int(in.size());
  std::vector<double> sum(size_t(n * len), 0.0);
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < n * len; ++i) sum[size_t(i)] += in[size_t(r)][size_t(i)];
  for (int r = 0; r < n; ++r) {
    const CollectiveResults& o = out[size_t(r)];
    EXPECT_EQ(o.reduced, out[0].reduced) << n << " ranks: all-reduce results differ between ranks";
    for (int64_t i = 0; i < n * len; ++i) ASSERT_NEAR(o.reduced[size_t(i)], sum[size_t(i)], tol) << n << " ranks, " << i;
    for (int64_t i = 0; i < len; ++i) {
      ASSERT_NEAR(o.scattered[size_t(i)], sum[size_t(r * len + i)], tol) << n << " ranks, rank " << r << ", " << i;
      for (int q = 0; q < n; ++q)
        ASSERT_EQ(o.gathered[size_t(q * len + i)], in[size_t(q)][size_t(i)]) << n << " ranks, from " << q << ", " << i;
    }
  }
}

}  // namespace dsv4::test
