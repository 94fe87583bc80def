#pragma once
// --gemm and --kv of the commands that run a model for users (serve, generate, perplexity).
#include <CLI/CLI.hpp>
#include <string>

namespace dsv4::cli {

// "auto" resolved for a backend: the production path (FP8 activations, FP8 KV rows, as the
// official inference code) on CUDA, the exact reference (FP32 activations, F32 KV) on the CPU,
// which simulates the production path when asked for it. `exact` is the option's exact value
// ("exact" or "f32"); any other choice is kept.
inline std::string resolve_numerics(const std::string& choice, const std::string& backend, const char* exact) {
  if (choice != "auto") return choice;
  return backend == "cuda" ? "fp8" : exact;
}

struct NumericsOptions {
  std::string gemm = "auto", kv = "auto";

  void add_to(CLI::App* cmd) {
    cmd->add_option("--gemm", gemm,
                    "FP8/FP4-weight linears: exact (FP32 activations) | fp8 (official 1x128 FP8 activations) | auto "
                    "(fp8 on cuda, exact on cpu)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "exact", "fp8"}));
    cmd->add_option("--kv", kv,
                    "KV storage: f32 (exact) | fp8 (production rows: FP8 no-RoPE dims, BF16 RoPE dims) | auto (fp8 "
                    "on cuda, f32 on cpu)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "f32", "fp8"}));
  }
  // Replaces "auto" by the backend's choice (call once the options are parsed).
  void resolve(const std::string& backend) {
    gemm = resolve_numerics(gemm, backend, "exact");
    kv = resolve_numerics(kv, backend, "f32");
  }
  bool fp8_activations() const { return gemm == "fp8"; }
  bool kv_fp8() const { return kv == "fp8"; }
};

}  // namespace dsv4::cli
