// The HTTP transport (Beast): limits, deadlines, pipelining, connection limits, the small
// endpoints, request ids, CORS and the serve flags. Raw sockets where the behaviour is below
// what an HTTP client library shows (how much of a body the server read, when it hung up).
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <functional>
#include <thread>

#include "engine/scripted_engine.h"
#include "server/server.h"
#include "text/tiny_tokenizer.h"
#include "util/error.h"

using namespace dsv4;
using namespace dsv4::server;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

Tokenizer tiny_tok() { return Tokenizer::from_json(tiny_tokenizer_json(1024, 0, 1), "<tiny>"); }

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// A server on a free loopback port with the scripted engine.
struct Served {
  Tokenizer tok = tiny_tok();
  ScriptedEngine engine;
  HttpServer http;
  int port = 0;
  std::thread th;
  explicit Served(ServerConfig cfg = {}, ScriptedEngine::Options eo = {})
      : engine(tok, eo), http(engine, tok, [&] {
          cfg.port = 0;
          cfg.access_log = false;
          return cfg;
        }()) {
    port = http.bind();
    th = std::thread([this] { http.run(); });
  }
  ~Served() {
    http.shutdown(true);
    th.join();
    engine.shutdown(false);
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c;
  }
  double metric(const std::string& name) const {
    auto res = client().Get("/metrics");
    if (!res) return -1;
    size_t at = res->body.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stod(res->body.substr(at + name.size() + 2));
  }
};

// A plain TCP connection to the server.
struct RawConn {
  int fd = -1;
  explicit RawConn(int port, int rcvbuf = 0) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (rcvbuf > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ~RawConn() {
    if (fd >= 0) ::close(fd);
  }
  RawConn(const RawConn&) = delete;
  RawConn& operator=(const RawConn&) = delete;
  // Bytes the kernel accepted (stops at the first error, e.g. the server hung up).
  size_t send_all(std::string_view s) {
    size_t sent = 0;
    while (sent < s.size()) {
      ssize_t n = ::send(fd, s.data() + sent, s.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += size_t(n);
    }
    return sent;
  }
  // Reads until `done` says so, the peer closes (*closed), or the timeout.
  std::string read_until(const std::function<bool(const std::string&)>& done, double timeout_s, bool* closed = nullptr) {
    std::string got;
    auto deadline = Clock::now() + std::chrono::milliseconds(int64_t(timeout_s * 1000));
    if (closed) *closed = false;
    while (!done(got)) {
      int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left <= 0) break;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, left) <= 0) continue;
      char buf[65536];
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) {
        if (closed) *closed = true;
        break;
      }
      got.append(buf, size_t(n));
    }
    return got;
  }
};

// Complete HTTP/1.1 responses (Content-Length framed) at the start of `bytes`: their status and body.
std::vector<std::pair<int, std::string>> responses(const std::string& bytes) {
  std::vector<std::pair<int, std::string>> out;
  size_t pos = 0;
  for (;;) {
    size_t end = bytes.find("\r\n\r\n", pos);
    if (end == std::string::npos) break;
    std::string head = bytes.substr(pos, end - pos);
    size_t cl = head.find("Content-Length: ");
    size_t len = cl == std::string::npos ? 0 : std::stoul(head.substr(cl + 16));
    if (bytes.size() < end + 4 + len) break;
    out.emplace_back(std::stoi(head.substr(9, 3)), bytes.substr(end + 4, len));
    pos = end + 4 + len;
  }
  return out;
}

auto has_responses(size_t n) {
  return [n](const std::string& b) { return responses(b).size() >= n; };
}

std::string completion_body(int max_tokens = 4) { return json{{"prompt", "hi"}, {"max_tokens", max_tokens}}.dump(); }

// Runs `dsv4 serve ARGS` (stdout and stderr together) for at most `seconds`; exit status in *status.
std::string run_serve(const std::string& args, int seconds, int* status) {
  std::string cmd = fmt::format("timeout -s INT {} {} serve --engine scripted --host 127.0.0.1 {} 2>&1", seconds, DSV4_BINARY, args);
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = ::pclose(p);
  *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

}  // namespace

