#include "backend/communicator.h"

#include <algorithm>
#include <barrier>
#include <cstring>

#include "util/error.h"

namespace dsv4 {

namespace {

// What the ranks of one thread group share: a barrier and each rank's published buffer.
struct ThreadGroup {
  explicit ThreadGroup(int n) : size(n), barrier(n), buffers(size_t(n)) {}
  int size;
  std::barrier<> barrier;
  std::vector<const float*> buffers;
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadGroup> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size; }

  void all_reduce_sum(const Tensor& t) override {
    const int64_t n = t.numel();
    std::vector<float> sum(size_t(n), 0.f);
    exchange(t.f32(), [&] { add_blocks(0, n, sum.data()); });
    std::memcpy(t.f32(), sum.data(), size_t(n) * 4);
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    const int64_t n = in.numel();
    DSV4_CHECK(out.numel() == n * g_->size);
    exchange(in.f32(), [&] {
      for (int r = 0; r < g_->size; ++r) std::memcpy(out.f32() + r * n, g_->buffers[size_t(r)], size_t(n) * 4);
    });
  }
  void reduce_scatter_sum(const Tensor& in, const Tensor& out) override {
    const int64_t n = out.numel();
    DSV4_CHECK(in.numel() == n * g_->size);
    std::vector<float> sum(size_t(n), 0.f);
    exchange(in.f32(), [&] { add_blocks(rank_ * n, n, sum.data()); });
    std::memcpy(out.f32(), sum.data(), size_t(n) * 4);
  }

 private:
  // Publishes this rank's buffer, runs `read` once every rank has published, and returns once
  // every rank has finished reading (so buffers may be overwritten afterwards).
  template <class Read>
  void exchange(const float* mine, Read read) {
    g_->buffers[size_t(rank_)] = mine;
    g_->barrier.arrive_and_wait();
    read();
    g_->barrier.arrive_and_wait();
  }
  // sum[i] = sum over ranks r = 0, 1, ... (this order on every rank) of buffer_r[offset + i].
  void add_blocks(int64_t offset, int64_t n, float* sum) const {
    for (int r = 0; r < g_->size; ++r) {
      const float* b = g_->buffers[size_t(r)] + offset;
      for (int64_t i = 0; i < n; ++i) sum[i] += b[i];
    }
  }

  std::shared_ptr<ThreadGroup> g_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_thread_group(int size) {
  if (size < 1) fail("thread group: {} ranks (must be at least 1)", size);
  auto g = std::make_shared<ThreadGroup>(size);
  std::vector<std::unique_ptr<Communicator>> v;
  for (int r = 0; r < size; ++r) v.push_back(std::make_unique<ThreadCommunicator>(g, r));
  return v;
}

}  // namespace dsv4
