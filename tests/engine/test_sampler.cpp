// Sampling checked against direct computations written independently of src/engine/sampler.cpp,
// and the CPU backend's sample op against the host sampler on the same RNG streams.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "backend/backend.h"
#include "engine/sampler.h"
#include "util/random.h"

using namespace dsv4;

namespace {

std::vector<float> random_logits(int n, uint64_t seed, float scale = 3.f) {
  Rng r(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = scale * r.normal();
  return v;
}

// Reference: penalties as in the OpenAI / HF definitions.
std::vector<double> ref_penalised(const std::vector<float>& logits, const SamplingParams& p,
                                  const std::vector<int32_t>& prompt, const std::vector<int32_t>& gen) {
  std::vector<double> z(logits.begin(), logits.end());
  for (size_t i = 0; i < z.size(); ++i) {
    const bool in_prompt = std::count(prompt.begin(), prompt.end(), int32_t(i)) > 0;
    const auto c = std::count(gen.begin(), gen.end(), int32_t(i));
    if (in_prompt || c > 0) z[i] = z[i] > 0 ? z[i] / p.repetition_penalty : z[i] * p.repetition_penalty;
    z[i] -= double(c) * p.frequency_penalty;
    if (c > 0) z[i] -= p.presence_penalty;
  }
  return z;
}

// Reference filter: keeps token i iff it passes each filter, computed by counting, not sorting.
std::vector<double> ref_probs(const std::vector<double>& z, const SamplingParams& p) {
  const size_t V = z.size();
  std::vector<double> pr(V);
  double mx = *std::max_element(z.begin(), z.end()), s = 0;
  for (size_t i = 0; i < V; ++i) s += pr[i] = std::exp((z[i] - mx) / p.temperature);
  for (auto& x : pr) x /= s;
  // rank[i] = number of tokens ranked before i (higher prob, or equal prob and lower id).
  std::vector<size_t> rank(V);
  for (size_t i = 0; i < V; ++i)
    for (size_t j = 0; j < V; ++j)
      if (pr[j] > pr[i] || (pr[j] == pr[i] && j < i)) ++rank[i];
  std::vector<bool> keep(V, true);
  if (p.top_k > 0)
    for (size_t i = 0; i < V; ++i) keep[i] = rank[i] < size_t(p.top_k);
  if (p.top_p < 1) {
    double kept_mass = 0;
    for (size_t i = 0; i < V; ++i)
      if (keep[i]) kept_mass += pr[i];
    // Token i stays iff the mass (within the top-k set) ranked strictly before it is < top_p.
    for (size_t i = 0; i < V; ++i) {
      if (!keep[i]) continue;
      double before = 0;
      for (size_t j = 0; j < V; ++j)
        if (keep[j] && rank[j] < rank[i]) before += pr[j];
      if (before / kept_mass >= p.top_p) keep[i] = false;
    }
  }
  const double pmax = *std::max_element(pr.begin(), pr.end());
  if (p.min_p > 0)
    for (size_t i = 0; i < V; ++i)
      if (pr[i] < p.min_p * pmax) keep[i] = false;
  double tot = 0;
  for (size_t i = 0; i < V; ++i)
    if (keep[i]) tot += pr[i];
  std::vector<double> out(V, 0);
  for (size_t i = 0; i < V; ++i)
    if (keep[i]) out[i] = pr[i] / tot;
  return out;
}

}  // namespace

TEST(Sampler, FiltersMatchDirectComputation) {
  Rng r(99);
  int checked = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int V = 20 + int(r.below(60));
    auto logits = random_logits(V, 1000 + trial);
    SamplingParams p;
    p.temperature = 0.3f + float(r.uniform()) * 1.5f;
    p.top_k = trial % 3 == 0 ? 0 : 1 + int(r.below(uint64_t(V)));
    p.top_p = trial % 4 == 1 ? 1.f : 0.2f + 0.8f * float(r.uniform());
    p.min_p = trial % 5 == 2 ? 0.f : 0.3f * float(r.uniform());
    p.repetition_penalty = trial % 2 ? 1.f : 1.0f + float(r.uniform());
    p.frequency_penalty = trial % 3 == 1 ? 0.f : float(r.uniform()) - 0.2f;
    p.presence_penalty = trial % 3 == 2 ? 0.f : float(r.uniform()) - 0.2f;
    std::vector<int32_t> prompt, gen;
    for (int i = 0; i < 6; ++i) prompt.push_back(int32_t(r.below(uint64_t(V))));
    for (int i = 0; i < 8; ++i) gen.push_back(int32_t(r.below(uint64_t(V))));
    SamplerState st(1);
    st.add_prompt(prompt, V);
    for (int32_t g : gen) st.add_generated(g, V);
    auto z = ref_penalised(logits, p, prompt, gen);
    auto pen = apply_penalties(logits, p, st);
    for (int i = 0; i < V; ++i) ASSERT_NEAR(pen[size_t(i)], z[size_t(i)], 1e-5) << "trial " << trial << " token " << i;
    auto want = ref_probs(z, p);
    auto got = sampling_probs(logits, p, st);
    int kept = 0;
    for (int i = 0; i < V; ++i) {
      ASSERT_NEAR(got[size_t(i)], want[size_t(i)], 1e-5) << "trial " << trial << " token " << i;
      kept += want[size_t(i)] > 0;
    }
    EXPECT_GE(kept, 1);
    checked += kept < V;
  }
  EXPECT_GT(checked, 30);  // most trials actually filtered something
}

