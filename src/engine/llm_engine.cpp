#include "engine/llm_engine.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>

#ifdef DSV4_HAVE_CUDA
#include "backend/cuda/nccl_communicator.h"
#endif
#include "engine/model_runner.h"
#include "engine/mtp_drafter.h"
#include "engine/output_processor.h"
#include "engine/sampler.h"
#include "engine/state_manager.h"
#include "model/checkpoint.h"
#include "model/parallel.h"
#include "model/tiny.h"
#include "text/tiny_tokenizer.h"
#include "util/error.h"
#include "util/log.h"

namespace dsv4 {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "none";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
  }
  return "?";
}

LoadedModel::~LoadedModel() {
  // Models reference their weights and backends, backends their devices' communicators: tear
  // down in reverse order of construction, each rank on its own thread.
  if (threads)
    threads->run([&](int r) {
      ranks[size_t(r)].model.reset();
      ranks[size_t(r)].backend.reset();
    });
  ranks.clear();
  comms.clear();
}

namespace {

std::unique_ptr<Backend> make_backend(const std::string& backend, int device) {
  if (backend == "cpu") return make_cpu_backend();
#ifdef DSV4_HAVE_CUDA
  if (backend == "cuda") return make_cuda_backend(device);
#endif
  (void)device;
  fail("--backend: '{}' is not available in this build (cpu{})", backend,
#ifdef DSV4_HAVE_CUDA
       ", cuda"
#else
       ""
#endif
  );
}

// Rank r of the group: its shard of the weights, backend (device r) and model, each built on the
// rank's own thread (a CUDA device is current per thread); rank 0 then leads the others. Without
// host data (shard shapes only), `prepare` fills each rank's weights on its backend before its
// Model is made.
void build_ranks(LoadedModel& m, const ModelConfig& c, const ModelWeights& full, const std::string& backend,
                 const ParallelConfig& par, const OffloadSpec& offload = {}, int64_t offload_reserve = 0,
                 const LoadedModel::PrepareRank& prepare = {}) {
  check_parallel(c, par);
  const int n = par.world();
  m.ranks.resize(size_t(n));
  if (offload.kind != OffloadSpec::Kind::None && n > 1)
    fail("--offload-experts: not with --tp/--ep (each rank holds only its share of the experts)");
  if (n == 1) {
    m.ranks[0].backend = make_backend(backend, 0);
    Backend& be = *m.ranks[0].backend;
    if (const auto plan = offload_experts(be, c, full, offload, offload_reserve))
      log_info("weights: {} ({:.2f} GiB kept free for state and activations)", describe(*plan),
               double(offload_reserve) / double(1 << 30));
    else if (offload.kind != OffloadSpec::Kind::None)
      log_info("--offload-experts: nothing to do on the {} backend (its weights are in host memory)", backend);
    if (prepare) prepare(0, be, full);
    m.ranks[0].model = std::make_unique<Model>(c, full, be);
    m.model = m.ranks[0].model.get();
    return;
  }
#ifdef DSV4_HAVE_CUDA
  if (backend == "cuda") m.comms = make_nccl_group(n);
#endif
  if (backend == "cpu") m.comms = make_thread_group(n);
  if (m.comms.empty()) make_backend(backend, 0);  // names the flag
  m.threads = std::make_unique<RankThreads>(n);
  m.threads->run([&](int r) {
    LoadedModel::Rank& rk = m.ranks[size_t(r)];
    rk.shard = std::make_unique<WeightShard>(c, full, par, r, /*materialize=*/!prepare);
    rk.backend = make_backend(backend, r);
#ifdef DSV4_HAVE_CUDA
    if (backend == "cuda") nccl_bind_stream(*m.comms[size_t(r)], *rk.backend);
#endif
    if (prepare) prepare(r, *rk.backend, rk.shard->weights());
    rk.model = std::make_unique<Model>(c, rk.shard->weights(), *rk.backend, ModelRank{par, m.comms[size_t(r)].get()});
  });
  std::vector<Model*> peers;
  for (int r = 1; r < n; ++r) peers.push_back(m.ranks[size_t(r)].model.get());
  m.model = m.ranks[0].model.get();
  m.model->set_peers(std::move(peers), m.threads.get());
}

}  // namespace

std::shared_ptr<LoadedModel> LoadedModel::load(const std::string& dir, const std::string& backend,
                                               const ParallelConfig& par, const OffloadSpec& offload,
                                               int64_t offload_reserve_bytes) {
  auto m = std::make_shared<LoadedModel>();
  m->checkpoint = Checkpoint::open(dir);
  build_ranks(*m, m->checkpoint->config(), m->checkpoint->weights(), backend, par, offload, offload_reserve_bytes);
  const auto tok = std::filesystem::path(dir) / "tokenizer.json";
  if (std::filesystem::exists(tok)) m->tokenizer = Tokenizer::load(tok.string());
  m->name = model_dir_name(dir);
  return m;
}

std::shared_ptr<LoadedModel> LoadedModel::from_weights(const ModelConfig& cfg, const ModelWeights& w,
                                                       const std::string& backend, const ParallelConfig& par,
                                                       const PrepareRank& prepare) {
  auto m = std::make_shared<LoadedModel>();
  build_ranks(*m, cfg, w, backend, par, {}, 0, prepare);
  m->name = "dsv4-weights";
  return m;
}

std::shared_ptr<LoadedModel> LoadedModel::demo(const std::string& preset, uint64_t seed, const ParallelConfig& par) {
  auto m = std::make_shared<LoadedModel>();
  m->generated = std::make_unique<GeneratedModel>(tiny_preset_config(preset), seed);
  const ModelConfig& c = m->generated->config();
  build_ranks(*m, c, m->generated->weights(), "cpu", par);
  m->tokenizer = Tokenizer::from_json(tiny_tokenizer_json(c.vocab_size, c.bos_token_id, c.eos_token_id),
                                      "<tiny tokenizer>");
  m->name = "dsv4-demo-" + preset;
  return m;
}

