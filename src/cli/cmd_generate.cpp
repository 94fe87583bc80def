// dsv4 generate: one prompt through the serving engine, streamed to stdout.
#include <condition_variable>
#include <cstdio>
#include <mutex>

#include "cli/commands.h"
#include "cli/demo_model.h"
#include "cli/numerics.h"
#include "engine/llm_engine.h"
#include "text/chat_format.h"
#include "util/error.h"

namespace dsv4::cli {

void register_generate(CLI::App& app, Action& action) {
  struct Opts {
    std::string model, prompt, mode = "chat", backend = "cpu", kv_memory, demo_preset = "tiny", cuda_graphs = "on";
    NumericsOptions numerics;
    bool raw = false, show_usage = false;
    int32_t max_tokens = 64, top_k = 0, n = 1, speculative_tokens = 0;
    float temperature = 0.f, top_p = 1.f, min_p = 0.f;
    int64_t seed = -1, block_size = 0;
    int tp = 1, ep = 1;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("generate", "Generate a completion for one prompt with the serving engine");
  cmd->add_option("--model", o->model, "Model directory (default: the committed demo model, models/demo-brown)");
  auto* preset_opt = cmd->add_option("--demo-preset", o->demo_preset,
                                     "Without --model: a random make-tiny preset instead of the trained demo model");
  cmd->add_option("--prompt", o->prompt, "The user message (or, with --raw, the prompt text)")->required();
  cmd->add_flag("--raw", o->raw, "Feed the prompt text as is, without the chat format");
  cmd->add_option("--mode", o->mode, "Chat mode: chat | thinking | max");
  cmd->add_option("--max-tokens", o->max_tokens, "Maximum tokens to generate");
  cmd->add_option("--temperature", o->temperature, "Sampling temperature (0: greedy)");
  cmd->add_option("--top-p", o->top_p, "Nucleus sampling mass");
  cmd->add_option("--top-k", o->top_k, "Top-k (0: off)");
  cmd->add_option("--min-p", o->min_p, "Min-p relative to the most likely token");
  cmd->add_option("--seed", o->seed, "Sampling seed");
  // Checked here: the per-sample buffers and the engine's slots are sized from -n before the
  // engine sees it (-n -1 threw std::length_error).
  cmd->add_option("-n", o->n, "Parallel samples")->check(CLI::Range(1, 4096));
  cmd->add_option("--kv-memory", o->kv_memory, "Sequence state memory budget (e.g. 512M, 4G)");
  cmd->add_option("--block-size", o->block_size, "Tokens per state block (default 256)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 20));  // as dsv4 serve; negative silently meant 256
  cmd->add_option("--backend", o->backend, "cpu | cuda");
  cmd->add_option("--tp", o->tp, "Tensor-parallel ranks: attention heads split over GPUs (docs/ENGINE.md)")->check(CLI::Range(1, 64));
  cmd->add_option("--ep", o->ep, "Expert-parallel ranks: routed experts split over GPUs (1 or --tp's value, or alone)")->check(CLI::Range(1, 64));
  o->numerics.add_to(cmd);
  cmd->add_option("--cuda-graphs", o->cuda_graphs, "Decode steps: on = fixed-shape steps replayed as CUDA graphs (the CPU runs the same padded plan); off = the plain per-batch plan")
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--speculative-tokens", o->speculative_tokens,
                  "Speculative decoding: tokens the MTP block drafts per step (0: off; 1..3)")
      ->check(CLI::Range(0, 3));
  cmd->add_flag("--usage", o->show_usage, "Print token usage (and speculative acceptance) to stderr at the end");
  cmd->callback([o, preset_opt, &action] {
    o->numerics.resolve(o->backend);
    const bool random_demo = o->model.empty() && (preset_opt->count() > 0 || default_demo_model_dir().empty());
    action = [o, random_demo] {
      const ParallelConfig par{o->tp, o->ep};
      auto lm = random_demo ? LoadedModel::demo(o->demo_preset, 1, par)
                            : LoadedModel::load(o->model.empty() ? default_demo_model_dir() : o->model, o->backend, par);
      if (!lm->tokenizer) fail("--model: {} has no tokenizer.json", o->model);
      lm->model->set_fp8_activations(o->numerics.fp8_activations());
      lm->model->set_decode_graphs(o->cuda_graphs == "on");
      std::vector<int32_t> prompt;
      if (o->raw) {
        prompt = lm->tokenizer->encode(o->prompt);
      } else {
        ojson messages = ojson::array({ojson{{"role", "user"}, {"content", o->prompt}}});
        prompt = lm->tokenizer->encode(render_chat(messages, nullptr, chat_options_from_mode(o->mode)));
      }
      EngineConfig cfg;
      if (!o->kv_memory.empty()) cfg.kv_memory_bytes = parse_memory_size(o->kv_memory, "--kv-memory");
      cfg.block_size = o->block_size;
      cfg.kv_fp8 = o->numerics.kv_fp8();
      cfg.max_running_requests = std::max(4, o->n);
      cfg.speculative_tokens = o->speculative_tokens;
      auto engine = make_engine(cfg, lm);
      Request req;
      req.prompt = std::move(prompt);
      auto& sp = req.sampling;
      sp.max_tokens = o->max_tokens;
      sp.temperature = o->temperature;
      sp.top_p = o->top_p;
      sp.top_k = o->top_k;
      sp.min_p = o->min_p;
      sp.n = o->n;
      if (o->seed >= 0) sp.seed = uint64_t(o->seed);
      std::mutex mu;
      std::condition_variable cv;
      int done = 0;
      std::vector<std::string> texts(size_t(o->n));
      Event last;
      engine->submit(std::move(req), [&](const Event& e) {
        std::lock_guard lk(mu);
        if (o->n == 1) {
          std::fputs(e.text.c_str(), stdout);
          std::fflush(stdout);
        } else {
          texts[size_t(e.index)] += e.text;
        }
        if (e.finish != FinishReason::None) {
          if (e.finish == FinishReason::Error) std::fprintf(stderr, "error: %s\n", e.error.c_str());
          last = e;
          ++done;
          cv.notify_all();
        }
      });
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return done == o->n; });
      }
      for (int i = 0; o->n > 1 && i < o->n; ++i) std::printf("--- sample %d ---\n%s\n", i, texts[size_t(i)].c_str());
      if (o->n == 1) std::printf("\n");
      engine->shutdown(true);
      if (o->show_usage) {
        const EngineMetrics m = engine->metrics();
        std::fprintf(stderr, "prompt %d tokens, completion %d tokens (finish: %s), %.1f tokens/s\n", last.prompt_tokens,
                     last.completion_tokens, finish_reason_name(last.finish), m.tokens_per_second);
        if (m.speculative_steps)
          std::fprintf(stderr, "speculative: %lld drafts, %lld accepted, mean acceptance length %.3f over %lld steps\n",
                       (long long)m.draft_tokens, (long long)m.accepted_draft_tokens, m.mean_acceptance_length,
                       (long long)m.speculative_steps);
      }
      return last.finish == FinishReason::Error ? 1 : 0;
    };
  });
}

}  // namespace dsv4::cli
