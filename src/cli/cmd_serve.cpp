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
#include "cli/numerics.h"
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
  std::string backend = "cpu", kv_memory, cuda_graphs = "on";
  NumericsOptions numerics;
  std::string offload_experts = "none", offload_reserve = kDefaultOffloadReserve;
  int port = 8000;
  int max_running = 64;
  int64_t max_batched_tokens = 2048;
  int64_t block_size = 0;
  int32_t speculative_tokens = 0;
  double gpu_memory_utilization = 0.9;
  bool no_prefix_caching = false;
  int tp = 1, ep = 1;
  int64_t max_model_len = 0;
  int32_t default_max_tokens = 0;
  int64_t max_body_bytes = 8 << 20;
  int io_threads = 4;
  int max_connections = 8192;
  double header_timeout = 10, read_timeout = 30, write_timeout = 30, keep_alive_timeout = 30;
  std::vector<std::string> allowed_origins;
  bool disable_access_log = false, disable_log_stats = false;
  double stats_interval = 10;
  std::string tool_call_parser, reasoning_parser, chat_template;
  std::string special_tokens_in_content = "special";
  bool enable_auto_tool_choice = false;
  bool allow_long_max_model_len = false;
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

// --max-model-len, or the model's context when it is not given; above the model's context only
// with --allow-long-max-model-len (as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN).
int64_t checked_context(const ServeOpts& o, int64_t model_context) {
  if (o.max_model_len == 0) return model_context;
  if (model_context > 0 && o.max_model_len > model_context && !o.allow_long_max_model_len)
    fail("--max-model-len: {} exceeds the model's context of {} tokens (max_position_embeddings); "
         "pass --allow-long-max-model-len to use it anyway (outputs past the trained length may be wrong)",
         o.max_model_len, model_context);
  return o.max_model_len;
}

// --chat-template: the renderer is the official DeepSeek-V4 encoder in C++ (src/text/chat_format),
// not a template engine, so only the names of that format are accepted.
void check_chat_template(const std::string& name) {
  static const char* const kOfficial[] = {"deepseek_v4", "deepseek-v4", "deepseek_v4_flash", "deepseek-v4-flash"};
  for (const char* n : kOfficial)
    if (name == n) return;
  fail("--chat-template: '{}' is not supported: prompts are rendered by the built-in DeepSeek-V4 encoder "
       "(src/text/chat_format, byte-exact with the official encoding), which has no Jinja engine; "
       "accepted values: deepseek_v4 (or leave the flag out)", name);
}

