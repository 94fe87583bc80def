#pragma once
// The serving engine's public API, used by the HTTP server and the CLI (`dsv4 generate`).
// Requests are token-level: the server renders chat prompts and parses output with src/text.
// Everything the engine reports about a request reaches the caller as events on its stream.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "util/error.h"

namespace dsv4 {

// Why an engine refused a request in submit(): the server maps the kind to an HTTP status and
// an OpenAI error code, and `param` to the error's param field, without reading the message.
class EngineError : public Error {
 public:
  enum class Kind {
    InvalidRequest,  // a parameter is out of range or malformed (param names it)
    ContextLength,   // prompt + max_tokens exceed the context or the state pool
    Unavailable,     // shutting down
  };
  EngineError(Kind kind, std::string param, const std::string& msg)
      : Error(msg), kind(kind), param(std::move(param)) {}
  Kind kind;
  std::string param;
};

// Throws EngineError(kind, param, "<param>: <message>").
template <class... Args>
[[noreturn]] void reject(EngineError::Kind kind, const std::string& param, fmt::format_string<Args...> f,
                         Args&&... args) {
  const std::string what = fmt::format(f, std::forward<Args>(args)...);
  throw EngineError(kind, param, param.empty() ? what : param + ": " + what);
}

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;
  int32_t top_k = 0;  // 0: off
  float min_p = 0.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  std::optional<uint64_t> seed;  // reproducible per request regardless of batch mates
  int32_t max_tokens = 256;  // 0: no generation (prompt scoring)
  std::vector<int32_t> stop_token_ids;  // in addition to the model's EOS unless ignore_eos
  std::vector<std::string> stop;        // stop strings (matched on detokenized text, not included)
  bool ignore_eos = false;
  int32_t logprobs = -1;  // -1: none; k >= 0: chosen token's logprob and k top alternatives
  // -1: none; k >= 0: the logprob of every prompt token after the first, with k alternatives
  // (scoring, as lm-eval's loglikelihood; the prompt is computed whole, not from the prefix cache).
  int32_t prompt_logprobs = -1;
  int32_t n = 1;          // parallel samples sharing the prompt state
};

struct Request {
  std::string id;  // unique; engine assigns one when empty
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t priority = 0;
};

enum class FinishReason { None, Stop, Length, Abort, Error };
const char* finish_reason_name(FinishReason r);

struct TokenLogprob {
  int32_t token;
  float logprob;
  std::vector<std::pair<int32_t, float>> top;  // top alternatives, best first
};

// One step's output for one sample (index < n) of a request.
struct Event {
  std::string request_id;
  int32_t index = 0;
  std::vector<int32_t> tokens;  // new tokens this step (after stop handling)
  std::string text;             // their detokenized text (complete UTF-8 only)
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt_logprobs;  // first event of each sample: prompt positions 1..P-1
  FinishReason finish = FinishReason::None;
  std::string error;  // when finish == Error
  // Usage, filled on the final event of each sample.
  int32_t prompt_tokens = 0, completion_tokens = 0, cached_prompt_tokens = 0;
};

// Called from the engine thread; must not block for long.
using EventSink = std::function<void(const Event&)>;

struct EngineMetrics {
  int64_t waiting = 0, running = 0;
  int64_t blocks_total = 0, blocks_free = 0, blocks_cached = 0;
  int64_t capacity_tokens = 0;
  int64_t max_model_len = 0;  // longest sequence accepted: the model's context clamped to the pool
  double prefix_hit_rate = 0;  // cached prompt tokens / prompt tokens
  int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
  int64_t requests_finished = 0, requests_aborted = 0, preemptions = 0;
  int64_t device_sampled_tokens = 0;  // tokens drawn by Backend::sample (not on the host)
  // Speculative decoding: draft tokens verified, how many of them were accepted, and the passes
  // that verified drafts (per sequence). Mean acceptance length = tokens per such pass.
  int64_t draft_tokens = 0, accepted_draft_tokens = 0, speculative_steps = 0;
  double mean_acceptance_length = 0;  // (accepted_draft_tokens + speculative_steps) / speculative_steps
  double tokens_per_second = 0;  // generation, recent
};

class Engine {
 public:
  virtual ~Engine() = default;
  // Throws Error (naming the parameter) for a request that can never run, e.g. longer than the
  // whole pool or the context; otherwise queues it and returns its id.
  virtual std::string submit(Request req, EventSink sink) = 0;
  // Aborts a queued or running request; frees its state; its sink receives a final Abort event.
  virtual void abort(const std::string& id) = 0;
  virtual EngineMetrics metrics() const = 0;
  // Stops accepting, finishes (drain) or aborts in-flight requests, joins the engine thread.
  virtual void shutdown(bool drain) = 0;
};

}  // namespace dsv4