int64_t parse_memory_size(const std::string& text, const std::string& flag) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(uint8_t(text[i])) || text[i] == '.')) ++i;
  if (i == 0) fail("{}: '{}' is not a size (e.g. 4G, 512M, 1073741824)", flag, text);
  double v = 0;
  try {
    v = std::stod(text.substr(0, i));
  } catch (...) {
    fail("{}: '{}' is not a size", flag, text);
  }
  std::string unit = text.substr(i);
  for (auto& ch : unit) ch = char(std::toupper(uint8_t(ch)));
  double mul = 1;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mul = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mul = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") mul = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") mul = 1024.0 * 1024 * 1024 * 1024;
  else fail("{}: unknown unit '{}' in '{}' (use K, M, G or T)", flag, text.substr(i), text);
  const double bytes = v * mul;
  if (!(bytes >= 1) || bytes > 9e18) fail("{}: '{}' is out of range", flag, text);
  return int64_t(bytes);
}

namespace {

using Clock = std::chrono::steady_clock;

// Bytes of the state pool when no block count is forced: --kv-memory, else 256 MiB on the CPU.
// On CUDA, usable = gpu_memory_utilization x the device memory free now (after the weights'
// upload); the pool lives in the backend's activation arena, which the engine therefore sizes
// itself (the backend default, at most 8 GiB, is meant for activations alone): arena = state +
// headroom, headroom = min(8 GiB, usable / 2) for activations, state = --kv-memory or the rest
// of usable. Why: a pool sized from free memory alone would starve the activations (or not fit).
// With --tp/--ep every rank holds the whole state (model/parallel.h): the rank with the least
// free memory sizes it, and every rank's arena is sized alike.
int64_t state_budget(const EngineConfig& cfg, Model& model) {
  std::optional<size_t> free_b;
  std::mutex mu;
  model.on_every_rank([&](int, Model& m) {
    const std::optional<size_t> f = m.backend().device_free_bytes();
    std::lock_guard lk(mu);
    if (f) free_b = free_b ? std::min(*free_b, *f) : *f;
  });
  if (free_b) {
    const size_t usable = size_t(cfg.gpu_memory_utilization * double(*free_b));
    const size_t headroom = std::min<size_t>(size_t(8) << 30, usable / 2);
    size_t state = usable - headroom;
    if (cfg.kv_memory_bytes > 0) {
      state = size_t(cfg.kv_memory_bytes);
      if (state + headroom > *free_b)
        fail("--kv-memory: {} bytes of state plus {} bytes of activation headroom exceed the {} bytes free on the "
             "device",
             state, headroom, *free_b);
    }
    model.on_every_rank([&](int, Model& m) { m.backend().set_arena_bytes(state + headroom); });
    return int64_t(state);
  }
  return cfg.kv_memory_bytes > 0 ? cfg.kv_memory_bytes : int64_t(256) << 20;
}

struct RequestRec;

struct SeqRec {
  RequestRec* req = nullptr;
  int32_t index = 0;
  std::vector<int32_t> tokens;  // prompt, then generated (the last one not yet fed)
  int64_t prompt_len = 0;
  StateManager::Seq state;
  bool has_state = false;
  bool fork_pending = false;  // n > 1: waits for sample 0's prompt logits
  int64_t cached_tokens = -1;
  SamplerState sampler{0};
  std::optional<OutputProcessor> output;  // stops, length, text
  bool finished = false;
  // Speculative decoding: the MTP block's drafts for the positions after the last token, and
  // the distribution each was drawn from (empty for greedy requests).
  std::vector<int32_t> drafts;
  std::vector<std::vector<float>> draft_probs;
  int64_t computed() const { return has_state ? state.st.num_tokens : 0; }
  int32_t completion() const { return int32_t(output->completion_tokens()); }
};

struct RequestRec {
  Request req;
  EventSink sink;
  uint64_t arrival = 0;
  std::vector<std::unique_ptr<SeqRec>> samples;
  int32_t live = 0;
  std::vector<TokenLogprob> prompt_logprobs;  // scored so far: positions 1..size()
};

// Ordering of the waiting queue: priority (higher first), then arrival, then sample index.
struct WaitKey {
  int32_t neg_priority;
  uint64_t arrival;
  int32_t index;
  auto operator<=>(const WaitKey&) const = default;
};

class EngineImpl final : public LLMEngine {
 public:
  EngineImpl(const EngineConfig& cfg, std::shared_ptr<LoadedModel> lm) : cfg_(cfg), lm_(std::move(lm)) {
    if (!lm_ || !lm_->model) fail("make_engine: no model");
    Model& model = *lm_->model;
    const ModelConfig& mc = model.config();
    const int64_t g = model.block_granularity();
    int64_t B = cfg_.block_size;
    if (B <= 0) B = std::max<int64_t>(256 / g * g, g);
    if (B % g) fail("--block-size: {} must be a multiple of {} (every compress ratio of the model)", B, g);
    if (cfg_.max_running_requests <= 0) fail("--max-running-requests must be positive, got {}", cfg_.max_running_requests);
    if (cfg_.max_batched_tokens <= 0) fail("--max-batched-tokens must be positive, got {}", cfg_.max_batched_tokens);
    if (!(cfg_.gpu_memory_utilization > 0 && cfg_.gpu_memory_utilization <= 1))
      fail("--gpu-memory-utilization: must be in (0, 1], got {}", cfg_.gpu_memory_utilization);
    const KvFormat kv = cfg_.kv_fp8 ? KvFormat::FP8 : KvFormat::F32;
    check_speculative(mc);
    const bool mtp = cfg_.speculative_tokens > 0;
    const StateLayout layout = state_layout(mc, B, kv, mtp);
    StatePlan plan;
    plan.num_slots = cfg_.max_running_requests;
    if (cfg_.num_blocks > 0) {
      plan.num_blocks = cfg_.num_blocks;
      plan.num_snapshots = cfg_.num_snapshots >= 0 ? cfg_.num_snapshots : cfg_.num_blocks;
    } else {
      const int64_t budget = state_budget(cfg_, model);
      plan = plan_state(layout, budget, plan.num_slots, cfg_.enable_prefix_caching ? cfg_.snapshot_fraction : 0.0);
      if (cfg_.num_snapshots >= 0) plan.num_snapshots = cfg_.num_snapshots;
    }
    if (!cfg_.enable_prefix_caching) plan.num_snapshots = 0;
    mgr_ = std::make_unique<StateManager>(model, B, plan.num_blocks, plan.num_slots, plan.num_snapshots, kv, mtp);
    mgr_->set_caching(cfg_.enable_prefix_caching);
    runner_ = std::make_unique<ModelRunner>(model);
    if (mtp) drafter_ = std::make_unique<MtpDrafter>(model);
    capacity_tokens_ = plan.num_blocks * B;
    device_sampling_ = cfg_.device_sampling.value_or(model.backend().name() != "cpu");
    // A sequence cannot outgrow the state pool: the context is what the model allows, clamped to
    // what the pool holds, so longer requests are refused at submit rather than failing part-way.
    const int64_t asked = cfg_.max_model_len > 0 ? cfg_.max_model_len : mc.max_position_embeddings;
    max_model_len_ = asked > 0 ? std::min(asked, capacity_tokens_) : capacity_tokens_;
    if (cfg_.log_startup && max_model_len_ < asked)
      log_info("engine: max model length {} tokens: the state pool holds {} tokens ({} asked; raise --kv-memory or "
               "--gpu-memory-utilization for more)", max_model_len_, capacity_tokens_, asked);
    eos_.insert(int32_t(mc.eos_token_id));
    if (lm_->tokenizer)
      if (auto e = lm_->tokenizer->eos_id()) eos_.insert(*e);
    if (cfg_.log_startup)
      log_info(
          "engine: kv {} ({} B per window key / compressed entry), block {} tokens, {} blocks ({} B each, {:.2f} "
          "B/token), capacity {} tokens; {} sequence slots ({} B each), {} prefix snapshots ({} B each)",
          kv_format_name(kv), layout.kv_row_bytes, B, plan.num_blocks, layout.block_bytes, layout.bytes_per_token(),
          capacity_tokens_, plan.num_slots, layout.tail_bytes, plan.num_snapshots, layout.snapshot_bytes);
    publish_metrics();
    thread_ = std::thread([this] { loop(); });
  }

