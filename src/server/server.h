#pragma once
// The OpenAI-compatible HTTP server, event-driven on Boost.Beast/Asio: a front thread accepts
// connections and answers light requests, a few io threads serve generation (keep-alive,
// pipelining, SSE streams); header/read/write deadlines, a connection limit and a reserve that
// keep /health and /metrics answering. Endpoints:
// /v1/chat/completions, /v1/completions, /v1/models[/{id}], /tokenize, /detokenize, /health,
// /ping, /version, /metrics. Token-level work goes to an Engine; prompts are rendered and outputs
// parsed with src/text.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "server/api.h"
#include "text/tokenizer.h"

namespace dsv4::server {

struct ServerConfig {
  std::string host = "127.0.0.1";
  int port = 8000;  // 0: any free port (see HttpServer::bind)
  std::string model_name = "dsv4";
  std::string api_key;                 // empty: no auth
  size_t max_body_bytes = 8u << 20;    // larger bodies (Content-Length or chunked): 413
  size_t max_header_bytes = 16u << 10; // larger request line + headers: 431
  int io_threads = 4;                  // event-loop threads for generation (plus one front thread)
  int max_connections = 8192;          // beyond: only /health, /metrics, /ping, /version (a reserve), then 503
  double header_timeout_s = 10;        // a request's line + headers must arrive within this
  double read_timeout_s = 30;          // its body within this after the headers
  double write_timeout_s = 30;         // a client that takes no bytes for this long is dropped
  double keep_alive_timeout_s = 30;    // idle keep-alive connections are closed after this
  size_t max_stream_buffer_bytes = 1u << 20;  // per connection: output a slow client has not taken yet
  std::vector<std::string> allowed_origins;   // CORS; empty: off; "*": any origin
  bool access_log = true;              // one line per request
  double stats_interval_s = 10;        // periodic stats line; 0: off
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
  // Binds and listens (backlog 4096, no SO_REUSEPORT); returns the port (useful with port 0).
  // Throws Error naming host:port when the address is in use or not permitted.
  int bind();
  // Serves until shutdown() has drained everything (the front thread and io_threads io threads
  // run the event loops; this one waits for them).
  void run();
  // Stops accepting generation requests and lets in-flight ones finish (aborting them after the
  // timeout). Safe to call from any thread, more than once; `abort_now` aborts them at once.
  void shutdown(bool abort_now = false);
  const ServerConfig& config() const { return cfg_; }

  struct Impl;

 private:
  ServerConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::server
