// Golden tests: the CPU reference against HF transformers' DeepseekV4ForCausalLM (float32, same
// dequantised weights), fixtures made by scripts/golden/make_golden.py on the device.
// Per position: max |ours - ref| <= 1e-4 * max |ref| and identical argmax.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#ifdef DSV4_GOLDEN_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "model/checkpoint.h"
#include "model/forward.h"
#include "util/mapped_file.h"
#include "util/npy.h"
#include "util/random.h"

namespace fs = std::filesystem;
using namespace dsv4;

namespace {

const fs::path kRoot = fs::path(DSV4_SOURCE_DIR) / "tests" / "data" / "golden";

struct GoldenCase {
  std::string config, name;
  std::vector<int32_t> tokens;
};

std::vector<GoldenCase> discover() {
  std::vector<GoldenCase> out;
  if (!fs::is_directory(kRoot)) return out;
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(kRoot))
    if (e.is_directory() && fs::exists(e.path() / "cases.json")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  for (const auto& d : dirs) {
    auto j = nlohmann::json::parse(read_text_file((d / "cases.json").string()));
    const auto& cases = j.is_array() ? j : j.at("cases");
    for (const auto& c : cases) out.push_back({d.filename().string(), c.at("name"), c.at("tokens").get<std::vector<int32_t>>()});
  }
  return out;
}

// The schedules the issue asks for: one-shot prefill, a fixed uneven schedule, token by token,
// and a random one.
std::vector<std::pair<std::string, std::vector<int64_t>>> schedules(int64_t T) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> s;
  s.push_back({"prefill", {}});
  std::vector<int64_t> uneven;
  for (int64_t left = T, c = 7; left > 0; c = (c == 7 ? 1 : c == 1 ? 13 : 7)) {
    uneven.push_back(std::min(c, left));
    left -= uneven.back();
  }
  s.push_back({"7,1,13,...", uneven});
  s.push_back({"token-by-token", std::vector<int64_t>(T, 1)});
  Rng r{uint64_t(T)};
  std::vector<int64_t> rnd;
  for (int64_t left = T; left > 0;) {
    rnd.push_back(std::min<int64_t>(left, 1 + int64_t(r.below(17))));
    left -= rnd.back();
  }
  s.push_back({"random", rnd});
  return s;
}

void compare(const std::vector<float>& ours, const NpyArray& ref, const std::string& what) {
  ASSERT_EQ(ref.shape.size(), 2u);
  const int64_t rows = ref.shape[0], V = ref.shape[1];
  ASSERT_EQ(int64_t(ours.size()), rows * V) << what;
  const float* r = ref.f32();
  for (int64_t t = 0; t < rows; ++t) {
    float scale = 0, err = 0;
    int64_t am_ref = 0, am_ours = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float a = ours[t * V + i], b = r[t * V + i];
      ASSERT_FALSE(std::isnan(a)) << what << " position " << t;
      scale = std::max(scale, std::fabs(b));
      err = std::max(err, std::fabs(a - b));
      if (b > r[t * V + am_ref]) am_ref = i;
      if (a > ours[t * V + am_ours]) am_ours = i;
    }
    ASSERT_GT(scale, 0.f);
    EXPECT_LE(err / scale, 1e-4f) << what << " position " << t << ": max abs err " << err << " at logit scale " << scale;
    EXPECT_EQ(am_ours, am_ref) << what << " position " << t;
  }
}

class Golden : public ::testing::TestWithParam<GoldenCase> {};

}  // namespace

namespace {
void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.config << "/" << c.name; }

}  // namespace

TEST(GoldenFixtures, Present) {
#ifdef DSV4_GOLDEN_CUDA
  if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
#endif
  EXPECT_GE(discover().size(), 6u) << "golden fixtures missing under " << kRoot
                                   << " (regenerate: see docs/TESTING.md, 'Golden fixtures')";
}

TEST_P(Golden, MatchesTransformers) {
  const GoldenCase& gc = GetParam();
  const fs::path dir = kRoot / gc.config;
  auto ck = Checkpoint::open(dir.string());
#ifdef DSV4_GOLDEN_CUDA  // tests/cuda builds this file a second time for the CUDA backend (label gpu)
  if (!cuda_device_available()) GTEST_SKIP() << "no CUDA device";
  CudaOptions opts;
  opts.poison = true;  // unwritten outputs show as NaN
  auto be = make_cuda_backend(0, opts);
#else
  auto be = make_cpu_backend();
#endif
  Model model(ck->config(), ck->weights(), *be);
  const int64_t T = int64_t(gc.tokens.size());
  NpyArray ref = read_npy((dir / (gc.name + ".logits.npy")).string());
  ASSERT_EQ(ref.shape[0], T);
  for (const auto& [label, sched] : schedules(T)) compare(run_chunked(model, gc.tokens, sched, false), ref, label);
  const fs::path mtp = dir / (gc.name + ".mtp.npy");
  if (ck->config().num_nextn_predict_layers > 0) {
    ASSERT_TRUE(fs::exists(mtp)) << mtp;
    NpyArray mref = read_npy(mtp.string());
    compare(run_chunked(model, gc.tokens, {}, true), mref, "mtp prefill");
    compare(run_chunked(model, gc.tokens, std::vector<int64_t>(T, 1), true), mref, "mtp token-by-token");
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, ::testing::ValuesIn(discover()),
                         [](const ::testing::TestParamInfo<GoldenCase>& i) {
                           std::string n = i.param.config + "_" + i.param.name;
                           for (auto& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Golden);
