#pragma once
// The OpenAI-compatible HTTP server (cpp-httplib): /v1/chat/completions, /v1/completions,
// /v1/models, /health, /metrics. Token-level work goes to an Engine; prompts are rendered and
// outputs parsed with src/text.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "server/api.h"
#include "text/tokenizer.h"

namespace dsv4::server {

struct ServerConfig {
  std::string host = "127.0.0.1";
  int port = 8000;  // 0: any free port (see HttpServer::bind)
  std::string model_name = "dsv4";
  std::string api_key;                 // empty: no auth
  size_t max_body_bytes = 8u << 20;    // larger bodies: 413
  int http_threads = 512;              // concurrent connections served
  int64_t context = 4096;              // prompt + max_tokens limit
  int32_t default_max_tokens = 0;      // 0: the rest of the context
  bool test_hooks = false;             // honour dsv4_forced_output
  double shutdown_timeout_s = 30;      // after this, in-flight requests are aborted
  double heartbeat_s = 1.0;            // idle interval between disconnect probes
  ParseLimits limits;
  ChatOptions::ContentSpecialTokens special_tokens_in_content = ChatOptions::ContentSpecialTokens::Special;
};

class HttpServer {
 public:
  HttpServer(Engine& engine, Tokenizer tok, ServerConfig cfg);
  ~HttpServer();
  // Binds the listening socket; returns the port (useful with port 0). Throws Error on failure.
  int bind();
  // Serves until shutdown() has drained everything. Returns when all handlers have finished.
  void run();
  // Stops accepting and lets in-flight requests finish (aborting them after the timeout).
  // Safe to call from any thread, more than once; `abort_now` aborts in-flight requests at once.
  void shutdown(bool abort_now = false);
  const ServerConfig& config() const { return cfg_; }

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  ServerConfig cfg_;
};

}  // namespace dsv4::server