// Defect 2: a chunked body used to bypass --max-body-bytes (200 MB were read before the 401).
TEST(HttpTransport, ChunkedBodyOverTheLimitIs413AndIsNotRead) {
  ServerConfig cfg;
  cfg.max_body_bytes = 100000;
  Served s(cfg);
  RawConn c(s.port);
  ASSERT_GE(c.fd, 0);
  c.send_all("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
  const std::string piece = fmt::format("{:x}\r\n{}\r\n", 65536, std::string(65536, ' '));
  size_t accepted = 0;
  const size_t offered = 256u << 20;
  while (accepted < offered) {
    size_t n = c.send_all(piece);
    accepted += n;
    if (n < piece.size()) break;  // the server hung up
  }
  std::string got = c.read_until(has_responses(1), 10);
  auto rs = responses(got);
  ASSERT_EQ(rs.size(), 1u) << got.substr(0, 300);
  EXPECT_EQ(rs[0].first, 413);
  EXPECT_NE(json::parse(rs[0].second)["error"]["message"].get<std::string>().find("--max-body-bytes"), std::string::npos);
  // The limit, the bounded drain and the socket buffers: far from the 256 MB offered.
  EXPECT_LT(accepted, size_t(32) << 20);
  // A Content-Length over the limit is refused from the headers alone.
  RawConn d(s.port);
  d.send_all("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100001\r\n\r\n");
  rs = responses(d.read_until(has_responses(1), 5));
  ASSERT_EQ(rs.size(), 1u);
  EXPECT_EQ(rs[0].first, 413);
}

// Defect 2: the API key is checked from the headers; the body is never waited for.
TEST(HttpTransport, ApiKeyIsCheckedBeforeTheBody) {
  ServerConfig cfg;
  cfg.api_key = "sekrit";
  Served s(cfg);
  RawConn c(s.port);
  auto t0 = Clock::now();
  c.send_all("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n");  // no body follows
  bool closed = false;
  std::string got = c.read_until(has_responses(1), 5, &closed);
  auto rs = responses(got);
  ASSERT_EQ(rs.size(), 1u) << "no 401 before the body: " << got;
  EXPECT_EQ(rs[0].first, 401);
  EXPECT_EQ(json::parse(rs[0].second)["error"]["code"], "invalid_api_key");
  EXPECT_LT(ms_since(t0), 2000);
  EXPECT_NE(got.find("Connection: close"), std::string::npos);
  // The right key gets through.
  auto res = s.client().Post("/v1/completions", {{"Authorization", "Bearer sekrit"}}, completion_body(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

// Defect 3: no SO_REUSEPORT; a second server on a busy port fails at start-up naming the address.
TEST(HttpTransport, BusyPortIsAStartupError) {
  Served s;
  Tokenizer tok = tiny_tok();
  ScriptedEngine engine(tok, {});
  ServerConfig cfg;
  cfg.port = s.port;
  HttpServer second(engine, tok, cfg);
  try {
    second.bind();
    ADD_FAILURE() << "a second server bound the busy port " << s.port;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("127.0.0.1:{}", s.port)), std::string::npos) << e.what();
  }
  engine.shutdown(false);
  int status = 0;
  std::string out = run_serve(fmt::format("--port {}", s.port), 20, &status);
  EXPECT_NE(status, 0) << out;
  EXPECT_NE(status, 124) << "it served instead of failing: " << out;
  EXPECT_NE(out.find(fmt::format("127.0.0.1:{}", s.port)), std::string::npos) << out;
  EXPECT_EQ(out.find("ready at"), std::string::npos) << out;
}

// Defect 4: slowloris connections (a header line every 300 ms) are dropped at the header
// deadline; /health keeps answering meanwhile.
TEST(HttpTransport, SlowlorisIsDroppedAtTheHeaderDeadline) {
  ServerConfig cfg;
  cfg.header_timeout_s = 1;
  Served s(cfg);
  constexpr int kSlow = 200;
  std::vector<std::unique_ptr<RawConn>> slow;
  for (int i = 0; i < kSlow; ++i) {
    slow.push_back(std::make_unique<RawConn>(s.port));
    ASSERT_GE(slow.back()->fd, 0);
    slow.back()->send_all("GET /health HTTP/1.1\r\n");
  }
  auto t0 = Clock::now();
  double worst_health_ms = 0;
  std::vector<bool> dropped(kSlow, false);
  for (int line = 0; line < 10; ++line) {  // 3 s of header lines, 3x the deadline
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    for (int i = 0; i < kSlow; ++i)
      if (!dropped[size_t(i)] && slow[size_t(i)]->send_all(fmt::format("X-Slow-{}: {}\r\n", line, i)) == 0) dropped[size_t(i)] = true;
    auto h0 = Clock::now();
    auto res = s.client().Get("/health");
    worst_health_ms = std::max(worst_health_ms, ms_since(h0));
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  // Every slow connection is closed by now (a read sees the end), well before its headers end.
  for (int i = 0; i < kSlow; ++i) {
    bool closed = false;
    std::string got = slow[size_t(i)]->read_until([](const std::string&) { return false; }, 0.5, &closed);
    EXPECT_TRUE(closed) << "connection " << i << " still open after " << ms_since(t0) << " ms";
    EXPECT_TRUE(got.empty()) << got;  // dropped without an answer
  }
  EXPECT_LT(worst_health_ms, 100);
}

// HTTP/1.1 pipelining: requests sent back to back are answered in order on one connection.
TEST(HttpTransport, PipelinedRequestsAreAnsweredInOrder) {
  Served s;
  RawConn c(s.port);
  std::string body = completion_body();
  c.send_all(fmt::format(
      "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}"
      "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
      "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
      body.size(), body));
  auto rs = responses(c.read_until(has_responses(4), 10));
  ASSERT_EQ(rs.size(), 4u);
  EXPECT_EQ(rs[0].first, 200);
  EXPECT_EQ(json::parse(rs[0].second)["status"], "ok");
  EXPECT_EQ(rs[1].first, 200);
  EXPECT_EQ(json::parse(rs[1].second)["object"], "text_completion");
  EXPECT_EQ(rs[2].first, 200);
  EXPECT_EQ(json::parse(rs[2].second)["object"], "list");
  EXPECT_EQ(rs[3].first, 404);
  EXPECT_EQ(json::parse(rs[3].second)["error"]["type"], "not_found_error");
}

TEST(HttpTransport, WrongMethodIs405WithAllowAndOversizedHeadersAre431) {
  ServerConfig cfg;
  cfg.max_header_bytes = 4096;
  Served s(cfg);
  auto c = s.client();
  auto res = c.Get("/v1/chat/completions");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 405);
  EXPECT_EQ(res->get_header_value("Allow"), "POST");
  EXPECT_EQ(json::parse(res->body)["error"]["type"], "invalid_request_error");
  res = c.Post("/health", "{}", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 405);
  EXPECT_EQ(res->get_header_value("Allow"), "GET");
  res = c.Get("/health", {{"X-Big", std::string(8000, 'a')}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 431);
  EXPECT_TRUE(json::parse(res->body)["error"].is_object());
}

TEST(HttpTransport, TokenizeDetokenizeVersionPingAndModelById) {
  ServerConfig cfg;
  cfg.model_name = "org/m";
  cfg.context = 777;
  Served s(cfg);
  auto c = s.client();
  auto res = c.Post("/tokenize", json{{"prompt", "hello world"}, {"return_token_strs", true}}.dump(), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  auto j = json::parse(res->body);
  std::vector<int32_t> want = s.tok.encode("hello world");
  want.insert(want.begin(), *s.tok.bos_id());
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), want);
  EXPECT_EQ(j["count"], want.size());
  EXPECT_EQ(j["max_model_len"], 777);
  EXPECT_EQ(j["token_strs"].size(), want.size());
  res = c.Post("/tokenize", json{{"prompt", "hello world"}, {"add_special_tokens", false}}.dump(), "application/json");
  EXPECT_EQ(json::parse(res->body)["count"], want.size() - 1);
  // The chat form tokenizes exactly the prompt /v1/chat/completions runs.
  res = c.Post("/tokenize", json{{"messages", {{{"role", "user"}, {"content", "hi"}}}}}.dump(), "application/json");
  ASSERT_EQ(res->status, 200) << res->body;
  std::string rendered = s.tok.decode(json::parse(res->body)["tokens"].get<std::vector<int32_t>>());
  EXPECT_NE(rendered.find("hi"), std::string::npos);
  EXPECT_EQ(rendered.rfind(kBos, 0), 0u) << rendered;
  res = c.Post("/detokenize", json{{"tokens", s.tok.encode("round trip")}}.dump(), "application/json");
  ASSERT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body)["prompt"], "round trip");
  res = c.Post("/detokenize", json{{"tokens", {1, -3}}}.dump(), "application/json");
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(json::parse(res->body)["error"]["param"], "tokens[1]");
  res = c.Post("/tokenize", json{{"prompt", "x"}, {"model", "other"}}.dump(), "application/json");
  EXPECT_EQ(res->status, 404);
  res = c.Get("/version");
  ASSERT_EQ(res->status, 200);
  EXPECT_FALSE(json::parse(res->body)["version"].get<std::string>().empty());
  EXPECT_EQ(c.Get("/ping")->status, 200);
  EXPECT_EQ(c.Post("/ping", "", "text/plain")->status, 200);
  res = c.Get("/v1/models/org%2Fm");
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(json::parse(res->body)["id"], "org/m");
  EXPECT_EQ(c.Get("/v1/models/org/m")->status, 200);
  res = c.Get("/v1/models/nope");
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(json::parse(res->body)["error"]["code"], "model_not_found");
  res = c.Get("/v1/models");
  EXPECT_GT(json::parse(res->body)["data"][0]["created"].get<int64_t>(), 1700000000);
}