  ~EngineImpl() override { shutdown(false); }

  // Speculation needs an MTP block without compressed state (its drafts run ahead of the main
  // model and are never committed) and passes whose k + 1 rows fit every compressor window and
  // the sliding window (Model::accept_drafts restores rows by position).
  void check_speculative(const ModelConfig& mc) const {
    const int32_t k = cfg_.speculative_tokens;
    if (k == 0) return;
    if (k < 0 || k > 3) fail("--speculative-tokens: must be 0..3, got {}", k);
    if (mc.num_nextn_predict_layers < 1) fail("--speculative-tokens: the model has no MTP block");
    for (int64_t l = mc.num_hidden_layers; l < mc.total_layers(); ++l)
      if (mc.compress_ratio(l))
        fail("--speculative-tokens: the MTP block has compressed attention (ratio {}); only sliding-window MTP "
             "blocks are supported",
             mc.compress_ratio(l));
    for (int64_t l = 0; l < mc.num_hidden_layers; ++l)
      if (const int64_t r = mc.compress_ratio(l); r && k + 1 > r)
        fail("--speculative-tokens: {} drafts + 1 exceed compress ratio {}", k, r);
    if (k + 1 > mc.sliding_window) fail("--speculative-tokens: {} drafts + 1 exceed the window", k);
  }

  int64_t block_size() const override { return mgr_->block_tokens(); }
  int64_t block_bytes() const override { return mgr_->layout().block_bytes; }

  std::string submit(Request req, EventSink sink) override {
    using Kind = EngineError::Kind;
    const ModelConfig& mc = lm_->config();
    const SamplingParams& sp = req.sampling;
    if (req.prompt.empty()) reject(Kind::InvalidRequest, "prompt", "the prompt is empty");
    for (size_t i = 0; i < req.prompt.size(); ++i)
      if (req.prompt[i] < 0 || req.prompt[i] >= mc.vocab_size)
        reject(Kind::InvalidRequest, "prompt", "token id {} at position {} is out of range (vocab size {})", req.prompt[i], i, mc.vocab_size);
    if (sp.n < 1) reject(Kind::InvalidRequest, "n", "must be at least 1, got {}", sp.n);
    if (sp.n > cfg_.max_running_requests)
      reject(Kind::InvalidRequest, "n", "{} samples exceed --max-running-requests ({})", sp.n, cfg_.max_running_requests);
    if (sp.max_tokens < 0) reject(Kind::InvalidRequest, "max_tokens", "must be >= 0, got {}", sp.max_tokens);
    if (sp.max_tokens == 0 && sp.prompt_logprobs < 0)
      reject(Kind::InvalidRequest, "max_tokens", "0 generates nothing: only for prompt scoring (prompt logprobs)");
    if (!(sp.temperature >= 0)) reject(Kind::InvalidRequest, "temperature", "must be >= 0, got {}", sp.temperature);
    if (!(sp.top_p > 0 && sp.top_p <= 1)) reject(Kind::InvalidRequest, "top_p", "must be in (0, 1], got {}", sp.top_p);
    if (sp.top_k < 0 && sp.top_k != -1) reject(Kind::InvalidRequest, "top_k", "must be >= 0 (or -1 for off), got {}", sp.top_k);
    if (!(sp.min_p >= 0 && sp.min_p <= 1)) reject(Kind::InvalidRequest, "min_p", "must be in [0, 1], got {}", sp.min_p);
    if (!(sp.repetition_penalty > 0)) reject(Kind::InvalidRequest, "repetition_penalty", "must be > 0, got {}", sp.repetition_penalty);
    if (sp.logprobs > 20) reject(Kind::InvalidRequest, "logprobs", "at most 20 alternatives, got {}", sp.logprobs);
    if (sp.prompt_logprobs > 20)
      reject(Kind::InvalidRequest, "prompt_logprobs", "at most 20 alternatives, got {}", sp.prompt_logprobs);
    for (int32_t t : sp.stop_token_ids)
      if (t < 0 || t >= mc.vocab_size) reject(Kind::InvalidRequest, "stop_token_ids", "{} is out of range (vocab size {})", t, mc.vocab_size);
    for (const auto& s : sp.stop)
      if (s.empty()) reject(Kind::InvalidRequest, "stop", "stop strings must not be empty");
    if (!sp.stop.empty() && !lm_->tokenizer) reject(Kind::InvalidRequest, "stop", "stop strings need a tokenizer (the model has none)");
    const int64_t P = int64_t(req.prompt.size());
    if (P >= max_model_len_)
      reject(Kind::ContextLength, "prompt", "{} tokens do not fit the context of {} tokens ({})", P, max_model_len_,
             max_model_len_ == capacity_tokens_ ? "all the state pool holds: --kv-memory, --gpu-memory-utilization"
                                                : "--max-model-len");
    const int64_t total = std::min<int64_t>(P + sp.max_tokens, max_model_len_);
    if (total > capacity_tokens_)
      reject(Kind::ContextLength, "prompt", "the request needs state for {} tokens ({} prompt + {} max_tokens) but the whole pool holds {} "
           "tokens (raise --kv-memory)",
           total, P, sp.max_tokens, capacity_tokens_);
    auto rec = std::make_unique<RequestRec>();
    rec->sink = std::move(sink);
    std::unique_lock lk(mu_);
    if (stopping_) reject(Kind::Unavailable, "", "engine: shutting down, not accepting requests");
    if (req.id.empty()) req.id = fmt::format("req-{}", next_id_++);
    if (ids_.count(req.id)) reject(Kind::InvalidRequest, "", "request id '{}' is already in flight", req.id);
    ids_.insert(req.id);
    rec->req = std::move(req);
    rec->arrival = next_arrival_++;
    const std::string id = rec->req.id;
    ++inflight_;
    inbox_.push_back(std::move(rec));
    cv_.notify_all();
    return id;
  }

