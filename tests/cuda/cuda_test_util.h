#pragma once
// Shared helpers of the GPU tests: host-side random weights in the checkpoint formats, tensors
// mirrored on the CPU reference and the CUDA backend, and tolerance checks that print the error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "tensor/numeric.h"
#include "tensor/quant.h"
#include "util/random.h"
#include "../model/agreement.h"

namespace dsv4::test {

// Skips (never passes) when no GPU is present; ctest reports it as not run.
#define DSV4_REQUIRE_GPU()                                               \
  do {                                                                   \
    if (!::dsv4::cuda_device_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// A CUDA backend that fills every new tensor with NaN / -1 (CudaOptions::poison), so an output a
// kernel leaves unwritten shows in the comparison.
inline std::unique_ptr<Backend> poisoned_cuda_backend(CudaOptions o = {}) {
  o.poison = true;
  return make_cuda_backend(0, o);
}

// n ids uniform in [0, below) (token ids, expert ids, rows).
inline std::vector<int32_t> rand_ints(int64_t n, int64_t below, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = int32_t(r.below(uint64_t(below)));
  return v;
}

// Fast deterministic normals: a pool of true normals indexed by a hash of the position.
inline void fill_normal(float* x, int64_t n, uint64_t seed, float sigma = 1.f) {
  static std::vector<float> pool;
  if (pool.empty()) {
    Rng r(12345);
    pool.resize(1 << 16);
    for (auto& v : pool) v = r.normal();
  }
  uint64_t h = seed * 0x9e3779b97f4a7c15ull + 1;
  for (int64_t i = 0; i < n; ++i) {
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h += uint64_t(i) * 0x94d049bb133111ebull;
    x[i] = sigma * pool[(h >> 40) & 0xffff];
  }
}
inline std::vector<float> normal(int64_t n, uint64_t seed, float sigma = 1.f) {
  std::vector<float> v(n);
  fill_normal(v.data(), n, seed, sigma);
  return v;
}

class WeightStore {
 public:
  const TensorData* add(const std::string& name, DType dt, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
    bufs_.push_back(std::move(bytes));
    TensorData t;
    t.name = name;
    t.dtype = dt;
    t.shape = std::move(shape);
    t.data = bufs_.back().data();
    t.nbytes = bufs_.back().size();
    views_.push_back(t);
    return &views_.back();
  }
  const TensorData* f32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    std::vector<uint8_t> b(v.size() * 4);
    std::memcpy(b.data(), v.data(), b.size());
    return add(name, DType::F32, std::move(shape), std::move(b));
  }
  const TensorData* bf16(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    std::vector<uint8_t> b(v.size() * 2);
    for (size_t i = 0; i < v.size(); ++i) {
      const uint16_t h = f32_to_bf16(v[i]);
      std::memcpy(b.data() + 2 * i, &h, 2);
    }
    return add(name, DType::BF16, std::move(shape), std::move(b));
  }
  // A linear [out, in] in the given format; block factors 2^U(-1.5,1.5) make the scales differ
  // (FP4 groups: 2^U(-fp4_span, fp4_span)).
  Linear linear(const std::string& name, WeightFormat fmt, int64_t out, int64_t in, uint64_t seed,
                bool f32_scales = false, bool f32_dense = false, float fp4_span = 1.f) {
    std::vector<float> w = normal(out * in, seed, 1.f / std::sqrt(float(in)));
    Rng r(seed + 7);
    Linear l;
    l.format = fmt;
    l.out = out;
    l.in = in;
    if (fmt == WeightFormat::FP8) {
      const int64_t sr = ceil_div(out, 128), sc = ceil_div(in, 128);
      std::vector<float> f(sr * sc);
      for (auto& v : f) v = std::exp2(r.uniform(-1.5f, 1.5f));
      for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j) w[i * in + j] *= f[(i / 128) * sc + j / 128];
      std::vector<uint8_t> q(out * in), s(sr * sc);
      quant_fp8_blocks(w.data(), out, in, q.data(), s.data());
      l.weight = add(name, DType::F8_E4M3, {out, in}, std::move(q));
      l.scale = scales(name, {sr, sc}, s, f32_scales);
    } else if (fmt == WeightFormat::FP4) {
      for (int64_t i = 0; i < out * in; i += 32) {
        const float f = std::exp2(r.uniform(-fp4_span, fp4_span));
        for (int64_t j = 0; j < 32; ++j) w[i + j] *= f;
      }
      std::vector<uint8_t> q(out * in / 2), s(out * in / 32);
      quant_fp4_groups(w.data(), out, in, q.data(), s.data());
      l.weight = add(name, DType::FP4_E2M1, {out, in / 2}, std::move(q));
      l.scale = scales(name, {out, in / 32}, s, f32_scales);
    } else {
      l.weight = f32_dense ? f32(name, {out, in}, w) : bf16(name, {out, in}, w);
    }
    return l;
  }

 private:
  const TensorData* scales(const std::string& name, std::vector<int64_t> shape, const std::vector<uint8_t>& e8,
                           bool as_f32) {
    if (!as_f32) return add(name + ".scale", DType::F8_E8M0, std::move(shape), e8);
    std::vector<float> f(e8.size());
    for (size_t i = 0; i < e8.size(); ++i) f[i] = e8m0_to_f32(e8[i]);
    return f32(name + ".scale", std::move(shape), f);
  }
  std::deque<std::vector<uint8_t>> bufs_;
  std::deque<TensorData> views_;
};

// A tensor on both backends with the same contents.
struct Pair {
  Tensor c, g;
};

class Mirror {
 public:
  Mirror(Backend& cpu, Backend& gpu) : cpu_(cpu), gpu_(gpu) {}
  Pair f32(std::vector<int64_t> shape, const std::vector<float>& v) {
    Pair p{cpu_.alloc(shape), gpu_.alloc(shape)};
    EXPECT_EQ(p.c.numel(), int64_t(v.size()));
    cpu_.upload(p.c, v.data());
    gpu_.upload(p.g, v.data());
    return p;
  }
  Pair i32(std::vector<int64_t> shape, const std::vector<int32_t>& v) {
    Pair p{cpu_.alloc(shape, ElemType::I32), gpu_.alloc(shape, ElemType::I32)};
    EXPECT_EQ(p.c.numel(), int64_t(v.size()));
    cpu_.upload(p.c, v.data());
    gpu_.upload(p.g, v.data());
    return p;
  }
  // Outputs: poisoned (NaN / -1) on both sides before the op runs.
  Pair out(std::vector<int64_t> shape, ElemType t = ElemType::F32) {
    Pair p{cpu_.alloc(shape, t), gpu_.alloc(shape, t)};
    const std::vector<uint32_t> poison(size_t(std::max<int64_t>(p.c.numel(), 1)), 0xffffffffu);
    cpu_.upload(p.c, poison.data());
    gpu_.upload(p.g, poison.data());
    return p;
  }
  std::vector<float> host_c(const Tensor& t) { return get<float>(cpu_, t); }
  std::vector<float> host_g(const Tensor& t) { return get<float>(gpu_, t); }
  std::vector<int32_t> ints_c(const Tensor& t) { return get<int32_t>(cpu_, t); }
  std::vector<int32_t> ints_g(const Tensor& t) { return get<int32_t>(gpu_, t); }
  std::vector<uint8_t> bytes_c(const Tensor& t) { return get<uint8_t>(cpu_, t); }  // U8 tensors
  std::vector<uint8_t> bytes_g(const Tensor& t) { return get<uint8_t>(gpu_, t); }