TEST(HttpTransport, RequestIdIsEchoedOrGenerated) {
  Served s;
  auto c = s.client();
  auto res = c.Post("/v1/completions", {{"X-Request-Id", "my-id-42"}}, completion_body(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->get_header_value("X-Request-Id"), "my-id-42");
  res = c.Get("/health");
  std::string a = res->get_header_value("X-Request-Id");
  std::string b = c.Get("/health")->get_header_value("X-Request-Id");
  EXPECT_GE(a.size(), 16u);
  EXPECT_NE(a, b);
  // Errors carry it too.
  EXPECT_EQ(c.Get("/nowhere", {{"X-Request-Id", "e1"}})->get_header_value("X-Request-Id"), "e1");
}

TEST(HttpTransport, CorsIsOffByDefaultAndOnWithAllowedOrigins) {
  const httplib::Headers preflight = {{"Origin", "http://app.example"}, {"Access-Control-Request-Method", "POST"},
                                      {"Access-Control-Request-Headers", "authorization, content-type"}};
  {
    Served s;
    auto c = s.client();
    auto res = c.Get("/v1/models", {{"Origin", "http://app.example"}});
    EXPECT_FALSE(res->has_header("Access-Control-Allow-Origin"));
    res = c.Options("/v1/chat/completions", preflight);
    EXPECT_EQ(res->status, 405);
  }
  ServerConfig cfg;
  cfg.allowed_origins = {"http://app.example"};
  cfg.api_key = "k";
  Served s(cfg);
  auto c = s.client();
  auto res = c.Options("/v1/chat/completions", preflight);  // no key needed for a preflight
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 204);
  EXPECT_EQ(res->get_header_value("Access-Control-Allow-Origin"), "http://app.example");
  EXPECT_NE(res->get_header_value("Access-Control-Allow-Methods").find("POST"), std::string::npos);
  EXPECT_EQ(res->get_header_value("Access-Control-Allow-Headers"), "authorization, content-type");
  res = c.Get("/v1/models", {{"Origin", "http://app.example"}, {"Authorization", "Bearer k"}});
  EXPECT_EQ(res->get_header_value("Access-Control-Allow-Origin"), "http://app.example");
  res = c.Get("/v1/models", {{"Origin", "http://evil.example"}, {"Authorization", "Bearer k"}});
  EXPECT_FALSE(res->has_header("Access-Control-Allow-Origin"));
  res = c.Options("/v1/chat/completions", {{"Origin", "http://evil.example"}, {"Access-Control-Request-Method", "POST"}});
  EXPECT_EQ(res->status, 403);
}

