#include "cli/args.h"
#include "cli/commands.h"
#include "model/checkpoint.h"
#include "model/forward.h"
#include "util/npy.h"

namespace dsv4::cli {

void register_logits(CLI::App& app, Action& action) {
  struct Opts {
    std::string model, tokens, chunks, backend = "cpu", out, kv = "f32", gemm = "exact";
    bool mtp = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("logits", "Write FP32 logits for every position of a token list (.npy)");
  cmd->add_option("--model", o->model, "Model directory")->required();
  cmd->add_option("--tokens", o->tokens, "Comma-separated token ids")->required();
  cmd->add_option("--chunks", o->chunks, "Comma-separated chunk sizes summing to the token count (default: one chunk)");
  cmd->add_option("--backend", o->backend, "cpu (FP32 reference) or cuda (exact mode)")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--kv", o->kv, "KV storage: f32, or fp8 (production rows: FP8 no-RoPE dims with per-64 scales, BF16 RoPE dims)")
      ->check(CLI::IsMember({"f32", "fp8"}));
  cmd->add_option("--gemm", o->gemm,
                  "Linears with FP8/FP4 weights: exact (FP32 activations, the HF reference) or fp8 (the official "
                  "kernels' 1x128 FP8 activations; simulated on the CPU)")
      ->check(CLI::IsMember({"exact", "fp8"}));
  cmd->add_option("--out", o->out, "Output .npy: [T, vocab], or [T-1, vocab] with --mtp")->required();
  cmd->add_flag("--mtp", o->mtp, "Write the MTP block's draft logits (row t uses position t and token t+1)");
  cmd->callback([o, &action] {
    action = [o] {
      auto tokens = parse_int_list<int32_t>(o->tokens, "--tokens");
      auto chunks = o->chunks.empty() ? std::vector<int64_t>{} : parse_int_list<int64_t>(o->chunks, "--chunks");
      auto ck = Checkpoint::open(o->model);
      std::unique_ptr<Backend> backend;
      if (o->backend == "cuda") {
#ifdef DSV4_HAVE_CUDA
        if (!cuda_device_available()) fail("--backend cuda: no CUDA device is available");
        backend = make_cuda_backend(0);
#else
        fail("--backend cuda: this dsv4 was built without CUDA");
#endif
      } else {
        backend = make_cpu_backend();
      }
      Model model(ck->config(), ck->weights(), *backend);
      model.set_kv_fp8(o->kv == "fp8");
      model.set_fp8_activations(o->gemm == "fp8");
      auto out = run_chunked(model, tokens, chunks, o->mtp);
      const int64_t V = ck->config().vocab_size;
      write_npy_f32(o->out, out.data(), {int64_t(out.size()) / V, V});
      return 0;
    };
  });
}

}  // namespace dsv4::cli
