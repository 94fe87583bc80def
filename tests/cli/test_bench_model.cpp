// dsv4 bench model --spec-accept on the CPU with the tiny random preset (one rank, and a --tp/--ep
// group): the table has one row per (context, sequence count) with the imposed acceptance length
// met, and bad flags are named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <regex>
#include <string>

#include <fmt/format.h>

namespace {

struct RunResult {
  int status;
  std::string output;
};

RunResult run(const std::string& args) {
  // One thread: the tiny model's rows are too small to share, and idle threads spinning on a busy
  // machine slow it down a hundredfold.
  const std::string cmd = fmt::format("OMP_NUM_THREADS=1 '{}' bench model --random {} 2>&1", DSV4_BINARY, args);
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  return {pclose(p), out};
}

}  // namespace

TEST(BenchModel, SpeculativeRowsMeetTheImposedAcceptanceLength) {
  struct Case {
    int k;
    double L;
    const char* group;  // --tp/--ep: the same bench over an in-process group of ranks
  };
  for (const auto& [k, L, group] : {Case{2, 2.35, ""}, Case{3, 1.6, ""}, Case{2, 2.35, "--tp 2 --ep 2"}}) {
    SCOPED_TRACE(testing::Message() << k << " " << group);
    const RunResult r = run(fmt::format(
        "--backend cpu --preset tiny --spec-accept {} --speculative-tokens {} --ctx 20,45 --seqs 1,3 --steps 60 {}", L, k,
        group));
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find(*group ? "2 rank(s) (--tp 2 --ep 2)" : "1 rank(s) (--tp 1 --ep 1)"), std::string::npos)
        << r.output;
    // The printed acceptance probability a solves 1 + a + ... + a^k = L.
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.output, m, std::regex(R"(accepted with probability ([0-9.]+))"))) << r.output;
    const double a = std::stod(m[1]);
    double tokens = 1, p = 1;
    for (int j = 0; j < k; ++j) tokens += (p *= a);
    EXPECT_NEAR(tokens, L, 1e-3);
    // | seqs | ctx | k | imposed L | measured L | plain ms | plain tok/s | spec ms | drafting ms | spec tok/s | speedup |
    // weight-bytes bound |
    const std::regex row(R"(\| (\d+) \| (\d+) \| (\d) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| )"
                         R"(([0-9.]+) \| ([0-9.]+) \| \*\*([0-9.]+)x\*\* \| ([0-9.]+)x \|)");
    std::vector<std::pair<int, int>> seen;
    for (std::sregex_iterator it(r.output.begin(), r.output.end(), row), end; it != end; ++it) {
      const std::smatch& f = *it;
      seen.push_back({std::stoi(f[1]), std::stoi(f[2])});
      EXPECT_EQ(std::stoi(f[3]), k);
      EXPECT_DOUBLE_EQ(std::stod(f[4]), std::round(L * 1000) / 1000);
      // 60 steps x seqs verify passes with equidistributed verdicts: within 0.05 of L.
      EXPECT_NEAR(std::stod(f[5]), L, 0.05) << f[0];
      const double plain_tps = std::stod(f[7]), spec_tps = std::stod(f[10]);
      EXPECT_GT(plain_tps, 0);
      EXPECT_GT(spec_tps, 0);
      EXPECT_GT(std::stod(f[9]), 0) << "the MTP block drafted";
      EXPECT_NEAR(std::stod(f[11]), spec_tps / plain_tps, 0.01 + 0.01 * spec_tps / plain_tps);
      // Spec reads more weight bytes per step than plain (more rows, the MTP passes): the bound
      // is below L.
      const double bound = std::stod(f[12]);
      EXPECT_GT(bound, 0) << f[0];
      EXPECT_LT(bound, L) << f[0];
    }
    EXPECT_EQ(seen, (std::vector<std::pair<int, int>>{{1, 20}, {3, 20}, {1, 45}, {3, 45}})) << r.output;
  }
}

TEST(BenchModel, BadSpeculativeFlagsAreNamed) {
  struct Case {
    const char* args;
    const char* message;
  };
  for (const Case& c : {
           Case{"--backend cpu --preset tiny --spec-accept 3.5 --speculative-tokens 2", "--spec-accept: 3.5 is outside"},
           Case{"--backend cpu --preset tiny --spec-accept 2", "--spec-accept needs --speculative-tokens"},
           Case{"--backend cpu --preset tiny --spec-accept 2 --speculative-tokens 4", "--speculative-tokens: must be 1..3"},
           Case{"--backend cpu --preset tiny", "only the --spec-accept mode runs on the CPU"},
           Case{"--backend cpu --spec-accept 2 --speculative-tokens 2", "--backend cpu: the flash preset"},
           Case{"--backend cpu --preset tiny --spec-accept 2 --speculative-tokens 2 --tp 2 --ep 4",
                "--tp 2 with --ep 4: tp must be 1 or equal ep"},
       }) {
    const RunResult r = run(c.args);
    EXPECT_NE(r.status, 0) << c.args;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
}
