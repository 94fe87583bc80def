#include <fmt/format.h>
#include <cstdio>

#include "cli/commands.h"
#include "engine/llm_engine.h"
#include "model/checkpoint.h"
#include "model/memory.h"
#include "model/parallel.h"
#include "model/placement.h"

namespace dsv4::cli {

namespace {

std::string human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) bytes /= 1024, ++u;
  return fmt::format("{:.2f} {}", bytes, units[u]);
}

struct OffloadQuery {
  int64_t gpu_bytes = 0;  // 0: no placement report
  OffloadSpec spec;
  int64_t reserve = 0;
};

void print_report(const Checkpoint& ck, const ParallelConfig& par, const OffloadQuery& off) {
  const ModelConfig& c = ck.config();
  std::printf("model: %s\n", ck.dir().c_str());
  std::printf("architecture: DeepSeek-V4 (%s), %lld layers + %lld MTP, hidden %lld, vocab %lld\n", c.model_type.c_str(),
              (long long)c.num_hidden_layers, (long long)c.num_nextn_predict_layers, (long long)c.hidden_size,
              (long long)c.vocab_size);
  std::printf("attention: %lld heads x %lld (rope %lld), shared K=V head, q_lora %lld, o_groups %lld x o_lora %lld, "
              "window %lld\n",
              (long long)c.num_attention_heads, (long long)c.head_dim, (long long)c.qk_rope_head_dim,
              (long long)c.q_lora_rank, (long long)c.o_groups, (long long)c.o_lora_rank, (long long)c.sliding_window);
  std::printf("indexer: %lld heads x %lld, top-%lld; mHC: %lld streams, %lld Sinkhorn iterations\n",
              (long long)c.index_n_heads, (long long)c.index_head_dim, (long long)c.index_topk, (long long)c.hc_mult,
              (long long)c.hc_sinkhorn_iters);
  std::printf("moe: %lld routed experts (%s) top-%lld + %lld shared, inter %lld, %s routing, scale %.3g, "
              "swiglu limit %.3g\n",
              (long long)c.n_routed_experts, c.expert_format == WeightFormat::FP4 ? "FP4" : "FP8",
              (long long)c.num_experts_per_tok, (long long)c.n_shared_experts, (long long)c.moe_intermediate_size,
              c.scoring_func.c_str(), c.routed_scaling_factor, c.swiglu_limit);
  std::printf("rope: theta %.6g (sliding layers), %.6g (compressed layers)", c.rope_theta, c.compress_rope_theta);
  if (c.yarn.enabled)
    std::printf(", YaRN factor %.6g from %lld (beta %.3g/%.3g)", c.yarn.factor,
                (long long)c.yarn.original_max_position_embeddings, c.yarn.beta_fast, c.yarn.beta_slow);
  std::printf("\n\nlayer schedule:\n");
  for (int64_t l = 0; l < c.total_layers(); ++l) {
    bool mtp = l >= c.num_hidden_layers;
    AttnKind k = c.attn_kind(l);
    std::string attn = attn_kind_name(k);
    if (k != AttnKind::Sliding) attn += fmt::format(" ratio {}", c.compress_ratio(l));
    if (k == AttnKind::CSA) attn += fmt::format(" +indexer top-{}", c.index_topk);
    std::printf("  %-6s %-3lld %-28s %s\n", mtp ? "mtp" : "layer", (long long)(mtp ? l - c.num_hidden_layers : l),
                attn.c_str(), c.is_hash_layer(l) ? "hash-routed MoE" : "top-k MoE");
  }
  WeightStats s = weight_stats(c, ck.weights());
  std::printf("\nparameters: %.4g (%lld)\nweight bytes: %s in %zu shard(s)\n", double(s.params), (long long)s.params,
              human(double(s.bytes)).c_str(), ck.shard_paths().size());
  for (const auto& [dt, eb] : s.by_dtype)
    std::printf("  %-9s %14lld elements  %s\n", dt.c_str(), (long long)eb.first, human(double(eb.second)).c_str());
  for (KvFormat kv : {KvFormat::F32, KvFormat::FP8})
    std::printf("%s--kv %-4s %.2f bytes/token of context + %s fixed per sequence (%lld B per window key / entry)\n",
                kv == KvFormat::F32 ? "\nsequence state:\n  " : "  ", kv_format_name(kv), kv_bytes_per_token(c, kv),
                human(double(fixed_state_bytes(c, kv))).c_str(), (long long)kv_row_bytes(c, kv));
  const double per_tok = kv_bytes_per_token(c, KvFormat::FP8);
  const int64_t fixed = fixed_state_bytes(c, KvFormat::FP8);
  // Each rank's shard as the loader builds it (shapes only: nothing is read), and the state,
  // which every rank holds whole (model/parallel.h).
  std::printf("\nper GPU at --tp %d --ep %d (%d rank%s):\n", par.tp, par.ep, par.world(), par.world() > 1 ? "s" : "");
  for (int r = 0; r < par.world(); ++r)
    std::printf("  rank %d: weights %s\n", r,
                human(double(WeightShard(c, ck.weights(), par, r, /*materialize=*/false).bytes())).c_str());
  std::printf("  every rank: state for 128K tokens (--kv fp8) %s\n", human(per_tok * 131072 + double(fixed)).c_str());
  if (off.gpu_bytes) {  // the plan `serve --backend cuda --offload-experts` makes on a GPU with that much free
    const ExpertOffloadPlan plan = plan_expert_offload(c, ck.weights(), off.spec, off.gpu_bytes - off.reserve);
    std::printf("\nplacement on one GPU with %s free (%s kept for state and activations):\n  %s\n",
                human(double(off.gpu_bytes)).c_str(), human(double(off.reserve)).c_str(), describe(plan).c_str());
  }
  auto unused = ck.unused_tensors();
  if (!unused.empty()) {
    std::printf("\nnote: %zu tensor(s) in the checkpoint are not used by the model, e.g. '%s'\n", unused.size(),
                unused.front().c_str());
  }
  std::printf("\nproblems: none\n");
}

}  // namespace