TEST(Sampler, GreedyIsArgmaxOfPenalisedLogits) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto logits = random_logits(100, seed);
    SamplingParams p;
    p.temperature = 0;
    SamplerState st(seed);
    const int32_t a = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(sample_token(logits, p, st), a);
    p.presence_penalty = 100;
    st.add_generated(a, 100);
    EXPECT_NE(sample_token(logits, p, st), a);
  }
}

TEST(Sampler, DrawsFollowTheDistribution) {
  auto logits = random_logits(8, 5, 1.f);
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 6;
  SamplerState st(123);
  auto probs = sampling_probs(logits, p, st);
  std::vector<int> counts(8);
  const int N = 40000;
  for (int i = 0; i < N; ++i) ++counts[size_t(sample_token(logits, p, st))];
  for (int i = 0; i < 8; ++i) {
    const double f = double(counts[size_t(i)]) / N, sd = std::sqrt(probs[size_t(i)] * (1 - probs[size_t(i)]) / N);
    EXPECT_NEAR(f, probs[size_t(i)], 5 * sd + 1e-9) << "token " << i;
    if (probs[size_t(i)] == 0) {
      EXPECT_EQ(counts[size_t(i)], 0);
    }
  }
}

TEST(Sampler, SeedsAreReproducibleAndPerSample) {
  SamplingParams p;
  p.seed = 42;
  EXPECT_EQ(sample_seed(p, 0, 1), sample_seed(p, 0, 2));  // fallback unused with a seed
  EXPECT_NE(sample_seed(p, 0, 1), sample_seed(p, 1, 1));
  p.seed.reset();
  EXPECT_NE(sample_seed(p, 0, 1), sample_seed(p, 0, 2));
  p.seed = 42;
  p.temperature = 1.0f;
  auto run = [&](uint64_t s) {
    SamplerState st(s);
    std::vector<int32_t> out;
    for (int i = 0; i < 30; ++i) out.push_back(sample_token(random_logits(64, uint64_t(i), 1.f), p, st));
    return out;
  };
  EXPECT_EQ(run(sample_seed(p, 0, 0)), run(sample_seed(p, 0, 0)));
  EXPECT_NE(run(sample_seed(p, 0, 0)), run(sample_seed(p, 1, 0)));
}

