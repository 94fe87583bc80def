#pragma once
// A deterministic stand-in Engine: no model, tokens are a pure function of (prompt, seed, sample,
// position), emitted one per step on an engine thread with real queueing, batching limits,
// logprobs, n, abort and metrics; stops and text go through the real engine's OutputProcessor. Used by the server tests (fast, reproducible
// under any concurrency) and by `dsv4 serve --engine scripted`.
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "engine/engine.h"
#include "text/tokenizer.h"

namespace dsv4 {

class ScriptedEngine : public Engine {
 public:
  struct Options {
    int64_t context = 4096;
    int32_t max_running = 64;
    std::chrono::microseconds step_time{1000};
    double eos_probability = 1.0 / 48;  // per generated token, unless ignore_eos
    int64_t blocks_total = 1024, block_size = 64;
  };
  ScriptedEngine(Tokenizer tok, Options opts);
  ~ScriptedEngine() override;
  std::string submit(Request req, EventSink sink) override;
  void abort(const std::string& id) override;
  EngineMetrics metrics() const override;
  void shutdown(bool drain) override;

 private:
  struct Sample;
  struct Live;
  void loop();
  int32_t pick(const Live& r, const Sample& s, uint64_t salt) const;
  TokenLogprob scripted_logprob(int32_t tok, uint64_t position, int32_t k) const;
  std::vector<TokenLogprob> scripted_prompt_logprobs(const Request& req) const;

  Tokenizer tok_;
  Options opts_;
  std::vector<int32_t> plain_;  // non-special token ids the script draws from
  std::optional<int32_t> eos_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Live>> waiting_;
  std::vector<std::shared_ptr<Live>> running_;
  std::vector<std::string> aborts_;
  bool accepting_ = true, stop_ = false, drain_ = true;
  uint64_t next_id_ = 0;
  EngineMetrics m_;
  std::thread thread_;
};

}  // namespace dsv4