  void abort(const std::string& id) override {
    std::unique_lock lk(mu_);
    aborts_.push_back(id);
    cv_.notify_all();
  }

  EngineMetrics metrics() const override {
    std::unique_lock lk(mu_);
    return metrics_;
  }

  void shutdown(bool drain) override {
    {
      std::unique_lock lk(mu_);
      stopping_ = true;
      drain_ = drain;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

  void wait_idle() override {
    std::unique_lock lk(mu_);
    idle_cv_.wait(lk, [&] { return inflight_ == 0; });
  }

  void clear_prefix_cache() override {
    std::unique_lock lk(mu_);
    const uint64_t want = ++clear_requests_;
    cv_.notify_all();
    idle_cv_.wait(lk, [&] { return clear_done_ >= want || !thread_.joinable(); });
  }

 private:
  // ---- engine thread ----
  void loop() {
    for (;;) {
      std::vector<std::unique_ptr<RequestRec>> incoming;
      std::vector<std::string> aborts;
      bool stop = false, drain = false;
      uint64_t clears = 0;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] {
          return !inbox_.empty() || !aborts_.empty() || stopping_ || has_work_ || clear_requests_ > clear_done_;
        });
        incoming.swap(inbox_);
        aborts.swap(aborts_);
        stop = stopping_;
        drain = drain_;
        clears = clear_requests_;
      }
      for (auto& r : incoming) accept(std::move(r));
      for (const auto& id : aborts) abort_request(id, FinishReason::Abort, "");
      if (stop && !drain) {
        std::vector<std::string> all;
        for (auto& [id, r] : requests_) all.push_back(id);
        for (const auto& id : all) abort_request(id, FinishReason::Abort, "");
      }
      if (!running_.empty() || !waiting_.empty()) {
        try {
          step();
        } catch (const std::exception& e) {
          // A bug, not bad input: fail every request in flight rather than the process.
          std::vector<std::string> all;
          for (auto& [id, r] : requests_) all.push_back(id);
          for (const auto& id : all) abort_request(id, FinishReason::Error, e.what());
        }
      }
      graveyard_.clear();
      if (clears) mgr_->clear_cache();
      const bool work = !running_.empty() || !waiting_.empty();
      {
        std::unique_lock lk(mu_);
        has_work_ = work;
        clear_done_ = clears;
        for (const auto& id : done_ids_) ids_.erase(id);
        inflight_ -= int64_t(done_ids_.size());
        done_ids_.clear();
        fill_metrics();
        idle_cv_.notify_all();
        if (stop && !work && inbox_.empty()) break;
      }
    }
    std::unique_lock lk(mu_);
    // Requests submitted after the last pass (cannot happen once stopping_ is set) are dropped.
    idle_cv_.notify_all();
  }

  void accept(std::unique_ptr<RequestRec> r) {
    RequestRec* rp = r.get();
    const SamplingParams& sp = rp->req.sampling;
    const uint64_t fallback = Rng(cfg_.seed ^ (0x51ed2701ull * (rp->arrival + 1))).next_u64();
    for (int32_t i = 0; i < sp.n; ++i) {
      auto s = std::make_unique<SeqRec>();
      s->req = rp;
      s->index = i;
      s->tokens = rp->req.prompt;
      s->prompt_len = int64_t(rp->req.prompt.size());
      s->sampler = SamplerState(sample_seed(sp, i, fallback));
      if (sp.repetition_penalty != 1.0f) s->sampler.add_prompt(rp->req.prompt, lm_->config().vocab_size);
      s->output.emplace(lm_->tokenizer ? &*lm_->tokenizer : nullptr, sp, std::vector<int32_t>(eos_.begin(), eos_.end()),
                        std::min<int64_t>(sp.max_tokens, max_model_len_ - s->prompt_len));
      s->fork_pending = i > 0;
      rp->samples.push_back(std::move(s));
    }
    rp->live = sp.n;
    enqueue(rp->samples[0].get());
    prompt_tokens_total_ += int64_t(rp->req.prompt.size()) * sp.n;
    requests_.emplace(rp->req.id, std::move(r));
  }

  // Whether s still has prompt tokens to score: sample 0 scores the prompt for all samples.
  static bool scores_prompt(const SeqRec* s) {
    const RequestRec* r = s->req;
    return r->req.sampling.prompt_logprobs >= 0 && s->index == 0 && int64_t(r->prompt_logprobs.size()) + 1 < s->prompt_len;
  }

  WaitKey key(const SeqRec* s) const { return {-s->req->req.priority, s->req->arrival, s->index}; }
  void enqueue(SeqRec* s) { waiting_.emplace(key(s), s); }

