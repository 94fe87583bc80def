// Command-line helpers shared by the commands (src/cli/args.h, src/cli/numerics.h).
#include <gtest/gtest.h>

#include "cli/args.h"
#include "cli/numerics.h"

namespace dsv4::cli {

// --gemm / --kv "auto": the production path on CUDA, the exact reference on the CPU; an explicit
// choice is kept on either backend.
TEST(CliArgs, NumericsAutoIsProductionOnCudaExactOnCpu) {
  EXPECT_EQ(resolve_numerics("auto", "cuda", "exact"), "fp8");
  EXPECT_EQ(resolve_numerics("auto", "cpu", "exact"), "exact");
  EXPECT_EQ(resolve_numerics("auto", "cuda", "f32"), "fp8");
  EXPECT_EQ(resolve_numerics("auto", "cpu", "f32"), "f32");
  EXPECT_EQ(resolve_numerics("exact", "cuda", "exact"), "exact");
  EXPECT_EQ(resolve_numerics("f32", "cuda", "f32"), "f32");
  EXPECT_EQ(resolve_numerics("fp8", "cpu", "exact"), "fp8");
}

TEST(CliArgs, IntListsNameTheFlagOnBadItems) {
  EXPECT_EQ(parse_int_list<int>("1,2,3", "--tokens"), (std::vector<int>{1, 2, 3}));
  EXPECT_TRUE(parse_int_list<int>("", "--tokens").empty());
  try {
    parse_int_list<int>("1,x", "--tokens");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--tokens"), std::string::npos) << e.what();
  }
}

}  // namespace dsv4::cli