// Connections past --max-connections may still reach /health (a reserve); past the reserve
// they get a 503 at once.
TEST(HttpTransport, ConnectionLimitKeepsHealthAnswering) {
  ServerConfig cfg;
  cfg.max_connections = 4;
  Served s(cfg);
  std::vector<std::unique_ptr<RawConn>> held;
  for (int i = 0; i < 4; ++i) held.push_back(std::make_unique<RawConn>(s.port));
  while (s.metric("dsv4_http_connections") < 4) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  RawConn over(s.port);
  over.send_all(fmt::format("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}", completion_body().size(),
                            completion_body()));
  auto rs = responses(over.read_until(has_responses(1), 5));
  ASSERT_EQ(rs.size(), 1u);
  EXPECT_EQ(rs[0].first, 503);
  RawConn health(s.port);
  health.send_all("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  rs = responses(health.read_until(has_responses(1), 5));
  ASSERT_EQ(rs.size(), 1u);
  EXPECT_EQ(rs[0].first, 200);
  // Fill the reserve (64); the next connection is refused without being read.
  for (int i = 0; i < 70; ++i) held.push_back(std::make_unique<RawConn>(s.port));
  bool closed = false;
  auto got = held.back()->read_until(has_responses(1), 5, &closed);
  rs = responses(got);
  ASSERT_EQ(rs.size(), 1u) << got;
  EXPECT_EQ(rs[0].first, 503);
  // The reserve connection (kept alive) still reads the metrics.
  health.send_all("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  rs = responses(health.read_until(has_responses(1), 5));
  ASSERT_EQ(rs.size(), 1u);
  EXPECT_EQ(rs[0].first, 200);
  const std::string name = "\ndsv4_http_connections_rejected_total ";
  size_t at = rs[0].second.find(name);
  ASSERT_NE(at, std::string::npos);
  EXPECT_GE(std::stod(rs[0].second.substr(at + name.size())), 1);
}

// A streaming client that stops reading is dropped and its request aborted; the engine thread
// never waits for it and other requests keep being served.
TEST(HttpTransport, StalledStreamingClientIsAborted) {
  ServerConfig cfg;
  cfg.context = 1 << 22;
  cfg.write_timeout_s = 1;
  cfg.max_stream_buffer_bytes = 256 << 10;
  ScriptedEngine::Options eo;
  eo.context = cfg.context;
  eo.eos_probability = 0;
  eo.step_time = std::chrono::microseconds(20);
  Served s(cfg, eo);
  RawConn stalled(s.port, 4096);
  std::string body = json{{"prompt", "go"}, {"max_tokens", 3000000}, {"stream", true}}.dump();
  stalled.send_all(fmt::format("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}", body.size(), body));
  auto t0 = Clock::now();
  double disconnects = 0;
  while (ms_since(t0) < 20000 && (disconnects = s.metric("dsv4_client_disconnects_total")) < 1) {
    auto res = s.client().Post("/v1/completions", completion_body(), "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(disconnects, 1) << "the stalled stream was not dropped in " << ms_since(t0) << " ms";
  double running = 1;
  for (int i = 0; i < 100 && running > 0; ++i) {
    running = s.metric("dsv4_num_requests_running") + s.metric("dsv4_num_requests_waiting");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(running, 0);
}

// Defect 9: numeric flags refuse zero and negative values, naming the flag; --max-model-len
// above the model's context needs --allow-long-max-model-len; --chat-template takes only the
// built-in format.
TEST(ServeFlags, BadValuesAreRefusedNamingTheFlag) {
  for (std::string flag : {"--max-body-bytes", "--max-connections", "--io-threads", "--header-timeout", "--max-model-len",
                           "--default-max-tokens", "--shutdown-timeout", "--max-running-requests", "--scripted-step-ms",
                           "--stats-interval", "--write-timeout"}) {
    for (std::string value : {"0", "-5"}) {
      int status = 0;
      std::string out = run_serve(fmt::format("--port 0 {}={}", flag, value), 20, &status);
      EXPECT_NE(status, 0) << flag << " " << value << ": " << out;
      EXPECT_NE(status, 124) << flag << " " << value << " was accepted: " << out;
      EXPECT_NE(out.find(flag), std::string::npos) << out;
    }
  }
  int status = 0;
  std::string out = run_serve("--port 0 --max-model-len 100000000", 20, &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("--max-model-len"), std::string::npos) << out;
  EXPECT_NE(out.find("--allow-long-max-model-len"), std::string::npos) << out;
  out = run_serve("--port 0 --max-model-len 100000000 --allow-long-max-model-len --tool-call-parser deepseek_v4 "
                  "--reasoning-parser deepseek_v4 --chat-template deepseek_v4",
                  10, &status);
  EXPECT_NE(out.find("ready at"), std::string::npos) << out;
  EXPECT_NE(out.find("context 100000000 tokens"), std::string::npos) << out;
  EXPECT_NE(out.find("--tool-call-parser"), std::string::npos) << out;
  out = run_serve("--port 0 --chat-template /tmp/template.jinja", 20, &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("--chat-template"), std::string::npos) << out;
}