Loaded load(const ServeOpts& o) {
  Loaded L;
  ProgressBar bar(o.model.empty() ? "generating demo model" : "loading model", 3);
  if (o.engine != "scripted") {
    std::shared_ptr<LoadedModel> lm =
        o.model.empty() ? LoadedModel::demo(o.demo_preset, 1234, {o.tp, o.ep})
                        : LoadedModel::load(o.model, o.backend, {o.tp, o.ep}, parse_offload_spec(o.offload_experts, o.speculative_tokens > 0),
                                            parse_memory_size(o.offload_reserve, "--offload-reserve"));
    bar.advance(1);
    if (!lm->tokenizer) fail("--model: {} has no tokenizer.json (the server needs one)", o.model);
    lm->model->set_fp8_activations(o.numerics.fp8_activations());
    lm->model->set_decode_graphs(o.cuda_graphs == "on");
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
    ec.kv_fp8 = o.numerics.kv_fp8();
    ec.log_startup = true;
    checked_context(o, lm->config().max_position_embeddings);
    L.name = o.model.empty() || o.trained_demo ? "dsv4-demo" : lm->name;
    bar.advance(1);
    L.engine = make_engine(ec, lm);
    L.engine_kind = "model";
    bar.advance(1);
    bar.finish();
    // The engine clamps the context to what its state pool holds (and logs it).
    L.context = L.engine->metrics().max_model_len;
    if (!o.served_name.empty()) L.name = o.served_name;
    return L;
  }
  if (o.model.empty()) {
    nlohmann::json cfg = tiny_preset_config(o.demo_preset);
    L.demo = std::make_unique<GeneratedModel>(cfg, 1234);
    bar.advance(1);
    const ModelConfig& c = L.demo->config();
    L.tok = Tokenizer::from_json(tiny_tokenizer_json(c.vocab_size, c.bos_token_id, c.eos_token_id), "<demo tokenizer>");
    L.context = checked_context(o, c.max_position_embeddings);
    L.name = "dsv4-demo";
  } else {
    L.checkpoint = Checkpoint::open(o.model);
    bar.advance(1);
    std::string tj = (std::filesystem::path(o.model) / "tokenizer.json").string();
    if (!std::filesystem::exists(tj)) fail("--model: {} has no tokenizer.json", o.model);
    L.tok = Tokenizer::load(tj);
    L.context = checked_context(o, L.checkpoint->config().max_position_embeddings);
    L.name = model_dir_name(o.model);
  }
  bar.advance(1);
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

  if (!o.chat_template.empty()) check_chat_template(o.chat_template);
  if (o.engine == "scripted" && (o.tp > 1 || o.ep > 1)) fail("--tp/--ep: --engine scripted runs no model to split");
  Loaded L = load(o);
  if (o.trained_demo) {
    log_info("dsv4 serve: no --model given: serving the demo model {} (a small DeepSeek-V4 trained on the Brown "
             "corpus, docs/DEMO_MODEL.md): it writes English-like text, it does not follow instructions", o.model);
  } else if (o.model.empty()) {
    log_info("dsv4 serve: no --model given: serving the built-in demo model (preset '{}', random weights); "
             "its output is RANDOM TEXT, not a language model's answer", o.demo_preset);
  }
  if (!o.tool_call_parser.empty() || o.enable_auto_tool_choice)
    log_info("dsv4 serve: note: --tool-call-parser/--enable-auto-tool-choice are accepted for vLLM compatibility; "
             "tool calls are always parsed from DeepSeek-V4 DSML by the built-in parser");
  if (!o.reasoning_parser.empty())
    log_info("dsv4 serve: note: --reasoning-parser is accepted for vLLM compatibility; reasoning is always split "
             "at </think> by the built-in DeepSeek-V4 parser");
  if (L.engine_kind == "scripted")
    log_info("dsv4 serve: engine 'scripted': tokens are a deterministic function of the prompt, not a model's output; "
             "the API, streaming, tool-call parsing and metrics are real");
  server::ServerConfig cfg;
  cfg.host = o.host;
  cfg.port = o.port;
  cfg.model_name = L.name;
  cfg.api_key = o.api_key;
  cfg.max_body_bytes = size_t(o.max_body_bytes);
  cfg.io_threads = o.io_threads;
  cfg.max_connections = o.max_connections;
  cfg.header_timeout_s = o.header_timeout;
  cfg.read_timeout_s = o.read_timeout;
  cfg.write_timeout_s = o.write_timeout;
  cfg.keep_alive_timeout_s = o.keep_alive_timeout;
  cfg.allowed_origins = o.allowed_origins;
  cfg.access_log = !o.disable_access_log;
  cfg.stats_interval_s = o.disable_log_stats ? 0 : o.stats_interval;
  cfg.context = L.context;
  cfg.special_tokens_in_content = content_special_tokens_from_name(o.special_tokens_in_content);
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
  const std::string numerics = L.engine_kind == "model" ? fmt::format(", {} backend, --gemm {} --kv {}", o.backend,
                                                                        o.numerics.gemm, o.numerics.kv)
                                                          : "";
  log_info("dsv4 serve: ready at http://{}:{}/v1 (model '{}', context {} tokens{}{})", shown_host, port, L.name,
           L.context, numerics, o.api_key.empty() ? "" : ", API key required");
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
  // Every numeric flag: zero and negative values are refused (CLI11 names the flag).
  const CLI::Validator positive(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (end == s.c_str() || *end != '\0') return "expects a number, got '" + s + "'";
        return v > 0 ? "" : "must be greater than 0, got " + s;
      },
      "POSITIVE");
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (no --model: a built-in tiny demo model)");
  cmd->add_option("--model", o->model, "Model directory (config.json, safetensors, tokenizer.json)");
  cmd->add_option("--host", o->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "Port (0: any free port; the ready line names it)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--served-model-name", o->served_name, "Model id clients must use (default: the model directory's name)");
  cmd->add_option("--api-key", o->api_key, "Require 'Authorization: Bearer KEY' on /v1/*")->envname("DSV4_API_KEY");
  cmd->add_option("--max-running-requests", o->max_running, "Requests the engine runs at once")->capture_default_str()->check(positive)->check(CLI::Range(1, 4096));
  cmd->add_option("--max-batched-tokens", o->max_batched_tokens, "Tokens fed to the model per scheduler step (chunked prefill + decodes)")->capture_default_str()->check(positive)->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  cmd->add_option("--block-size", o->block_size, "Tokens per state block (default 256; a multiple of every compress ratio)")->check(positive)->check(CLI::Range(int64_t(1), int64_t(1) << 20));
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
  cmd->add_option("--tp", o->tp, "Tensor-parallel ranks: attention heads split over GPUs (docs/ENGINE.md)")->capture_default_str()->check(CLI::Range(1, 64));
  cmd->add_option("--ep", o->ep, "Expert-parallel ranks: routed experts split over GPUs (1 or --tp's value, or alone)")->capture_default_str()->check(CLI::Range(1, 64));
  cmd->add_option("--max-model-len", o->max_model_len, "Context limit (prompt + max_tokens); default: the model's")->check(positive);
  cmd->add_flag("--allow-long-max-model-len", o->allow_long_max_model_len,
                "Accept a --max-model-len above the model's context (as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)");
  cmd->add_option("--default-max-tokens", o->default_max_tokens, "max_tokens when a request gives none (default: the rest of the context)")->check(positive);
  cmd->add_option("--max-body-bytes", o->max_body_bytes, "Largest request body accepted, chunked or not (413 above)")->capture_default_str()->check(positive);
  cmd->add_option("--io-threads", o->io_threads, "Threads running the HTTP event loop")->capture_default_str()->check(positive)->check(CLI::Range(1, 256));
  cmd->add_option("--max-connections", o->max_connections,
                  "Open connections served; 64 more may only reach /health, /metrics, /ping, /version; beyond, 503")
      ->capture_default_str()->check(positive)->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--header-timeout", o->header_timeout, "Seconds a request's line and headers may take to arrive")->capture_default_str()->check(positive);
  cmd->add_option("--read-timeout", o->read_timeout, "Seconds a request body may take to arrive after its headers")->capture_default_str()->check(positive);
  cmd->add_option("--write-timeout", o->write_timeout, "Seconds a client may take no response bytes before it is dropped")->capture_default_str()->check(positive);
  cmd->add_option("--keep-alive-timeout", o->keep_alive_timeout, "Seconds an idle keep-alive connection stays open")->capture_default_str()->check(positive);
  cmd->add_option("--allowed-origins", o->allowed_origins, "CORS: origins allowed to call the API ('*': any); default: CORS off")->delimiter(',');
  cmd->add_flag("--disable-access-log", o->disable_access_log, "No log line per request");
  cmd->add_flag("--disable-log-stats", o->disable_log_stats, "No periodic stats line");
  cmd->add_option("--stats-interval", o->stats_interval, "Seconds between stats lines")->capture_default_str()->check(positive);
  cmd->add_option("--tool-call-parser", o->tool_call_parser, "Accepted for vLLM compatibility (tool calls are always parsed from DSML)");
  cmd->add_flag("--enable-auto-tool-choice", o->enable_auto_tool_choice, "Accepted for vLLM compatibility (tool_choice auto is always on)");
  cmd->add_option("--reasoning-parser", o->reasoning_parser, "Accepted for vLLM compatibility (reasoning is always split at </think>)");
  cmd->add_option("--chat-template", o->chat_template, "Prompt format: only the built-in deepseek_v4 (no Jinja engine)");
  cmd->add_option("--special-tokens-in-content", o->special_tokens_in_content,
                  "Special-token text in client text (message content, tool results): 'special' (tokenized as the "
                  "special token, as vLLM does) or 'plain' (ordinary text); a request's special_tokens_in_content wins")
      ->capture_default_str()
      ->check(CLI::IsMember({"special", "plain"}));
  cmd->add_option("--shutdown-timeout", o->shutdown_timeout, "Seconds to let in-flight requests finish on SIGINT/SIGTERM")->capture_default_str()->check(positive);
  auto* preset_opt = cmd->add_option("--demo-preset", o->demo_preset,
                                     "Without --model: serve a random make-tiny preset instead of the trained demo model")
                         ->capture_default_str();
  cmd->add_option("--engine", o->engine, "auto | model | scripted (deterministic fake tokens, for HTTP-layer tests)")
      ->capture_default_str()->check(CLI::IsMember({"auto", "model", "scripted"}));
  cmd->add_option("--backend", o->backend, "Backend for --model: cpu | cuda")->capture_default_str();
  o->numerics.add_to(cmd);
  cmd->add_option("--cuda-graphs", o->cuda_graphs, "Decode steps: on = fixed-shape steps replayed as CUDA graphs (the CPU runs the same padded plan); off = the plain per-batch plan")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--offload-experts", o->offload_experts,
                  "cuda: the token embedding and routed experts kept in pinned host memory, used from a device "
                  "expert cache (what --offload-reserve leaves): none, auto (as many layers as needed to fit), N (N "
                  "MoE blocks: the MTP block first unless --speculative-tokens, then the last layers) or a list of "
                  "layer indices (e.g. 40,41,42; the MTP block is 43)");
  cmd->add_option("--offload-reserve", o->offload_reserve,
                  "With --offload-experts: device memory kept free for the state pool and activations (auto "
                  "offloads until it is; the expert cache gets the rest)")->capture_default_str();
  cmd->add_option("--kv-memory", o->kv_memory, "State memory budget of the engine (e.g. 4G); default: the engine's");
  cmd->add_option("--scripted-step-ms", o->step_ms, "Step time of the scripted engine (ms)")->capture_default_str()->check(positive);
  cmd->add_flag("--enable-test-hooks", o->test_hooks, "Honour the test-only request field dsv4_forced_output");
  cmd->callback([o, preset_opt, &action] {
    o->numerics.resolve(o->backend);
    if (o->model.empty() && o->engine != "scripted" && preset_opt->count() == 0) {
      o->model = default_demo_model_dir();
      o->trained_demo = !o->model.empty();
    }
    action = [o] { return serve(*o); };
  });
}

}  // namespace dsv4::cli