  void finish_request_if_done(RequestRec* r) {
    if (r->live > 0) return;
    const std::string id = r->req.id;
    auto it = requests_.find(id);
    graveyard_.push_back(std::move(it->second));  // work items of this step may still point at it
    requests_.erase(it);
    done_ids_.push_back(id);  // released to callers with the metrics at the end of the pass
  }

  void drop_state(SeqRec* s) {
    if (s->has_state) {
      mgr_->release(s->state);
      s->has_state = false;
    }
    running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
    waiting_.erase(key(s));
  }

  void finish_seq(SeqRec* s, FinishReason why, const std::string& error, Event ev) {
    drop_state(s);
    s->finished = true;
    s->fork_pending = false;
    ev.request_id = s->req->req.id;
    ev.index = s->index;
    ev.finish = why;
    ev.error = error;
    ev.prompt_tokens = int32_t(s->prompt_len);
    ev.completion_tokens = s->completion();
    ev.cached_prompt_tokens = int32_t(std::max<int64_t>(0, s->cached_tokens));
    emit(s->req, ev);
    --s->req->live;
  }

  void emit(RequestRec* r, const Event& ev) {
    if (!r->sink) return;
    try {
      r->sink(ev);
    } catch (...) {
      // A sink must not take the engine down.
    }
  }

  void abort_request(const std::string& id, FinishReason why, const std::string& error) {
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    RequestRec* r = it->second.get();
    for (auto& s : r->samples)
      if (!s->finished) finish_seq(s.get(), why, error, Event{});
    if (why == FinishReason::Abort) ++requests_aborted_;
    ++requests_finished_;
    finish_request_if_done(r);
  }

  void preempt(SeqRec* s) {
    preempted_this_step_ = true;
    mgr_->release(s->state);
    s->has_state = false;
    s->drafts.clear();  // the MTP state is recomputed with the rest
    s->draft_probs.clear();
    running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
    enqueue(s);
    ++preemptions_;
  }

  // The running sequence to give up first: lowest priority, latest arrival.
  SeqRec* victim() const {
    SeqRec* v = nullptr;
    for (SeqRec* s : running_)
      if (!v || key(v) < key(s)) v = s;
    return v;
  }

  struct Work {
    SeqRec* seq;
    int64_t n;
  };

  // Reserves blocks for n more tokens of s, shrinking a prefill chunk or preempting other
  // sequences (latest first) when the pool runs out. Returns the tokens granted (0: s itself
  // was preempted or cannot run now).
  int64_t grant(SeqRec* s, int64_t n, std::vector<Work>& work, int64_t& budget, bool may_preempt) {
    const int64_t B = mgr_->block_tokens();
    for (;;) {
      const int64_t have = s->computed();
      if (mgr_->reserve(s->state, have + n)) return n;
      const int64_t fit = (int64_t(s->state.st.blocks.size()) + mgr_->available_blocks()) * B - have;
      if (fit > 0) {
        n = std::min(n, fit);
        continue;
      }
      if (!may_preempt) return 0;
      SeqRec* v = victim();
      if (!v) return 0;
      for (size_t i = 0; i < work.size(); ++i)
        if (work[i].seq == v) {
          budget += work[i].n;
          work.erase(work.begin() + long(i));
          break;
        }
      preempt(v);
      if (v == s) return 0;
    }
  }

  // A chunk ends at the next block boundary, so that the prefix cache can snapshot every
  // boundary (the snapshot is the slot state there; docs/ENGINE.md). Sequences are batched with
  // each other, so this only limits one sequence's prefill to a block per step.
  int64_t to_boundary(const SeqRec* s, int64_t n) const {
    const int64_t B = mgr_->block_tokens(), at = s->computed();
    return std::min(n, (at / B + 1) * B - at);
  }

