// dsv4 serve: the OpenAI-compatible HTTP server (src/server) in front of an Engine.
#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <thread>

#include "cli/commands.h"
#include "engine/llm_engine.h"
#include "model/checkpoint.h"
#include "model/tiny.h"
#include "engine/scripted_engine.h"
#include "server/server.h"
#include "text/tiny_tokenizer.h"
#include "text/tokenizer.h"
#include "util/error.h"
#include "util/log.h"
#include "cli/demo_model.h"

namespace dsv4::cli {

namespace {

struct ServeOpts {
  std::string model, host = "127.0.0.1", served_name, api_key, engine = "auto", demo_preset = "tiny";
  std::string backend = "cpu", kv_memory, gemm = "exact", kv = "f32";
  int port = 8000;
  int max_running = 64;
  int64_t max_batched_tokens = 2048;
  int64_t block_size = 0;
  int32_t speculative_tokens = 0;
  double gpu_memory_utilization = 0.9;
  bool no_prefix_caching = false;
  int tp = 1;
  int64_t max_model_len = 0;
  int32_t default_max_tokens = 0;
  size_t max_body_bytes = 8u << 20;
  int http_threads = 512;
  double shutdown_timeout = 30;
  double step_ms = 1;
  bool test_hooks = false;
  bool trained_demo = false;  // no --model: the committed demo model (models/demo-brown)
};

// The loaded model: tokenizer, context and the engine serving it.
struct Loaded {
  std::optional<Tokenizer> tok;  // set by load() on every path
  int64_t context = 0;
  std::string name;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<GeneratedModel> demo;        // the built-in demo model
  std::unique_ptr<Checkpoint> checkpoint;      // a model directory
  std::string engine_kind;
};

Loaded load(const ServeOpts& o) {
  Loaded L;
  ProgressBar bar(o.model.empty() ? "generating demo model" : "loading model", 3);
  if (o.engine != "scripted") {
    std::shared_ptr<LoadedModel> lm =
        o.model.empty() ? LoadedModel::demo(o.demo_preset, 1234) : LoadedModel::load(o.model, o.backend);
    bar.advance(1);
    if (!lm->tokenizer) fail("--model: {} has no tokenizer.json (the server needs one)", o.model);
    lm->model->set_fp8_activations(o.gemm == "fp8");
    L.tok = *lm->tokenizer;
    EngineConfig ec;
    ec.max_running_requests = o.max_running;
    ec.max_batched_tokens = o.max_batched_tokens;
    ec.speculative_tokens = o.speculative_tokens;
    ec.block_size = o.block_size;
    ec.gpu_memory_utilization = o.gpu_memory_utilization;
    ec.enable_prefix_caching = !o.no_prefix_caching;
    ec.max_model_len = o.max_model_len;
    if (!o.kv_memory.empty()) ec.kv_memory_bytes = parse_memory_size(o.kv_memory, "--kv-memory");
    ec.kv_fp8 = o.kv == "fp8";
    ec.log_startup = true;
    L.context = o.max_model_len > 0 ? o.max_model_len : lm->config().max_position_embeddings;
    L.name = o.model.empty() || o.trained_demo ? "dsv4-demo" : lm->name;
    bar.advance(1);
    L.engine = make_engine(ec, lm);
    L.engine_kind = "model";
    bar.advance(1);
    bar.finish();
    if (L.context <= 0) L.context = 4096;
    if (!o.served_name.empty()) L.name = o.served_name;
    return L;
  }
  if (o.model.empty()) {
    nlohmann::json cfg = tiny_preset_config(o.demo_preset);
    L.demo = std::make_unique<GeneratedModel>(cfg, 1234);
    bar.advance(1);
    const ModelConfig& c = L.demo->config();
    L.tok = Tokenizer::from_json(tiny_tokenizer_json(c.vocab_size, c.bos_token_id, c.eos_token_id), "<demo tokenizer>");
    L.context = c.max_position_embeddings;
    L.name = "dsv4-demo";
  } else {
    L.checkpoint = Checkpoint::open(o.model);
    bar.advance(1);
    std::string tj = (std::filesystem::path(o.model) / "tokenizer.json").string();
    if (!std::filesystem::exists(tj)) fail("--model: {} has no tokenizer.json", o.model);
    L.tok = Tokenizer::load(tj);
    L.context = L.checkpoint->config().max_position_embeddings;
    L.name = model_dir_name(o.model);
  }
  bar.advance(1);
  if (o.max_model_len > 0) L.context = o.max_model_len;
  if (L.context <= 0) L.context = 4096;
  // The scripted engine: tokens are a deterministic function of the prompt (tests, load tests
  // of the HTTP layer, and builds without the model engine).
  ScriptedEngine::Options so;
  so.context = L.context;
  so.max_running = o.max_running;
  so.step_time = std::chrono::microseconds(int64_t(o.step_ms * 1000));
  L.engine = std::make_unique<ScriptedEngine>(*L.tok, so);
  L.engine_kind = "scripted";
  bar.advance(1);
  bar.finish();
  if (!o.served_name.empty()) L.name = o.served_name;
  return L;
}

int serve(const ServeOpts& o) {
  // Signals are taken by a dedicated thread (sigwait), so block them before any thread starts.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  if (o.tp > 1) fail("--tp: {} GPUs requested; this engine runs one device per server (use --tp 1)", o.tp);
  Loaded L = load(o);
  if (o.trained_demo) {
    log_info("dsv4 serve: no --model given: serving the demo model {} (a small DeepSeek-V4 trained on the Brown "
             "corpus, docs/DEMO_MODEL.md): it writes English-like text, it does not follow instructions", o.model);
  } else if (o.model.empty()) {
    log_info("dsv4 serve: no --model given: serving the built-in demo model (preset '{}', random weights); "
             "its output is RANDOM TEXT, not a language model's answer", o.demo_preset);
  }
  if (L.engine_kind == "scripted")
    log_info("dsv4 serve: engine 'scripted': tokens are a deterministic function of the prompt, not a model's output; "
             "the API, streaming, tool-call parsing and metrics are real");
  server::ServerConfig cfg;
  cfg.host = o.host;
  cfg.port = o.port;
  cfg.model_name = L.name;
  cfg.api_key = o.api_key;
  cfg.max_body_bytes = o.max_body_bytes;
  cfg.http_threads = o.http_threads;
  cfg.context = L.context;
  cfg.default_max_tokens = o.default_max_tokens;
  cfg.test_hooks = o.test_hooks;
  cfg.shutdown_timeout_s = o.shutdown_timeout;
  server::HttpServer http(*L.engine, *L.tok, cfg);
  int port = http.bind();

  std::thread sig([&http, set] {
    int n = 0;
    for (;;) {
      int s = 0;
      if (sigwait(&set, &s) != 0) continue;
      if (s == SIGUSR1) return;  // our own wake-up at exit
      ++n;
      log_info("dsv4 serve: {} received; {}", s == SIGINT ? "SIGINT" : "SIGTERM",
               n == 1 ? "finishing in-flight requests (again to abort them)" : "aborting in-flight requests");
      http.shutdown(n > 1);
    }
  });
  std::string shown_host = o.host.find(':') != std::string::npos ? "[" + o.host + "]" : o.host;
  log_info("dsv4 serve: ready at http://{}:{}/v1 (model '{}', context {} tokens{})", shown_host, port, L.name, L.context,
           o.api_key.empty() ? "" : ", API key required");
  std::fflush(stderr);
  http.run();
  L.engine->shutdown(false);
  pthread_kill(sig.native_handle(), SIGUSR1);
  sig.join();
  log_info("dsv4 serve: stopped");
  return 0;
}

}  // namespace

void register_serve(CLI::App& app, Action& action) {
  auto o = std::make_shared<ServeOpts>();
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (no --model: a built-in tiny demo model)");
  cmd->add_option("--model", o->model, "Model directory (config.json, safetensors, tokenizer.json)");
  cmd->add_option("--host", o->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "Port (0: any free port; the ready line names it)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--served-model-name", o->served_name, "Model id clients must use (default: the model directory's name)");
  cmd->add_option("--api-key", o->api_key, "Require 'Authorization: Bearer KEY' on /v1/*")->envname("DSV4_API_KEY");
  cmd->add_option("--max-running-requests", o->max_running, "Requests the engine runs at once")->capture_default_str()->check(CLI::Range(1, 4096));
  cmd->add_option("--max-batched-tokens", o->max_batched_tokens, "Tokens fed to the model per scheduler step (chunked prefill + decodes)")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  cmd->add_option("--block-size", o->block_size, "Tokens per state block (0: 256; a multiple of every compress ratio)")->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  cmd->add_option("--gpu-memory-utilization", o->gpu_memory_utilization,
                  "cuda, without --kv-memory: share, in (0, 1], of the device memory free after the weights that the engine takes for state + activations")
      ->capture_default_str()
      // The engine checks it too (EngineConfig); here it fails before a long model load.
      ->check([](const std::string& s) -> std::string {
        const double u = std::strtod(s.c_str(), nullptr);
        return u > 0 && u <= 1 ? "" : "must be in (0, 1], got " + s;
      });
  cmd->add_flag("--no-prefix-caching", o->no_prefix_caching, "Disable prefix caching");
  cmd->add_option("--speculative-tokens", o->speculative_tokens,
                  "Speculative decoding: tokens the MTP block drafts per step (0: off; 1..3)")
      ->capture_default_str()
      ->check(CLI::Range(0, 3));
  cmd->add_option("--tp", o->tp, "Tensor/expert-parallel size")->capture_default_str()->check(CLI::Range(1, 64));
  cmd->add_option("--max-model-len", o->max_model_len, "Context limit (prompt + max_tokens); default: the model's");
  cmd->add_option("--default-max-tokens", o->default_max_tokens, "max_tokens when a request gives none (0: rest of the context)");
  cmd->add_option("--max-body-bytes", o->max_body_bytes, "Largest request body accepted (413 above)")->capture_default_str();
  cmd->add_option("--http-threads", o->http_threads, "HTTP worker threads (concurrent connections)")->capture_default_str()->check(CLI::Range(4, 65536));
  cmd->add_option("--shutdown-timeout", o->shutdown_timeout, "Seconds to let in-flight requests finish on SIGINT/SIGTERM")->capture_default_str();
  auto* preset_opt = cmd->add_option("--demo-preset", o->demo_preset,
                                     "Without --model: serve a random make-tiny preset instead of the trained demo model")
                         ->capture_default_str();
  cmd->add_option("--engine", o->engine, "auto | model | scripted (deterministic fake tokens, for HTTP-layer tests)")
      ->capture_default_str()->check(CLI::IsMember({"auto", "model", "scripted"}));
  cmd->add_option("--backend", o->backend, "Backend for --model: cpu | cuda")->capture_default_str();
  cmd->add_option("--gemm", o->gemm, "FP8/FP4-weight linears: exact (FP32 activations) | fp8 (official 1x128 FP8 activations)")
      ->check(CLI::IsMember({"exact", "fp8"}))
      ->capture_default_str();
  cmd->add_option("--kv-memory", o->kv_memory, "State memory budget of the engine (e.g. 4G); default: the engine's");
  cmd->add_option("--kv", o->kv, "KV storage: f32 (exact) or fp8 (production rows: FP8 no-RoPE dims, BF16 RoPE dims)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "fp8"}));
  cmd->add_option("--scripted-step-ms", o->step_ms, "Step time of the scripted engine (ms)")->capture_default_str();
  cmd->add_flag("--enable-test-hooks", o->test_hooks, "Honour the test-only request field dsv4_forced_output");
  cmd->callback([o, preset_opt, &action] {
    if (o->model.empty() && o->engine != "scripted" && preset_opt->count() == 0) {
      o->model = default_demo_model_dir();
      o->trained_demo = !o->model.empty();
    }
    action = [o] { return serve(*o); };
  });
}

}  // namespace dsv4::cli
