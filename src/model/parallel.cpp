#include "model/parallel.h"

#include <cstring>

#include "tensor/quant.h"
#include "util/error.h"

namespace dsv4 {

void check_parallel(const ModelConfig& c, const ParallelConfig& par) {
  if (par.tp < 1) fail("--tp: must be at least 1, got {}", par.tp);
  if (par.ep < 1) fail("--ep: must be at least 1, got {}", par.ep);
  const int n = par.world();
  if (par.tp != 1 && par.tp != n)
    fail("--tp {} with --ep {}: tp must be 1 or equal ep (one group of max(tp, ep) ranks)", par.tp, par.ep);
  if (par.ep != 1 && par.ep != n)
    fail("--ep {} with --tp {}: ep must be 1 or equal tp (one group of max(tp, ep) ranks)", par.ep, par.tp);
  if (c.num_attention_heads % par.tp || c.o_groups % par.tp)
    fail("--tp {}: must divide the {} attention heads and the {} output groups", par.tp, c.num_attention_heads,
         c.o_groups);
  if (c.n_routed_experts % par.ep) fail("--ep {}: must divide the {} routed experts", par.ep, c.n_routed_experts);
  if (c.moe_intermediate_size % n)
    fail("{} {}: must divide the experts' intermediate size {}", par.tp > 1 ? "--tp" : "--ep", n,
         c.moe_intermediate_size);
}

namespace {

int64_t row_bytes(const TensorData& t) { return t.shape[0] ? int64_t(t.nbytes) / t.shape[0] : 0; }

// The scale blocks (of `block` rows or columns) that hold weight rows or columns [a, b): a slice
// has its own scale tensor only when it starts a block or stays inside one.
std::pair<int64_t, int64_t> scale_range(int64_t a, int64_t b, int64_t block, const TensorData& w, const char* flag) {
  if (a % block && a / block != (b - 1) / block)
    fail("{}: the slice [{}, {}) of '{}' starts inside a {}-wide scale block and leaves it; choose a size that "
         "splits it on block boundaries",
         flag, a, b, w.name, block);
  return {a / block, (b + block - 1) / block};
}

}  // namespace

TensorData& WeightShard::view_rows(const TensorData& t, int64_t r0, int64_t r1) {
  DSV4_CHECK(!t.shape.empty() && 0 <= r0 && r0 < r1 && r1 <= t.shape[0]);
  TensorData v = t;
  const int64_t rb = row_bytes(t);
  v.shape[0] = r1 - r0;
  v.data = t.data ? t.data + r0 * rb : nullptr;
  v.nbytes = size_t((r1 - r0) * rb);
  return tensors_.emplace_back(std::move(v));
}

TensorData& WeightShard::copy_cols(const TensorData& t, int64_t c0, int64_t c1) {
  DSV4_CHECK(t.shape.size() == 2 && 0 <= c0 && c0 < c1 && c1 <= t.shape[1]);
  const int64_t rows = t.shape[0], elem = row_bytes(t) / t.shape[1], width = (c1 - c0) * elem;
  TensorData v = t;
  v.shape[1] = c1 - c0;
  v.nbytes = size_t(rows * width);
  v.data = nullptr;
  if (materialize_ && t.data) {
    std::vector<uint8_t>& buf = owned_.emplace_back(v.nbytes);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(buf.data() + r * width, t.data + r * row_bytes(t) + c0 * elem, size_t(width));
    v.data = buf.data();
  }
  return tensors_.emplace_back(std::move(v));
}

Linear WeightShard::slice_rows(const Linear& l, int64_t r0, int64_t r1, const char* flag) {
  Linear s = l;
  s.out = r1 - r0;
  s.weight = &view_rows(*l.weight, r0, r1);
  if (l.format == WeightFormat::FP8) {
    const auto [b0, b1] = scale_range(r0, r1, kFp8Block, *l.weight, flag);
    s.scale = &view_rows(*l.scale, b0, b1);
  } else if (l.format == WeightFormat::FP4) {
    s.scale = &view_rows(*l.scale, r0, r1);
  }
  return s;
}

Linear WeightShard::slice_cols(const Linear& l, int64_t c0, int64_t c1, const char* flag) {
  Linear s = l;
  s.in = c1 - c0;
  switch (l.format) {
    case WeightFormat::FP8: {
      s.weight = &copy_cols(*l.weight, c0, c1);
      const auto [b0, b1] = scale_range(c0, c1, kFp8Block, *l.weight, flag);
      s.scale = &copy_cols(*l.scale, b0, b1);
      break;
    }
    case WeightFormat::FP4:  // two values per byte, one scale per group of 32
      if (c0 % kFp4Group || c1 % kFp4Group)
        fail("{}: the slice [{}, {}) of '{}' splits an FP4 scale group of {}", flag, c0, c1, l.weight->name, kFp4Group);
      s.weight = &copy_cols(*l.weight, c0 / 2, c1 / 2);
      s.scale = &copy_cols(*l.scale, c0 / kFp4Group, c1 / kFp4Group);
      break;
    case WeightFormat::BF16:
      s.weight = &copy_cols(*l.weight, c0, c1);
      break;
  }
  return s;
}

void WeightShard::shard_block(BlockWeights& b) {
  const int64_t r = rank_;
  if (par_.tp > 1) {
    AttentionWeights& a = b.attn;
    const int64_t heads = cfg_.num_attention_heads / par_.tp, groups = cfg_.o_groups / par_.tp;
    const int64_t q_rows = heads * cfg_.head_dim, o_rows = groups * cfg_.o_lora_rank;
    a.wq_b = slice_rows(a.wq_b, r * q_rows, (r + 1) * q_rows, "--tp");
    a.attn_sink = &view_rows(*a.attn_sink, r * heads, (r + 1) * heads);
    a.wo_a = slice_rows(a.wo_a, r * o_rows, (r + 1) * o_rows, "--tp");
    a.wo_b = slice_cols(a.wo_b, r * o_rows, (r + 1) * o_rows, "--tp");
  }
  if (par_.world() == 1) return;
  const int64_t f = cfg_.moe_intermediate_size / par_.world();
  auto split_intermediate = [&](ExpertWeights& e, const char* flag) {
    e.w1 = slice_rows(e.w1, r * f, (r + 1) * f, flag);
    e.w3 = slice_rows(e.w3, r * f, (r + 1) * f, flag);
    e.w2 = slice_cols(e.w2, r * f, (r + 1) * f, flag);
  };
  MoEWeights& m = b.ffn;
  if (par_.ep > 1) {
    const int64_t n = cfg_.n_routed_experts / par_.ep;
    m.experts = std::vector<ExpertWeights>(m.experts.begin() + r * n, m.experts.begin() + (r + 1) * n);
    m.first_expert = r * n;
  } else {
    for (ExpertWeights& e : m.experts) split_intermediate(e, "--tp");
  }
  if (m.has_shared) split_intermediate(m.shared, par_.tp > 1 ? "--tp" : "--ep");
}

WeightShard::WeightShard(const ModelConfig& cfg, const ModelWeights& full, const ParallelConfig& par, int rank,
                         bool materialize)
    : cfg_(cfg), par_(par), rank_(rank), materialize_(materialize), w_(full) {
  check_parallel(cfg, par);
  if (rank < 0 || rank >= par.world()) fail("rank {} of a {}-rank group", rank, par.world());
  for (BlockWeights& b : w_.layers) shard_block(b);
  for (MtpWeights& m : w_.mtp) shard_block(m.block);
}

int64_t WeightShard::bytes() const {
  int64_t n = 0;
  for (const TensorData* t : weight_tensors(w_)) n += int64_t(t->nbytes);
  return n;
}

RankThreads::RankThreads(int n) : errors_(size_t(n)) {
  if (n < 1) fail("rank threads: {} ranks", n);
  for (int r = 1; r < n; ++r) threads_.emplace_back([this, r] { work(r); });
}

RankThreads::~RankThreads() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (auto& t : threads_) t.join();
}

void RankThreads::work(int rank) {
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock lk(mu_);
    start_.wait(lk, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    const std::function<void(int)>& fn = *job_;
    lk.unlock();
    std::exception_ptr err;
    try {
      fn(rank);
    } catch (...) {
      err = std::current_exception();
    }
    lk.lock();
    errors_[size_t(rank)] = err;
    if (--pending_ == 0) finished_.notify_all();
  }
}

void RankThreads::run(const std::function<void(int)>& fn) {
  {
    std::lock_guard lk(mu_);
    job_ = &fn;
    pending_ = int(threads_.size());
    ++generation_;
  }
  start_.notify_all();
  try {
    fn(0);
    errors_[0] = nullptr;
  } catch (...) {
    errors_[0] = std::current_exception();
  }
  std::unique_lock lk(mu_);
  finished_.wait(lk, [&] { return pending_ == 0; });
  std::exception_ptr first;
  for (auto& e : errors_) {
    if (!first) first = e;
    e = nullptr;
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace dsv4