  std::vector<Work> schedule() {
    std::vector<Work> work;
    int64_t budget = cfg_.max_batched_tokens;
    preempted_this_step_ = false;
    // Running sequences in arrival order: decodes first, then prefill chunks.
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<SeqRec*> order = running_;
      std::sort(order.begin(), order.end(), [&](SeqRec* a, SeqRec* b) { return key(a) < key(b); });
      for (SeqRec* s : order) {
        if (!s->has_state || budget <= 0) continue;
        if (std::find(running_.begin(), running_.end(), s) == running_.end()) continue;  // preempted
        const int64_t remaining = int64_t(s->tokens.size()) - s->computed();
        if ((remaining == 1) != (pass == 0)) continue;
        // A decode feeds its last token and its drafts (cut to what the budget and pool allow).
        const int64_t want = remaining == 1 ? 1 + int64_t(s->drafts.size()) : remaining;
        const int64_t n = to_boundary(s, grant(s, std::min(want, budget), work, budget, true));
        if (remaining == 1 && n > 0 && n - 1 < int64_t(s->drafts.size())) {
          s->drafts.resize(size_t(n - 1));
          s->draft_probs.resize(size_t(n - 1));
        }
        if (n > 0) {
          work.push_back({s, n});
          budget -= n;
        }
      }
    }
    // Admit waiting sequences in priority/arrival order; not in a step that had to preempt (the
    // pool is short: admitting would only preempt again next step).
    while (!preempted_this_step_ && !waiting_.empty() && budget > 0 && mgr_->free_slots() > 0 &&
           int64_t(running_.size()) < cfg_.max_running_requests) {
      SeqRec* s = waiting_.begin()->second;
      const int64_t B = mgr_->block_tokens(), len = int64_t(s->tokens.size());
      // Nothing can run if the pool cannot take even one more block for it.
      StateManager::Seq st = mgr_->acquire();
      const int64_t hit = scores_prompt(s) ? 0 : mgr_->lookup(s->tokens, (len - 1) / B);
      mgr_->attach(st, s->tokens, hit);
      s->state = std::move(st);
      s->has_state = true;
      const int64_t n = to_boundary(s, grant(s, std::min(len - s->computed(), budget), work, budget, false));
      if (n == 0) {
        mgr_->release(s->state);
        s->has_state = false;
        break;
      }
      waiting_.erase(waiting_.begin());
      if (s->cached_tokens < 0) {
        s->cached_tokens = std::min<int64_t>(hit * B, s->prompt_len);
        cached_prompt_tokens_total_ += s->cached_tokens;
      }
      running_.push_back(s);
      work.push_back({s, n});
      budget -= n;
    }
    return work;
  }

  // One step: the scheduled work runs as one batched forward pass (ModelRunner); every
  // sequence whose chunk reaches the end of its known tokens gets one token, or with drafts the
  // accepted drafts and one more. Tokens are decided first, then the model keeps the accepted
  // drafts, the MTP block catches up and drafts for the next step, completed blocks are
  // registered, and only then are tokens emitted (emitting may finish sequences and fork others).
  void step() {
    std::vector<Work> work = schedule();
    if (work.empty()) return;  // running sequences exist but none could be scheduled: transient
    const int64_t V = lm_->config().vocab_size;
    std::vector<ModelRunner::Item> items;
    std::vector<SeqRec*> seqs, dev_seqs, host_seqs;
    std::vector<size_t> host_items;  // index in items of each host_seqs entry
    std::vector<int64_t> pass_start;
    std::vector<float> params(work.size() * size_t(kSampleParams));
    for (const Work& w : work) {
      SeqRec* s = w.seq;
      if (s->finished || !s->has_state) continue;
      const int64_t at = s->computed();
      // Drafts are fed after the last token and taken off again once verified.
      s->tokens.insert(s->tokens.end(), s->drafts.begin(), s->drafts.end());
      ModelRunner::Item it;
      it.state = &s->state.st;
      it.tokens = std::span(s->tokens).subspan(size_t(at), size_t(w.n));
      it.sampled = at + w.n == int64_t(s->tokens.size());
      it.scored = scores_prompt(s);
      it.draft_rows = int64_t(s->drafts.size());
      it.keep_streams = bool(drafter_);
      it.on_device = it.sampled && !it.scored && !it.draft_rows && device_sampled(s);
      if (it.on_device) {
        const SamplingParams& sp = s->req->req.sampling;
        it.params = &params[items.size() * size_t(kSampleParams)];
        write_sample_params(sample_filter(sp), &params[items.size() * size_t(kSampleParams)]);
        it.uniform = draw_uniform(sp, s->sampler);  // drawn exactly when the host sampler would draw it
        dev_seqs.push_back(s);
      } else if (it.sampled || it.scored) {
        host_seqs.push_back(s);
        host_items.push_back(items.size());
      }
      items.push_back(it);
      seqs.push_back(s);
      pass_start.push_back(at);
    }
    ModelRunner::Result res;
    try {
      res = runner_->run(items, bool(cfg_.on_logits));
    } catch (const std::exception& e) {
      // The whole batch failed (a bug or a device error, not bad input): fail its requests.
      for (SeqRec* s : seqs) {
        s->tokens.resize(s->tokens.size() - s->drafts.size());
        abort_request(s->req->req.id, FinishReason::Error, e.what());
      }
      return;
    }

    // Decide every sampled sequence's new tokens.
    std::map<SeqRec*, Decided> decided;
    const size_t host0 = cfg_.on_logits ? dev_seqs.size() : 0;  // the hook also downloads device rows
    for (size_t i = 0; i < dev_seqs.size(); ++i) {
      SeqRec* s = dev_seqs[i];
      if (cfg_.on_logits)
        cfg_.on_logits(s->req->req.id, s->index, int64_t(s->tokens.size()) - 1,
                       std::span(res.host_logits).subspan(i * size_t(V), size_t(V)));
      ++device_sampled_tokens_;
      s->sampler.add_generated(res.device_tokens[i], V);
      decided[s].tokens.push_back(res.device_tokens[i]);
    }
    std::vector<int64_t> accepted;  // per sequence of res.drafts, in its order
    std::map<const SequenceState*, int64_t> accepted_of;
    size_t at_row = host0;
    for (size_t i = 0; i < host_seqs.size(); ++i) {
      SeqRec* s = host_seqs[i];
      const ModelRunner::Item& it = items[host_items[i]];
      const size_t rows = it.scored ? it.tokens.size() : size_t(it.draft_rows + 1);
      const auto logits = std::span(res.host_logits).subspan(at_row * size_t(V), rows * size_t(V));
      at_row += rows;
      if (it.scored) score_prompt(s, s->computed() - int64_t(rows), logits);
      if (!it.sampled) continue;
      Decided& d = decided[s];
      if (s->req->req.sampling.max_tokens == 0) {  // scoring only: the prompt was the work
        d.scoring_only = true;
        continue;
      }
      const auto sampled_rows = logits.last(size_t(it.draft_rows + 1) * size_t(V));
      if (s->index == 0 && s->completion() == 0 && s->req->req.sampling.n > 1)
        d.fork_row.assign(sampled_rows.begin(), sampled_rows.end());
      decide_tokens(s, sampled_rows, d);
      if (it.draft_rows) {
        accepted_of[&s->state.st] = int64_t(d.tokens.size()) - 1;
        draft_tokens_ += it.draft_rows;
        accepted_draft_tokens_ += int64_t(d.tokens.size()) - 1;
        ++speculative_steps_;
      }
    }
    for (const DraftCommit::Seq& d : res.drafts.seqs) accepted.push_back(accepted_of.at(d.state));
    lm_->model->accept_drafts(res.drafts, accepted);
    for (SeqRec* s : seqs) {
      s->tokens.resize(s->tokens.size() - s->drafts.size());
      s->drafts.clear();
      s->draft_probs.clear();
    }

    if (drafter_) draft(seqs, pass_start, res, decided);
    for (SeqRec* s : seqs)
      if (s->has_state) mgr_->register_blocks(s->state, s->tokens);

    for (SeqRec* s : seqs) {
      auto it = decided.find(s);
      if (it == decided.end()) continue;
      Decided& d = it->second;
      if (d.scoring_only) {
        finish_scored(s);
        continue;
      }
      emit_tokens(s, d.tokens, std::move(d.logprobs));
      if (!d.fork_row.empty()) start_forks(s->req, s, d.fork_row);
    }
  }

  // What a sampled sequence gets from a step: its new tokens (accepted drafts, then the target's
  // own token), their logprobs when asked for, and for the first token of n > 1 the logits row
  // its forks sample from.
  struct Decided {
    std::vector<int32_t> tokens;
    std::vector<TokenLogprob> logprobs;
    std::vector<float> fork_row;
    bool scoring_only = false;  // max_tokens 0 with prompt logprobs: finishes without a token
  };

  // Host sampling of s's rows (drafts + 1 of them): each draft is verified against its row in
  // order (the penalties see the drafts accepted before it); the first rejection gives the
  // replacement token; when all are accepted the last row gives one more.
  void decide_tokens(SeqRec* s, std::span<const float> rows, Decided& d) {
    const SamplingParams& sp = s->req->req.sampling;
    const int64_t V = lm_->config().vocab_size, drafts = int64_t(s->drafts.size());
    const int64_t first_pos = int64_t(s->tokens.size()) - 1 - drafts;
    for (int64_t j = 0; j <= drafts; ++j) {
      const auto row = rows.subspan(size_t(j * V), size_t(V));
      if (cfg_.on_logits) cfg_.on_logits(s->req->req.id, s->index, first_pos + j, row);
      DraftVerdict v;
      if (j < drafts) v = verify_draft(row, s->drafts[size_t(j)], s->draft_probs[size_t(j)], sp, s->sampler);
      else v.token = sample_token(row, sp, s->sampler);
      s->sampler.add_generated(v.token, V);
      d.tokens.push_back(v.token);
      if (sp.logprobs >= 0) d.logprobs.push_back(token_logprobs(row, v.token, sp.logprobs));
      if (!v.accepted) break;
    }
  }

  // The MTP block commits the positions this step completed, for every sequence of the pass, and
  // drafts for each sequence that got a token (as many as its next step may verify).
  void draft(const std::vector<SeqRec*>& seqs, const std::vector<int64_t>& pass_start, const ModelRunner::Result& res,
             const std::map<SeqRec*, Decided>& decided) {
    std::vector<MtpDrafter::Item> items;
    for (size_t i = 0; i < seqs.size(); ++i) {
      SeqRec* s = seqs[i];
      const SequenceState& st = s->state.st;
      auto d = decided.find(s);
      const std::vector<int32_t> none;
      const std::vector<int32_t>& fresh = d == decided.end() ? none : d->second.tokens;
      MtpDrafter::Item it;
      it.state = &s->state.st;
      it.pass_start = pass_start[i];
      it.stream_first = res.stream_first[i];
      const int64_t known = int64_t(s->tokens.size() + fresh.size());
      for (int64_t p = st.mtp_tokens + 1; p <= st.num_tokens && p < known; ++p)
        it.next_tokens.push_back(p < int64_t(s->tokens.size()) ? s->tokens[size_t(p)]
                                                               : fresh[size_t(p - int64_t(s->tokens.size()))]);
      it.drafts = fresh.empty() ? 0 : next_draft_count(s, int64_t(fresh.size()));
      it.params = &s->req->req.sampling;
      it.sampler = &s->sampler;
      items.push_back(std::move(it));
    }
    std::vector<MtpDrafter::Drafts> out = drafter_->run(items, res.streams);
    for (size_t i = 0; i < seqs.size(); ++i) {
      seqs[i]->drafts = std::move(out[i].tokens);
      seqs[i]->draft_probs = std::move(out[i].probs);
    }
  }

  // Drafts the next step of s may verify, `fresh` tokens being about to be appended: at most
  // --speculative-tokens, no more tokens than max_tokens and the context allow, and a verify pass
  // never crosses a block boundary (every boundary is reached exactly, so the prefix cache
  // snapshots it; unverified rows never complete a block).
  int32_t next_draft_count(const SeqRec* s, int64_t fresh) const {
    const int64_t N = s->state.st.num_tokens, len = int64_t(s->tokens.size()) + fresh, B = mgr_->block_tokens();
    int64_t k = cfg_.speculative_tokens;
    k = std::min(k, int64_t(s->req->req.sampling.max_tokens) - (s->completion() + fresh) - 1);
    k = std::min(k, max_model_len_ - len - 1);
    k = std::min(k, (N / B + 1) * B - N - 1);
    return int32_t(std::max<int64_t>(0, k));
  }

  // Whether s's next token is drawn by Backend::sample: requests without penalties and
  // logprobs, except the first token of n > 1 (its forks sample the same row on the host).
  bool device_sampled(const SeqRec* s) const {
    const SamplingParams& sp = s->req->req.sampling;
    return device_sampling_ && !needs_host_sampling(sp) && !(sp.n > 1 && s->index == 0 && s->completion() == 0);
  }

  // n > 1: the other samples share sample 0's prompt state (its full blocks; a copy of the rest).
  void start_forks(RequestRec* r, SeqRec* parent, const std::vector<float>& row) {
    for (auto& c : r->samples) {
      SeqRec* s = c.get();
      if (!s->fork_pending) continue;
      s->fork_pending = false;
      // The parent has already appended its first token: fork the prompt state only.
      const bool parent_live = parent->has_state && parent->state.st.num_tokens == s->prompt_len;
      if (parent_live && mgr_->free_slots() > 0 && int64_t(running_.size()) < cfg_.max_running_requests &&
          mgr_->fork(parent->state, s->state)) {
        s->has_state = true;
        s->cached_tokens = s->prompt_len;  // the whole prompt state is reused
        cached_prompt_tokens_total_ += s->cached_tokens;
        running_.push_back(s);
        sample_and_emit(s, row);
      } else {
        enqueue(s);  // recomputes its prompt (mostly from the prefix cache)
      }
    }
  }

  // Logprobs of the prompt tokens that rows [from, from + rows) predict (row p scores token p + 1).
  void score_prompt(SeqRec* s, int64_t from, std::span<const float> logits) {
    RequestRec* r = s->req;
    const int64_t V = lm_->config().vocab_size;
    for (int64_t p = from; p + 1 < s->prompt_len && p < from + int64_t(logits.size()) / V; ++p) {
      if (p != int64_t(r->prompt_logprobs.size())) continue;  // scored before a preemption
      r->prompt_logprobs.push_back(token_logprobs(logits.subspan(size_t((p - from) * V), size_t(V)),
                                                  s->tokens[size_t(p + 1)], r->req.sampling.prompt_logprobs));
    }
  }

  // max_tokens 0: every sample ends after the prompt, with its logprobs and no token.
  void finish_scored(SeqRec* s) {
    RequestRec* r = s->req;
    for (auto& c : r->samples) {
      if (c->finished) continue;
      Event ev;
      ev.prompt_logprobs = r->prompt_logprobs;
      c->fork_pending = false;
      finish_seq(c.get(), FinishReason::Length, "", std::move(ev));
    }
    ++requests_finished_;
    finish_request_if_done(r);
  }

  void sample_and_emit(SeqRec* s, const std::vector<float>& row) {
    RequestRec* r = s->req;
    const SamplingParams& sp = r->req.sampling;
    if (cfg_.on_logits) cfg_.on_logits(r->req.id, s->index, int64_t(s->tokens.size()) - 1, row);
    const int32_t tok = sample_token(row, sp, s->sampler);
    s->sampler.add_generated(tok, lm_->config().vocab_size);
    std::vector<TokenLogprob> logprobs;
    if (sp.logprobs >= 0) logprobs.push_back(token_logprobs(row, tok, sp.logprobs));
    emit_tokens(s, std::span(&tok, 1), std::move(logprobs));
  }

  // Appends sampled tokens (already counted by the sampler; several after a speculative step)
  // to s: the output processor consumes them up to the first that finishes the sample; one event.
  void emit_tokens(SeqRec* s, std::span<const int32_t> toks, std::vector<TokenLogprob> logprobs) {
    RequestRec* r = s->req;
    Event ev;
    if (s->completion() == 0 && r->req.sampling.prompt_logprobs >= 0) ev.prompt_logprobs = r->prompt_logprobs;
    OutputProcessor::Delta d = s->output->append(toks);
    s->tokens.insert(s->tokens.end(), toks.begin(), toks.begin() + d.consumed);
    generation_tokens_total_ += d.consumed;
    for (int32_t i = 0; i < d.consumed; ++i) gen_window_.emplace_back(Clock::now(), 1);
    if (logprobs.size() > size_t(d.consumed)) logprobs.resize(size_t(d.consumed));
    ev.logprobs = std::move(logprobs);
    ev.tokens = std::move(d.tokens);
    ev.text = std::move(d.text);
    if (d.finish == FinishReason::None) {
      ev.request_id = r->req.id;
      ev.index = s->index;
      emit(r, ev);
      return;
    }
    finish_seq(s, d.finish, "", std::move(ev));
    if (r->live == 0) {
      ++requests_finished_;
      finish_request_if_done(r);
    }
  }

  void fill_metrics() {  // under mu_
    EngineMetrics m;
    m.waiting = int64_t(waiting_.size());
    for (auto& [id, r] : requests_)
      for (auto& s : r->samples)
        if (s->fork_pending) ++m.waiting;
    m.running = int64_t(running_.size());
    m.blocks_total = mgr_->num_blocks();
    m.blocks_free = mgr_->free_blocks();
    m.blocks_cached = mgr_->evictable_blocks();
    m.capacity_tokens = capacity_tokens_;
    m.max_model_len = max_model_len_;
    m.prompt_tokens_total = prompt_tokens_total_;
    m.generation_tokens_total = generation_tokens_total_;
    m.prefix_hit_rate = prompt_tokens_total_ ? double(cached_prompt_tokens_total_) / double(prompt_tokens_total_) : 0;
    m.requests_finished = requests_finished_;
    m.requests_aborted = requests_aborted_;
    m.preemptions = preemptions_;
    m.device_sampled_tokens = device_sampled_tokens_;
    m.draft_tokens = draft_tokens_;
    m.accepted_draft_tokens = accepted_draft_tokens_;
    m.speculative_steps = speculative_steps_;
    if (speculative_steps_)
      m.mean_acceptance_length = double(accepted_draft_tokens_ + speculative_steps_) / double(speculative_steps_);
    const auto now = Clock::now();
    while (!gen_window_.empty() && now - gen_window_.front().first > std::chrono::seconds(10)) gen_window_.pop_front();
    if (!gen_window_.empty()) {
      const double span = std::max(1e-3, std::chrono::duration<double>(now - gen_window_.front().first).count());
      m.tokens_per_second = double(gen_window_.size()) / span;
    }
    metrics_ = m;
  }
  void publish_metrics() {
    std::unique_lock lk(mu_);
    fill_metrics();
  }

  EngineConfig cfg_;
  std::shared_ptr<LoadedModel> lm_;
  std::unique_ptr<StateManager> mgr_;
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<MtpDrafter> drafter_;  // speculative decoding only
  int64_t capacity_tokens_ = 0, max_model_len_ = 0;
  bool device_sampling_ = false;
  std::set<int32_t> eos_;

  // Engine thread only.
  std::map<std::string, std::unique_ptr<RequestRec>> requests_;
  std::map<WaitKey, SeqRec*> waiting_;
  std::vector<SeqRec*> running_;
  int64_t prompt_tokens_total_ = 0, cached_prompt_tokens_total_ = 0, generation_tokens_total_ = 0;
  int64_t requests_finished_ = 0, requests_aborted_ = 0, preemptions_ = 0, device_sampled_tokens_ = 0;
  int64_t draft_tokens_ = 0, accepted_draft_tokens_ = 0, speculative_steps_ = 0;
  std::deque<std::pair<Clock::time_point, int>> gen_window_;
  std::vector<std::unique_ptr<RequestRec>> graveyard_;
  std::vector<std::string> done_ids_;
  bool preempted_this_step_ = false;

  // Shared with callers.
  mutable std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::vector<std::unique_ptr<RequestRec>> inbox_;
  std::vector<std::string> aborts_;
  std::set<std::string> ids_;
  int64_t inflight_ = 0;
  uint64_t next_id_ = 0, next_arrival_ = 0, clear_requests_ = 0, clear_done_ = 0;
  bool stopping_ = false, drain_ = false, has_work_ = false;
  EngineMetrics metrics_;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<LLMEngine> make_engine(const EngineConfig& cfg, std::shared_ptr<LoadedModel> model) {
  return std::make_unique<EngineImpl>(cfg, std::move(model));
}

}  // namespace dsv4