TEST(Sampler, LogprobsAreLogSoftmax) {
  auto logits = random_logits(50, 77);
  double mx = *std::max_element(logits.begin(), logits.end()), s = 0;
  for (float v : logits) s += std::exp(double(v) - mx);
  auto lp = token_logprobs(logits, 7, 5);
  EXPECT_NEAR(lp.logprob, double(logits[7]) - mx - std::log(s), 1e-5);
  ASSERT_EQ(lp.top.size(), 5u);
  std::vector<int32_t> order(50);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(lp.top[size_t(i)].first, order[size_t(i)]);
    EXPECT_NEAR(lp.top[size_t(i)].second, double(logits[size_t(order[size_t(i)])]) - mx - std::log(s), 1e-5);
  }
}

// ---- Backend::sample on the CPU backend: the same tokens as sample_token ----------------------

namespace {

// Filters covering each one alone and combined (penalty-free: the op has none).
std::vector<SamplingParams> op_params() {
  std::vector<SamplingParams> v;
  auto add = [&](float t, int32_t k, float p, float m) {
    SamplingParams s;
    s.temperature = t;
    s.top_k = k;
    s.top_p = p;
    s.min_p = m;
    v.push_back(s);
  };
  add(0.f, 0, 1.f, 0.f);     // greedy
  add(1.f, 0, 1.f, 0.f);     // temperature only
  add(0.6f, 0, 1.f, 0.f);
  add(1.3f, 40, 1.f, 0.f);   // top-k
  add(0.8f, 1, 1.f, 0.f);    // top-k 1 = greedy
  add(1.f, 0, 0.9f, 0.f);    // top-p
  add(0.7f, 0, 0.3f, 0.f);
  add(1.f, 0, 1.f, 0.1f);    // min-p
  add(0.9f, 50, 0.95f, 0.f);
  add(1.1f, 200, 0.8f, 0.05f);
  add(0.5f, 0, 0.95f, 0.2f);
  return v;
}

// Logits of several shapes: spread, peaked, many exact ties, masked (-inf) entries.
std::vector<float> op_logits(int V, int kind, uint64_t seed) {
  auto v = random_logits(V, seed, kind == 1 ? 12.f : 3.f);
  for (size_t i = 0; i < v.size(); ++i) {
    if (kind == 2) v[i] = std::round(v[i]);
    if (kind == 3 && i % 7 == 3) v[i] = -std::numeric_limits<float>::infinity();
  }
  return v;
}

}  // namespace

TEST(SampleOp, CpuOpEqualsSampleTokenOnTheSameRngStream) {
  auto be = make_cpu_backend();
  const auto params = op_params();
  for (int V : {5, 300, 4099}) {
    const int steps = 6;
    const int64_t B = int64_t(params.size()) * steps;
    // Row (request j, step t) of one batch; request j has its own seed.
    std::vector<float> logits, prow(static_cast<size_t>(B * kSampleParams)), uni(static_cast<size_t>(B));
    std::vector<int32_t> want(static_cast<size_t>(B));
    for (size_t j = 0; j < params.size(); ++j) {
      SamplerState host(100 + j), dev(100 + j);
      for (int t = 0; t < steps; ++t) {
        const int64_t b = int64_t(j) * steps + t;
        auto row = op_logits(V, t % 4, 7 * uint64_t(b) + uint64_t(V));
        logits.insert(logits.end(), row.begin(), row.end());
        want[size_t(b)] = sample_token(row, params[j], host);
        write_sample_params(sample_filter(params[j]), &prow[size_t(b * kSampleParams)]);
        uni[size_t(b)] = draw_uniform(params[j], dev);
      }
      EXPECT_EQ(host.rng.next_u64(), dev.rng.next_u64()) << "RNG streams diverged, params " << j;
    }
    Tensor z = be->alloc({B, V}), p = be->alloc({B, kSampleParams}), u = be->alloc({B}), out = be->alloc({B}, ElemType::I32);
    be->upload(z, logits.data());
    be->upload(p, prow.data());
    be->upload(u, uni.data());
    be->sample(z, p, u, out);
    std::vector<int32_t> got(static_cast<size_t>(B));
    be->download(out, got.data());
    for (int64_t b = 0; b < B; ++b)
      EXPECT_EQ(got[size_t(b)], want[size_t(b)]) << "V " << V << " row " << b << " params " << b / steps;
  }
}