void register_inspect(CLI::App& app, Action& action) {
  struct Opts {
    std::string model;
    int tp = 1, ep = 1;
    std::string gpu_memory, offload = "auto", offload_reserve = kDefaultOffloadReserve;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("inspect", "Validate a model directory and print its architecture and sizes");
  cmd->add_option("--model", o->model, "Model directory (config.json + safetensors)")->required();
  cmd->add_option("--tp", o->tp, "Tensor-parallel ranks of the per-GPU memory report")->check(CLI::Range(1, 64));
  cmd->add_option("--ep", o->ep, "Expert-parallel ranks of the per-GPU memory report")->check(CLI::Range(1, 64));
  cmd->add_option("--gpu-memory", o->gpu_memory,
                  "Also print the expert placement on one GPU with this much free memory (e.g. 139G)");
  cmd->add_option("--offload-experts", o->offload, "With --gpu-memory: none | auto | N | layer list, as dsv4 serve without --speculative-tokens");
  cmd->add_option("--offload-reserve", o->offload_reserve, "With --gpu-memory: kept for state and activations")->capture_default_str();
  cmd->callback([o, &action] {
    action = [o] {
      OffloadQuery off;
      if (!o->gpu_memory.empty()) {
        off.gpu_bytes = parse_memory_size(o->gpu_memory, "--gpu-memory");
        off.spec = parse_offload_spec(o->offload);
        off.reserve = parse_memory_size(o->offload_reserve, "--offload-reserve");
      }
      auto ck = Checkpoint::open(o->model);
      const ParallelConfig par{o->tp, o->ep};
      check_parallel(ck->config(), par);
      print_report(*ck, par, off);
      return 0;
    };
  });
}

}  // namespace dsv4::cli