 private:
  template <class T>
  std::vector<T> get(Backend& b, const Tensor& t) {
    std::vector<T> v(t.numel());
    b.download(t, v.data());
    return v;
  }
  Backend &cpu_, &gpu_;
};

// max |got - ref| <= rtol * max |ref| (+ atol); NaN anywhere in got fails. Prints the numbers.
inline void expect_close(const std::vector<float>& ref, const std::vector<float>& got, float rtol,
                         const std::string& what, float atol = 0.f) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  float scale = 0.f, err = 0.f;
  int64_t nan = 0, at = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(ref[i])) {
      ++nan;
      continue;
    }
    scale = std::max(scale, std::fabs(ref[i]));
    const float e = std::fabs(got[i] - ref[i]);
    if (e > err) {
      err = e;
      at = int64_t(i);
    }
  }
  std::printf("[maxerr] %-48s n=%-9zu max_abs=%.3e max_ref=%.3e rel=%.3e tol=%.1e\n", what.c_str(), ref.size(), err,
              scale, scale > 0 ? err / scale : err, rtol);
  EXPECT_EQ(nan, 0) << what << ": NaN outputs (unwritten/poisoned elements)";
  EXPECT_LE(err, rtol * scale + atol) << what << " worst element " << at;
}

// Number of positions where got differs from ref, and the first of them (-1: none).
template <class T>
std::pair<int64_t, int64_t> mismatches(const std::vector<T>& ref, const std::vector<T>& got) {
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i)
    if (ref[i] != got[i]) {
      if (first < 0) first = int64_t(i);
      ++bad;
    }
  return {bad, first};
}