TEST(SampleOp, GreedyTakesTheLowestIdAmongTies) {
  auto be = make_cpu_backend();
  const std::vector<float> z = {1.f, 3.f, -2.f, 3.f, 3.f, 0.f};
  Tensor t = be->alloc({1, 6}), p = be->alloc({1, kSampleParams}), u = be->alloc({1}), out = be->alloc({1}, ElemType::I32);
  be->upload(t, z.data());
  float pr[kSampleParams];
  write_sample_params(SampleFilter{0.f, 0, 1.f, 0.f}, pr);
  be->upload(p, pr);
  const float uu = 0.99f;
  be->upload(u, &uu);
  be->sample(t, p, u, out);
  int32_t tok = -1;
  be->download(out, &tok);
  EXPECT_EQ(tok, 1);
}

// Many draws of one row with independent uniforms: frequencies follow sampling_probs.
TEST(SampleOp, DrawsFollowTheDistribution) {
  auto be = make_cpu_backend();
  const int V = 40, N = 40000;
  auto row = random_logits(V, 11, 1.5f);
  SamplingParams sp;
  sp.temperature = 0.8f;
  sp.top_k = 25;
  sp.top_p = 0.9f;
  sp.min_p = 0.02f;
  const auto probs = sampling_probs(row, sp, SamplerState(0));
  std::vector<float> z, prow(size_t(N) * kSampleParams), uni(static_cast<size_t>(N));
  Rng r(3);
  for (int i = 0; i < N; ++i) {
    z.insert(z.end(), row.begin(), row.end());
    write_sample_params(sample_filter(sp), &prow[size_t(i) * kSampleParams]);
    uni[size_t(i)] = r.uniform_f32();
  }
  Tensor t = be->alloc({N, V}), p = be->alloc({N, kSampleParams}), u = be->alloc({N}), out = be->alloc({N}, ElemType::I32);
  be->upload(t, z.data());
  be->upload(p, prow.data());
  be->upload(u, uni.data());
  be->sample(t, p, u, out);
  std::vector<int32_t> got(static_cast<size_t>(N));
  be->download(out, got.data());
  std::vector<int> counts(static_cast<size_t>(V));
  for (int32_t g : got) {
    ASSERT_TRUE(g >= 0 && g < V) << g;
    ++counts[size_t(g)];
  }
  double chi2 = 0;
  int dof = -1;
  for (int i = 0; i < V; ++i) {
    const double e = double(probs[size_t(i)]) * N;
    if (probs[size_t(i)] == 0) {
      EXPECT_EQ(counts[size_t(i)], 0) << "filtered-out token " << i << " was drawn";
      continue;
    }
    chi2 += (counts[size_t(i)] - e) * (counts[size_t(i)] - e) / e;
    ++dof;
  }
  ASSERT_GT(dof, 3);
  // Mean dof, sd sqrt(2 dof): 6 sd is far beyond chance for these fixed seeds.
  EXPECT_LT(chi2, dof + 6 * std::sqrt(2.0 * dof)) << "chi-square " << chi2 << " with " << dof << " degrees of freedom";
}

TEST(SampleOp, UniformsComeFromTheRequestRngOnlyWhenSampling) {
  SamplingParams greedy_p, sample_p;
  greedy_p.temperature = 0;
  SamplerState a(5), b(5);
  EXPECT_EQ(draw_uniform(greedy_p, a), 0.f);
  EXPECT_EQ(a.rng.next_u64(), b.rng.next_u64());  // greedy draws nothing
  const float u = draw_uniform(sample_p, a);
  Rng ref(5);
  ref.next_u64();
  EXPECT_EQ(u, float(ref.next_u64() >> 40) * 0x1.0p-24f);
  EXPECT_GE(u, 0.f);
  EXPECT_LT(u, 1.f);
}
