// dsv4 bench serve --plot (through --plot-from a saved --result-json): where "inf" goes, the log
// concurrency axis, round ticks and legends outside the plot areas.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "util/mapped_file.h"

namespace {

using json = nlohmann::json;

constexpr double kPlotBottom = 360;  // top (60) + height (300) of both panels
constexpr double kPanelSplit = 500;  // left panel: x < 500

json point(const std::string& mode, json rate, json concurrency, double scale) {
  json stat = {{"mean", 10 * scale}, {"median", 9 * scale}, {"p90", 20 * scale}, {"p99", 31 * scale}};
  return {{"mode", mode}, {"request_rate", rate}, {"max_concurrency", concurrency}, {"num_prompts", 64},
          {"completed", 64}, {"failed", 0}, {"output_throughput", 1234.5 * scale},
          {"total_token_throughput", 2345.6 * scale}, {"ttft_ms", stat}, {"tpot_ms", stat}, {"itl_ms", stat},
          {"e2el_ms", stat}};
}

// Writes the results, runs the plot, returns the SVG.
std::string plot(const json& results, const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / fmt::format("dsv4_bench_plot_{}", ::getpid());
  std::filesystem::create_directories(dir);
  std::string in = (dir / (name + ".json")).string(), out = (dir / (name + ".svg")).string();
  std::ofstream(in) << json{{"config", {{"model", "m"}, {"input_len", 8}, {"output_len", 4}, {"num_prompts", 64}}},
                            {"results", results}}
                           .dump();
  std::string cmd = fmt::format("'{}' bench serve --plot-from '{}' --plot '{}'", DSV4_BINARY, in, out);
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return dsv4::read_text_file(out);
}

struct Label {
  double x, y;
  std::string text;
};

// Centered text labels (axis ticks and axis names).
std::vector<Label> x_tick_labels(const std::string& svg) {
  std::vector<Label> out;
  std::regex re(R"re(<text x="([0-9.]+)" y="([0-9.]+)" text-anchor="middle">([^<]*)</text>)re");
  for (std::sregex_iterator it(svg.begin(), svg.end(), re), end; it != end; ++it)
    if (std::stod((*it)[2]) == kPlotBottom + 16) out.push_back({std::stod((*it)[1]), kPlotBottom + 16, (*it)[3]});
  return out;
}

}  // namespace

TEST(BenchPlot, InfRateSitsAtTheRightEndWithALabel) {
  json results = json::array({point("burst", "inf", nullptr, 3), point("rate", 1.0, nullptr, 1), point("rate", 4.0, nullptr, 2)});
  std::string svg = plot(results, "rate");
  EXPECT_NE(svg.find("request rate (req/s)"), std::string::npos);
  std::vector<Label> left;
  for (const Label& l : x_tick_labels(svg))
    if (l.x < kPanelSplit) left.push_back(l);
  ASSERT_GE(left.size(), 3u);
  EXPECT_EQ(left.back().text, "inf");
  for (size_t i = 0; i + 1 < left.size(); ++i) EXPECT_LT(left[i].x, left.back().x) << left[i].text;
  EXPECT_NE(svg.find("stroke-dasharray=\"4 3\""), std::string::npos) << "the axis break before inf";
}

TEST(BenchPlot, ConcurrencyAxisIsLogScale) {
  json results = json::array();
  for (int c : {1, 2, 4, 8, 16, 32, 64}) results.push_back(point("concurrency", "inf", c, c));
  std::string svg = plot(results, "concurrency");
  EXPECT_NE(svg.find("max concurrency (log scale)"), std::string::npos);
  std::vector<double> xs;
  for (const Label& l : x_tick_labels(svg))
    if (l.x < kPanelSplit) xs.push_back(l.x);
  ASSERT_EQ(xs.size(), 7u);
  // Doubling concurrency moves the same distance.
  for (size_t i = 2; i < xs.size(); ++i) EXPECT_NEAR(xs[i] - xs[i - 1], xs[1] - xs[0], 0.2);
  EXPECT_EQ(svg.find(">inf<"), std::string::npos);
}

TEST(BenchPlot, RoundTicksAndLegendsOutsideThePlots) {
  json results = json::array({point("concurrency", "inf", 1, 1.37), point("concurrency", "inf", 8, 7.91)});
  std::string svg = plot(results, "legend");
  std::regex y_tick(R"re(<text x="[0-9.]+" y="[0-9.]+" text-anchor="end">([^<]*)</text>)re");
  int ticks = 0;
  for (std::sregex_iterator it(svg.begin(), svg.end(), y_tick), end; it != end; ++it, ++ticks) {
    std::string t = (*it)[1];
    EXPECT_TRUE(std::regex_match(t, std::regex(R"([0-9]+(\.[0-9])?k?)"))) << t;
  }
  EXPECT_GE(ticks, 6);
  std::regex legend(R"re(<g class="legend"><rect x="[0-9.]+" y="([0-9.]+)")re");
  int entries = 0;
  for (std::sregex_iterator it(svg.begin(), svg.end(), legend), end; it != end; ++it, ++entries)
    EXPECT_GT(std::stod((*it)[1]), kPlotBottom + 20);
  EXPECT_EQ(entries, 7);
}