inline void expect_equal_ints(const std::vector<int32_t>& ref, const std::vector<int32_t>& got, const std::string& what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  const auto [bad, first] = mismatches(ref, got);
  std::printf("[maxerr] %-48s n=%-9zu mismatches=%lld\n", what.c_str(), ref.size(), (long long)bad);
  EXPECT_EQ(bad, 0) << what << " first mismatch at " << first << ": " << (first >= 0 ? ref[first] : 0) << " vs "
                    << (first >= 0 ? got[first] : 0);
}

// A MoE layer for op tests: E experts cycling through min(E, 8) distinct weight sets of format fmt
// (w1/w3 [F, D], w2 [D, F]), an optional FP8 shared expert, and routing for T tokens: gate
// weights in [0, 1) and k distinct experts per token (as top-k gives), or with repeats
// independent draws (hash tables may repeat). seed advances once per tensor and once for routing.
struct RandomMoE {
  MoEWeights moe;
  std::vector<int32_t> experts;
  std::vector<float> gates;
};
inline RandomMoE random_moe(WeightStore& ws, WeightFormat fmt, int64_t T, int64_t D, int64_t F, int64_t E, int64_t k,
                            bool shared, bool repeats, uint64_t& seed) {
  RandomMoE m;
  std::vector<ExpertWeights> sets(size_t(std::min<int64_t>(E, 8)));
  for (auto& s : sets) {
    s.w1 = ws.linear("w1", fmt, F, D, ++seed);
    s.w2 = ws.linear("w2", fmt, D, F, ++seed);
    s.w3 = ws.linear("w3", fmt, F, D, ++seed);
  }
  for (int64_t e = 0; e < E; ++e) m.moe.experts.push_back(sets[size_t(e) % sets.size()]);
  m.moe.has_shared = shared;
  if (shared) {
    m.moe.shared.w1 = ws.linear("s1", WeightFormat::FP8, F, D, ++seed);
    m.moe.shared.w2 = ws.linear("s2", WeightFormat::FP8, D, F, ++seed);
    m.moe.shared.w3 = ws.linear("s3", WeightFormat::FP8, F, D, ++seed);
  }
  Rng r(++seed);
  m.experts.resize(size_t(T * k));
  m.gates.resize(size_t(T * k));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> all(E);
    for (int64_t e = 0; e < E; ++e) all[e] = int32_t(e);
    for (int64_t i = 0; i < k; ++i) {
      std::swap(all[i], all[i + int64_t(r.below(uint64_t(E - i)))]);
      m.experts[t * k + i] = repeats ? int32_t(r.below(uint64_t(E))) : all[i];
      m.gates[t * k + i] = r.uniform(0.f, 1.f);
    }
  }
  return m;
}

}  // namespace dsv4::test
