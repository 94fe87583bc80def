// dsv4 bench model --random: a full-width DeepSeek-V4-Flash model with N layers and its MTP block
// of random weights built directly on the GPU (no checkpoint), timed for prefill and decode, with
// the bytes/FLOPs roofline of the same shapes and per-op times next to cuBLASLt. With --spec-accept:
// decode with and without speculative decoding (cli/bench_spec.h), on the GPU or, with a tiny
// preset, on the CPU.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "cli/args.h"
#include "cli/bench_costs.h"
#include "cli/bench_spec.h"
#include "cli/commands.h"
#include "backend/communicator.h"
#include "engine/llm_engine.h"
#include "engine/state_manager.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/parallel.h"
#include "model/tiny.h"
#include "util/log.h"
#include "util/random.h"
#ifdef DSV4_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace dsv4::cli {

#ifdef DSV4_HAVE_CUDA
namespace {

template <class... A>
void out(fmt::format_string<A...> f, A&&... a) {
  std::fputs((fmt::format(f, std::forward<A>(a)...) + "\n").c_str(), stdout);
  std::fflush(stdout);
}

nlohmann::json flash_config(int64_t layers) {
  nlohmann::json c = tiny_preset_config("tiny");
  c.erase("layer_types");
  c["vocab_size"] = 129280;
  c["hidden_size"] = 4096;
  c["num_hidden_layers"] = layers;
  c["num_attention_heads"] = 64;
  c["head_dim"] = 512;
  c["qk_rope_head_dim"] = 64;
  c["q_lora_rank"] = 1024;
  c["o_lora_rank"] = 1024;
  c["o_groups"] = 8;
  c["moe_intermediate_size"] = 2048;
  c["n_routed_experts"] = 256;
  c["num_experts_per_tok"] = 6;
  c["num_hash_layers"] = std::min<int64_t>(3, layers);
  c["sliding_window"] = 128;
  c["index_n_heads"] = 64;
  c["index_head_dim"] = 128;
  c["index_topk"] = 512;
  c["num_nextn_predict_layers"] = 1;  // the MTP block: a sliding-window layer, as in the checkpoint
  c["max_position_embeddings"] = 1048576;
  c["rope_scaling"] = {{"type", "yarn"}, {"factor", 16.0}, {"original_max_position_embeddings", 65536},
                       {"beta_fast", 32}, {"beta_slow", 1}};
  std::vector<int64_t> ratios;
  for (int64_t i = 0; i < layers; ++i) ratios.push_back(i < 2 ? 0 : (i % 2 == 0 ? 4 : 128));
  ratios.push_back(0);
  c["compress_ratios"] = ratios;
  return c;
}

// Hands out tensors without host data; remembers how to fill them on the device.
class RandomProvider final : public TensorProvider {
 public:
  explicit RandomProvider(int64_t experts) : experts_(experts) {}
  const TensorData* provide(const TensorRequest& r) override {
    TensorData t;
    t.name = r.name;
    t.dtype = r.dtypes.at(0);
    t.shape = r.shape;
    int64_t n = 1;
    for (auto d : r.shape) n *= d;
    t.nbytes = t.dtype == DType::FP4_E2M1 ? size_t(n) : dtype_bytes(t.dtype, size_t(n));
    views_.push_back(t);
    specs.push_back({&views_.back(), r.init, r.init == Init::TokenToExpert ? experts_ : r.fan_in});
    bytes += t.nbytes;
    return &views_.back();
  }
  std::vector<RandomTensorSpec> specs;
  size_t bytes = 0;

 private:
  int64_t experts_;
  std::deque<TensorData> views_;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Keys each query attends to at context position p (window + compressed selection).
double attended_keys(const ModelConfig& c, int64_t layer, double p) {
  const int64_t r = c.compress_ratio(layer);
  double k = std::min<double>(double(c.sliding_window), p + 1);
  if (r == c.compress_rate_csa) k += std::min<double>(double(c.index_topk), std::floor((p + 1) / r));
  else if (r) k += std::floor((p + 1) / r);
  return k;
}

// Rank r's share of the random weights (`full`'s specs, keyed by their position there so that
// tensors every rank holds get the same values on each).
std::vector<RandomTensorSpec> rank_specs(const std::vector<RandomTensorSpec>& full, const ModelWeights& shard) {
  std::unordered_map<std::string, size_t> by_name;
  for (size_t i = 0; i < full.size(); ++i) by_name.emplace(full[i].t->name, i);
  std::unordered_set<const TensorData*> seen;
  std::vector<RandomTensorSpec> specs;
  for (const TensorData* t : weight_tensors(shard)) {
    if (!seen.insert(t).second) continue;
    const auto it = by_name.find(t->name);
    if (it == by_name.end()) fail("bench: rank tensor '{}' is not in the model", t->name);
    RandomTensorSpec r = full[it->second];
    r.t = t;
    r.key = int64_t(it->second);
    specs.push_back(r);
  }
  return specs;
}

int run_bench(int64_t layers, std::vector<int64_t> batches, std::vector<int64_t> ctxs, std::vector<int64_t> seq_counts,
              int steps, bool kv_fp8, bool fp8_act, bool ops, bool graphs, const SpecBenchOptions* spec,
              const OffloadSpec& offload, int64_t offload_reserve, const ParallelConfig& par, int64_t prefill_chunk) {
  const CudaDeviceInfo dev = cuda_device_info(0);
  const double bw = dev.mem_bandwidth_gbs * 1e9;
  // H200 SXM dense peaks (datasheet): FP8 tensor 1979 TFLOP/s, FP32 (non-tensor) 67 TFLOP/s.
  const double peak_fp8 = 1979e12, peak_fp32 = 67e12;
  out("device: {} (sm_{}{}, {} SMs, {:.1f} GiB, {:.0f} GB/s theoretical)", dev.name, dev.sm_major, dev.sm_minor,
      dev.sms, double(dev.total_bytes) / (1 << 30), dev.mem_bandwidth_gbs);
  auto cj = flash_config(layers);
  ModelConfig cfg = parse_model_config(cj, "bench:flash");
  check_parallel(cfg, par);
  RandomProvider prov(cfg.n_routed_experts);
  ModelWeights w = bind_weights(cfg, prov);
  out("model: {} layers + MTP block full width (DeepSeek-V4-Flash shapes), random weights: {:.2f} GiB", layers,
      double(prov.bytes) / (1 << 30));
  const int world = par.world();
  // One GPU: this backend and model. --tp/--ep: the engine's group of ranks (device r each, NCCL),
  // each rank's shard generated on its device; `be` and `model` are then rank 0's.
  std::unique_ptr<Backend> single;
  std::shared_ptr<LoadedModel> group;
  std::optional<ExpertOffloadPlan> plan;
  if (world == 1) {
    CudaOptions opts;
    opts.arena_bytes = SIZE_MAX;
    single = make_cuda_backend(0, opts);
    plan = offload_experts(*single, cfg, w, offload, offload_reserve);
  } else {
    if (offload.kind != OffloadSpec::Kind::None) fail("--offload-experts: not with --tp/--ep");
    double t_gen = now_s();
    group = LoadedModel::from_weights(cfg, w, "cuda", par, [&](int, Backend& rb, const ModelWeights& shard) {
      cuda_random_weights(rb, rank_specs(prov.specs, shard), 1234);
      // Activations and state take what is free, less room for NCCL's lazily allocated buffers.
      const size_t free_b = rb.device_free_bytes().value_or(0), room = size_t(3) << 30;
      rb.set_arena_bytes(free_b > 2 * room ? size_t(double(free_b - room) * 0.95) : free_b / 2);
    });
    out("{} ranks (--tp {} --ep {}, NCCL): rank 0 holds {:.2f} GiB of weights; generated on the devices in {:.2f} s",
        world, par.tp, par.ep, double(group->ranks[0].shard->bytes()) / (1 << 30), now_s() - t_gen);
  }
  Backend* const be = single ? single.get() : &group->model->backend();
  if (plan) {
    const double gbs = cuda_host_to_device_gbs(size_t(256) << 20);
    out("weights: {}", describe(*plan));
    out("host-to-device copies (pinned, measured now): {:.1f} GB/s; the offloaded experts of one decoded token: "
        "{:.2f} ms at that rate", gbs, plan->bus_bytes_per_token / (gbs * 1e6));
  }
  // Expert cache traffic of the forwards since `before` (host-resident experts only): hit rate,
  // bytes fetched per forward and the bus rate they imply over the forward's median time.
  auto cache_note = [&](const CudaExpertCacheStats& before, int64_t forwards, double ms) {
    if (!plan || plan->layers.empty()) return;
    const CudaExpertCacheStats now = cuda_expert_cache_stats(*be);
    const double hits = double(now.hits - before.hits), misses = double(now.misses - before.misses);
    const double fetched = misses * double(now.slot_bytes) / double(forwards);
    out("|  | expert cache ({} slots): {:.1f} % hits, {:.1f} MB fetched per forward ({:.1f} GB/s over its {:.2f} ms) |",
        now.slots, hits + misses > 0 ? 100.0 * hits / (hits + misses) : 0.0, fetched / 1e6, fetched / (ms * 1e6), ms);
    if (now.overflows) fail("expert cache: {} passes needed more experts than slots", now.overflows);
  };
  double t0 = now_s();
  std::unique_ptr<Model> single_model;
  if (single) {
    cuda_random_weights(*be, prov.specs, 1234);
    out("weights generated on the device in {:.2f} s", now_s() - t0);
    single_model = std::make_unique<Model>(cfg, w, *be);
  }
  Model& model = single ? *single_model : *group->model;
  // Per-GPU quantities (roofline, per-op table) come from rank 0's weights.
  const ModelWeights& w0 = single ? w : group->ranks[0].shard->weights();
  model.on_every_rank([&](int, Model& m) {
    m.set_kv_fp8(kv_fp8);
    m.set_decode_graphs(graphs);
  });
  model.set_fp8_activations(fp8_act);
  // Every rank's device work done (rank 0 alone can finish its step before the peers do).
  auto sync_all = [&] { model.on_every_rank([](int, Model& m) { m.backend().synchronize(); }); };
  out("linears: {}", fp8_act ? "FP8 activations (1x128, ue8m0 scales), tensor-core GEMMs" : "exact (FP32 activations)");

  // Roofline inputs.
  std::vector<LayerCost> lc;
  for (const auto& b : w0.layers) lc.push_back(layer_cost(b, cfg));
  const size_t head_bytes = w0.head->nbytes + w0.hc_head.fn->nbytes;
  const double heads = double(cfg.num_attention_heads / par.tp);  // attention heads per GPU
  const double head_macs = double(cfg.vocab_size) * double(cfg.hidden_size);
  const double E = double(cfg.n_routed_experts), K = double(cfg.num_experts_per_tok);
  auto step_roofline = [&](int64_t B, double ctx, double& bytes, double& flops) {
    bytes = pass_weight_bytes(cfg, w0, double(B), false);
    flops = 2.0 * head_macs * double(B);
    for (size_t l = 0; l < lc.size(); ++l) {
      const double keys = attended_keys(cfg, int64_t(l), ctx);
      bytes += double(B) * keys * double(cfg.head_dim) * 4.0;  // the keys each row attends to
      flops += double(B) * (2.0 * lc[l].macs + 4.0 * heads * double(cfg.head_dim) * keys);
      if (cfg.compress_ratio(int64_t(l)) == cfg.compress_rate_csa)
        flops += double(B) * 2.0 * double(cfg.index_n_heads * cfg.index_head_dim) * std::floor(ctx / 4);
    }
  };
  auto prefill_roofline = [&](int64_t C, double& bytes, double& flops) {
    const double passes = double((C + prefill_chunk - 1) / prefill_chunk);  // each chunk reads the weights again
    bytes = double(head_bytes) + double(cfg.vocab_size) * 4.0;  // logits of the last row only, as the engine
    flops = 2.0 * head_macs;
    for (size_t l = 0; l < lc.size(); ++l) {
      bytes += passes * (double(lc[l].fixed) + E * lc[l].expert_share * double(lc[l].expert));
      for (int64_t p = 0; p < C; p += 64) {
        const double keys = attended_keys(cfg, int64_t(l), double(p));
        double f = 2.0 * lc[l].macs + 4.0 * heads * double(cfg.head_dim) * keys;
        if (cfg.compress_ratio(int64_t(l)) == cfg.compress_rate_csa)
          f += 2.0 * double(cfg.index_n_heads * cfg.index_head_dim) * std::floor(double(p) / 4);
        flops += 64.0 * f;
      }
    }
  };

  // Warm-up (kernel attributes, arena).
  {
    SequenceState st = model.new_sequence(64);
    std::vector<int32_t> tok(16, 7);
    model.forward(st, tok);
    sync_all();
  }
  if (spec) {
    run_spec_bench(model, *spec);
    out("arena peak: {:.2f} GiB", double(cuda_arena_peak(*be)) / (1 << 30));
    return 0;
  }
  // A prompt as the engine runs it: in chunks of at most prefill_chunk tokens (a whole long prompt's
  // activations would not fit), logits of its last row only.
  auto prefill = [&](SequenceState& st, const std::vector<int32_t>& tokens) {
    const std::span<const int32_t> all(tokens);
    for (size_t at = 0; at < all.size(); at += size_t(prefill_chunk)) {
      const auto chunk = all.subspan(at, std::min(all.size() - at, size_t(prefill_chunk)));
      const ForwardSeq one{&st, chunk, at + chunk.size() == all.size() ? 1 : 0, 0};
      model.forward(std::span(&one, 1));
    }
  };
  Rng rng(7);
  std::map<std::pair<int64_t, int64_t>, double> one_seq_ms;  // (ctx, B) -> decode step ms
  out("");
  out("| phase | tokens | ctx | time ms (median) | tok/s | per layer ms | roofline ms (bytes / FP8 FLOPs / FP32 FLOPs) | "
      "ratio to BW roofline | ratio to FP32 roofline |");
  out("|---|---|---|---|---|---|---|---|---|");
  for (int64_t C : ctxs) {
    int64_t decode_tokens = 0;
    for (int64_t B : batches) decode_tokens += int64_t(steps + 1) * B;
    SequenceState st = model.new_sequence(C + decode_tokens + 8);
    std::vector<int32_t> tok(C);
    for (auto& x : tok) x = int32_t(rng.below(uint64_t(cfg.vocab_size)));
    sync_all();
    const CudaExpertCacheStats before_prefill = cuda_expert_cache_stats(*be);
    t0 = now_s();
    prefill(st, tok);
    sync_all();
    const double pms = (now_s() - t0) * 1e3;
    double by, fl;
    prefill_roofline(C, by, fl);
    const double rb = by / bw * 1e3, r8 = fl / peak_fp8 * 1e3, r32 = fl / peak_fp32 * 1e3;
    out("| prefill | {} | 0 | {:.1f} | {:.0f} | {:.2f} | {:.2f} / {:.2f} / {:.1f} | {:.3f} | {:.3f} |", C, pms,
        double(C) / pms * 1e3, pms / double(layers), rb, r8, r32, std::max(rb, r8) / pms, std::max(rb, r32) / pms);
    cache_note(before_prefill, 1, pms);
    for (int64_t B : batches) {
      std::vector<double> v;
      const CudaExpertCacheStats before = cuda_expert_cache_stats(*be);
      for (int s = 0; s <= steps; ++s) {
        std::vector<int32_t> t(B);
        for (auto& x : t) x = int32_t(rng.below(uint64_t(cfg.vocab_size)));
        sync_all();
        const double a = now_s();
        model.forward(st, t);
        sync_all();
        if (s > 0) v.push_back((now_s() - a) * 1e3);
      }
      const double ms = median(v);
      step_roofline(B, double(st.num_tokens), by, fl);
      const double db = by / bw * 1e3, d8 = fl / peak_fp8 * 1e3, d32 = fl / peak_fp32 * 1e3;
      out("| decode B={} | {} | {} | {:.2f} | {:.0f} | {:.3f} | {:.2f} / {:.3f} / {:.2f} | {:.3f} | {:.3f} |", B, B,
          st.num_tokens, ms, double(B) / ms * 1e3, ms / double(layers), db, d8, d32, std::max(db, d8) / ms,
          std::max(db, d32) / ms);
      one_seq_ms[{C, B}] = ms;
      cache_note(before, steps + 1, ms);
    }
    // S sequences at context C, one token each per step, as the engine batches them: one parent
    // prefilled, the others forked from it (full blocks shared, slot state and partial block copied).
    for (int64_t S : seq_counts) {
      const int64_t B = 256, per_seq = (C + steps + 2 + B - 1) / B;
      StateManager mgr(model, B, S * (per_seq + 1), S, 0, kv_fp8 ? KvFormat::FP8 : KvFormat::F32);
      std::vector<StateManager::Seq> seqs(static_cast<size_t>(S));
      seqs[0] = mgr.acquire();
      if (!mgr.reserve(seqs[0], C + steps + 2)) fail("bench: state pool too small");
      prefill(seqs[0].st, tok);
      for (int64_t i = 1; i < S; ++i)
        if (!mgr.fork(seqs[0], seqs[size_t(i)]) || !mgr.reserve(seqs[size_t(i)], C + steps + 2))
          fail("bench: state pool too small");
      std::vector<double> v;
      std::vector<int32_t> t(static_cast<size_t>(S));
      const CudaExpertCacheStats before = cuda_expert_cache_stats(*be);
      for (int s = 0; s <= steps; ++s) {
        std::vector<ForwardSeq> batch;
        for (int64_t i = 0; i < S; ++i) {
          t[size_t(i)] = int32_t(rng.below(uint64_t(cfg.vocab_size)));
          batch.push_back({&seqs[size_t(i)].st, std::span(t).subspan(size_t(i), 1), 1, 0});
        }
        sync_all();
        const double a = now_s();
        model.forward(batch);
        sync_all();
        if (s > 0) v.push_back((now_s() - a) * 1e3);
      }
      const double ms = median(v);
      step_roofline(S, double(C), by, fl);
      const double db = by / bw * 1e3, d8 = fl / peak_fp8 * 1e3, d32 = fl / peak_fp32 * 1e3;
      const auto same = one_seq_ms.find({C, S});
      out("| decode {} seqs | {} | {} | {:.2f} | {:.0f} | {:.3f} | {:.2f} / {:.3f} / {:.2f} | {:.3f} | {:.3f} |{}", S,
          S, C, ms, double(S) / ms * 1e3, ms / double(layers), db, d8, d32, std::max(db, d8) / ms,
          std::max(db, d32) / ms,
          same == one_seq_ms.end() ? std::string()
                                   : fmt::format(" {:.3f}x the time of decode B={}", ms / same->second, S));
      cache_note(before, steps + 1, ms);
      for (auto& q : seqs) mgr.release(q);
    }
  }
  if (group) {
    // The step's collectives: all-reduce sums of [T, hidden] F32 rows, every rank at once.
    const int per_layer = par.tp > 1 ? 2 : 1;  // docs/ENGINE.md, "Collectives per layer"
    out("");
    out("| all-reduce [T, {}] F32, {} ranks (NCCL) | us per call (median of 20) | per decode step: {} x {} layers, ms |",
        cfg.hidden_size, world, per_layer, layers);
    out("|---|---|---|");
    for (int64_t T : {int64_t(1), int64_t(16), int64_t(64), int64_t(1024)}) {
      std::vector<double> us(static_cast<size_t>(world));
      group->threads->run([&](int r) {
        Backend& rb = *group->ranks[size_t(r)].backend;
        Communicator& comm = *group->comms[size_t(r)];
        Tensor t = rb.alloc({T, cfg.hidden_size});
        rb.fill(t, 1e-3f);
        comm.all_reduce_sum(t);  // warm-up
        rb.synchronize();
        std::vector<double> v;
        for (int i = 0; i < 20; ++i) {
          const double a = now_s();
          comm.all_reduce_sum(t);
          rb.synchronize();
          v.push_back((now_s() - a) * 1e6);
        }
        us[size_t(r)] = median(v);
      });
      const double call = *std::max_element(us.begin(), us.end());
      out("| T = {} | {:.1f} | {:.2f} |", T, call, call * per_layer * double(layers) * 1e-3);
    }
  }
  out("");
  out("decode B = B tokens appended to one sequence per step (same GEMM/MoE shapes as B single-token sequences);");
  out("decode S seqs = S sequences at context ctx, one token each, in one batched forward pass.");
  out("arena peak: {:.2f} GiB", double(cuda_arena_peak(*be)) / (1 << 30));
  const CudaGraphStats gs = cuda_graph_stats(*be);
  out("cuda graphs {}: {} decode steps captured, {} replays; a captured step holds {} kernels ({} graph nodes): the "
      "launches one decode step makes without graphs",
      graphs ? "on" : "off", gs.captures, gs.replays, gs.kernels, gs.nodes);
  if (!ops) return 0;

  // Per-op: our kernels in exact mode and with FP8 activations (each GEMM path), next to cuBLASLt
  // on the same shapes. Device time per call (cuda_device_ms: calls queued back to back, host
  // launch gaps excluded); call i uses copy i % R of the weight (the op of every layer, or
  // expert i of the layer) so that decode-sized calls stream the weights from HBM, not from the
  // 50 MB L2. FP8-activation times include the quantiser. The cuBLASLt BF16 reference multiplies
  // one constant weight buffer (L2-resident when it fits: below 50 MB it reads from L2).
  out("");
  out("Per op (device time per call, weights rotated over R copies; GB/s = weight bytes / time; HBM copy limit "
      "~4.3 TB/s):");
  out("");
  out("| op | weight | M x N x K | weight MB | R | exact ms | fp8-act mma.sync ms | fp8-act wgmma ms | cuBLASLt FP8 ms | "
      "cuBLASLt BF16 ms | ours best GB/s | ours best TFLOP/s | cuBLASLt FP8 GB/s | ours / cuBLASLt FP8 |");
  out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
  const BlockWeights& b = w0.layers.at(std::min<int64_t>(2, layers - 1));
  struct Op {
    const char* name;
    std::vector<Linear> copies;
  };
  auto per_layer = [&](auto pick) {
    std::vector<Linear> v;
    for (const auto& lb : w0.layers) v.push_back(pick(lb));
    return v;
  };
  std::vector<Linear> w1s, w2s;
  for (size_t e = 0; e < std::min<size_t>(b.ffn.experts.size(), 64); ++e) {
    w1s.push_back(b.ffn.experts[e].w1);
    w2s.push_back(b.ffn.experts[e].w2);
  }
  std::vector<Op> list = {
      {"attn.wq_b", per_layer([](const BlockWeights& lb) { return lb.attn.wq_b; })},
      {"attn.wo_b", per_layer([](const BlockWeights& lb) { return lb.attn.wo_b; })},
      {"attn.wq_a", per_layer([](const BlockWeights& lb) { return lb.attn.wq_a; })},
      {"expert.w1", w1s},
      {"expert.w2", w2s},
      {"head", {Linear{WeightFormat::BF16, w0.head, nullptr, cfg.vocab_size, cfg.hidden_size}}}};
  const ActQuant mode = be->act_quant();
  for (const auto& op : list) {
    const Linear& l0 = op.copies.front();
    const double wbytes = double(linear_bytes(l0));
    // Enough copies to exceed ~2.5x the L2 when they exist.
    const size_t R = std::min<size_t>(op.copies.size(), size_t(std::ceil(128e6 / wbytes)));
    for (int64_t M : {int64_t(1), int64_t(4), int64_t(16), int64_t(64), int64_t(1024), int64_t(4096)}) {
      if (M * l0.out > (int64_t(1) << 28)) continue;  // the BF16 reference's buffers would not fit next to 30 layers
      Tensor x = be->alloc({M, l0.in}), y = be->alloc({M, l0.out});
      std::vector<float> xv(M * l0.in);
      for (auto& v : xv) v = rng.normal();
      be->upload(x, xv.data());
      size_t i = 0;
      auto run = [&] { be->linear(x, op.copies[i++ % R], y); };
      const int reps = M <= 64 ? int(std::max<size_t>(R, 20)) : int(std::min<size_t>(R, 5));
      be->set_act_quant(ActQuant::None);
      const double exact = cuda_device_ms(*be, reps, run);
      double kern = NAN, wg = NAN, lt = NAN;
      if (l0.format != WeightFormat::BF16) {
        be->set_act_quant(ActQuant::Fp8Pow2);
        cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::Kernel);
        kern = cuda_device_ms(*be, reps, run);
        if (dev.sm_major == 9 && M > 16) {  // the warpgroup kernels (fewer rows stream)
          cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::Warpgroup);
          wg = cuda_device_ms(*be, reps, run);
        }
        if (l0.format == WeightFormat::FP8 && dev.sm_major == 9) {
          cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::CublasLt);
          try {
            lt = cuda_device_ms(*be, reps, run);
          } catch (const Error& e) {
            out("cuBLASLt FP8 {} M={}: {}", op.name, M, e.what());
          }
        }
        cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::Auto);
      }
      be->set_act_quant(mode);
      const double ref = cublaslt_bf16_gemm_ms(M, l0.out, l0.in, 5);
      const double ours = std::min({exact, kern == kern ? kern : exact, wg == wg ? wg : exact});
      auto ms = [](double t) { return t == t ? fmt::format("{:.4f}", t) : std::string("-"); };
      auto gbs = [&](double t) { return t == t ? fmt::format("{:.0f}", wbytes / (t * 1e-3) / 1e9) : std::string("-"); };
      const char* f = l0.format == WeightFormat::FP8 ? "FP8" : l0.format == WeightFormat::FP4 ? "FP4" : "BF16";
      out("| {} | {} | {} x {} x {} | {:.1f} | {} | {} | {} | {} | {} | {:.4f} | {} | {:.0f} | {} | {} |", op.name, f, M,
          l0.out, l0.in, wbytes / 1e6, R, ms(exact), ms(kern), ms(wg), ms(lt), ref, gbs(ours),
          2.0 * double(M) * double(l0.out) * double(l0.in) / (ours * 1e-3) / 1e12, gbs(lt),
          lt == lt ? fmt::format("{:.2f}x", lt / ours) : std::string("-"));
    }
  }
  out("");
  out("| op | weight | M x N x K | ours ms | cuBLASLt BF16 ms | ours / BF16 | TFLOP/s | GB/s (weight read) |");
  out("|---|---|---|---|---|---|---|---|");
  // Grouped output projection and the whole MoE layer at decode and prefill sizes.
  for (int64_t M : {int64_t(1), int64_t(64), int64_t(1024)}) {
    Tensor x = be->alloc({M, cfg.o_groups, cfg.num_attention_heads / cfg.o_groups * cfg.head_dim});
    Tensor y = be->alloc({M, cfg.o_groups, cfg.o_lora_rank});
    be->fill(x, 0.01f);
    const double ours = cuda_device_ms(*be, 10, [&] { be->grouped_linear(x, b.attn.wo_a, cfg.o_groups, y); });
    const double ref = cublaslt_bf16_gemm_ms(M * cfg.o_groups, cfg.o_lora_rank, b.attn.wo_a.in, 5);
    out("| attn.wo_a (grouped x{}, never quantised) | FP8 | {} x {} x {} | {:.4f} | {:.4f} (as {}x{}x{}) | {:.2f} | "
        "{:.2f} | {:.0f} |",
        cfg.o_groups, M, b.attn.wo_a.out, b.attn.wo_a.in, ours, ref, M * cfg.o_groups, cfg.o_lora_rank,
        b.attn.wo_a.in, ours / ref,
        2.0 * double(M) * double(b.attn.wo_a.out) * double(b.attn.wo_a.in) / (ours * 1e-3) / 1e12,
        double(linear_bytes(b.attn.wo_a)) / (ours * 1e-3) / 1e9);
  }
  out("");
  out("| moe layer (routed top-6 + shared), last layer | weights | tokens | exact ms | fp8-act ms (Auto) | "
      "fp8-act mma.sync ms | TFLOP/s (best) | GB/s (touched expert bytes) |");
  out("|---|---|---|---|---|---|---|---|");
  for (int64_t M : {int64_t(1), int64_t(8), int64_t(64), int64_t(1024), int64_t(4096)}) {
    Tensor x = be->alloc({M, cfg.hidden_size}), y = be->alloc({M, cfg.hidden_size});
    Tensor gw = be->alloc({M, cfg.num_experts_per_tok}), ge = be->alloc({M, cfg.num_experts_per_tok}, ElemType::I32);
    Tensor ids = be->alloc({M}, ElemType::I32);
    std::vector<int32_t> idv(M);
    for (auto& v : idv) v = int32_t(rng.below(uint64_t(cfg.vocab_size)));
    be->upload(ids, idv.data());
    std::vector<float> xv(M * cfg.hidden_size);
    for (auto& v : xv) v = rng.normal();
    be->upload(x, xv.data());
    const BlockWeights& lb = w0.layers.back();
    be->route(x, lb.ffn, ids, cfg, gw, ge);
    be->set_act_quant(ActQuant::None);
    // More than 64 rows per expert bound: the launcher downloads the counts (a host sync inside).
    const double ours = cuda_device_ms(*be, 5, [&] { be->moe(x, lb.ffn, gw, ge, float(cfg.swiglu_limit), y); });
    be->set_act_quant(ActQuant::Fp8Pow2);
    const double fp8 = cuda_device_ms(*be, 5, [&] { be->moe(x, lb.ffn, gw, ge, float(cfg.swiglu_limit), y); });
    cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::Kernel);
    const double fp8_mma = cuda_device_ms(*be, 5, [&] { be->moe(x, lb.ffn, gw, ge, float(cfg.swiglu_limit), y); });
    cuda_set_fp8_gemm(*be, CudaOptions::Fp8Gemm::Auto);
    be->set_act_quant(mode);
    // This GPU's share: its routed experts (or their slices) and its slice of the shared expert.
    const LayerCost& last = lc.back();
    const double distinct = distinct_experts(cfg, double(M)) * last.expert_share;
    const auto& sh = lb.ffn.shared;
    const double bytes = distinct * double(last.expert) + double(linear_bytes(sh.w1) + linear_bytes(sh.w2) + linear_bytes(sh.w3));
    const double macs = 3.0 * double(cfg.hidden_size) *
                        (K * last.expert_share * double(lb.ffn.experts.at(0).w1.out) + double(sh.w1.out));
    const double best = std::min({ours, fp8, fp8_mma});
    out("| moe layer | FP4 + FP8 | {} | {:.4f} | {:.4f} | {:.4f} | {:.1f} | {:.0f} |", M, ours, fp8, fp8_mma,
        2.0 * double(M) * macs / (best * 1e-3) / 1e12, bytes / (best * 1e-3) / 1e9);
  }
  return 0;
}

}  // namespace
#endif

void register_bench_model(CLI::App& app, Action& action) {
  struct Opts {
    int64_t layers = 4, tp = 1, ep = 1, prefill_chunk = 8192;
    std::string batch = "1,8,64", ctx = "1024,8192", seqs;
    int steps = 5;
    bool random = false, kv_fp8 = false, ops = true;
    std::string gemm = "exact", cuda_graphs = "on", backend = "cuda", preset = "flash";
    std::string offload = "none", offload_reserve = kDefaultOffloadReserve;
    double spec_accept = 0;
    int32_t spec_tokens = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = nullptr;
  try {
    bench = app.get_subcommand("bench");
  } catch (const CLI::OptionNotFound&) {
    bench = app.add_subcommand("bench", "Benchmarks");
    bench->require_subcommand(1);
  }
  auto* cmd = bench->add_subcommand("model", "Time prefill and decode of a full-width model (CUDA), or decode with and "
                                              "without speculative decoding (--spec-accept; CUDA or CPU)");
  cmd->add_flag("--random", o->random, "Random weights generated on the device (no checkpoint)")->required();
  cmd->add_option("--backend", o->backend, "cuda | cpu (the CPU runs --spec-accept with a tiny --preset only)")
      ->check(CLI::IsMember({"cuda", "cpu"}));
  cmd->add_option("--preset", o->preset,
                  "flash: DeepSeek-V4-Flash shapes, --layers N + MTP block (CUDA); tiny | tiny-fp8 | small: the "
                  "make-tiny presets (CPU)")
      ->check(CLI::IsMember({"flash", "tiny", "tiny-fp8", "small"}));
  auto* layers_opt =
      cmd->add_option("--layers", o->layers, "Number of layers N (all 43 fit one H200 only with --offload-experts; without it N <= 30)");
  cmd->add_option("--tp", o->tp, "Tensor-parallel GPUs, as dsv4 serve (heads split; one thread and device per rank, NCCL)")
      ->check(CLI::Range(1, 64));
  cmd->add_option("--ep", o->ep, "Expert-parallel GPUs, as dsv4 serve (routed experts split)")->check(CLI::Range(1, 64));
  cmd->add_option("--batch", o->batch, "Decode batch sizes, comma-separated");
  cmd->add_option("--ctx", o->ctx, "Prefill lengths / decode contexts, comma-separated");
  cmd->add_option("--seqs", o->seqs, "Also decode S sequences at each context, one token each (comma-separated S)");
  cmd->add_option("--steps", o->steps, "Timed decode steps per batch size");
  cmd->add_option("--prefill-chunk", o->prefill_chunk,
                  "Prefill a --ctx prompt in passes of at most this many tokens, as the engine's chunked prefill "
                  "(long contexts: 128K, 1M); the prefill row's time is the whole prompt's (TTFT)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--kv-fp8", o->kv_fp8, "Production KV format (FP8 nope dims, BF16 rope dims)");
  cmd->add_option("--gemm", o->gemm, "FP8/FP4-weight linears: exact (FP32 activations) | fp8 (1x128 FP8 activations)")
      ->check(CLI::IsMember({"exact", "fp8"}));
  cmd->add_option("--cuda-graphs", o->cuda_graphs, "Decode steps: on = fixed-shape steps replayed as CUDA graphs (the CPU runs the same padded plan); off = the plain per-batch plan")
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_flag("!--no-ops", o->ops, "Skip the per-op table");
  cmd->add_option("--offload-experts", o->offload,
                  "Routed experts in pinned host memory, as dsv4 serve: none | auto | N | layer list");
  cmd->add_option("--offload-reserve", o->offload_reserve,
                  "With --offload-experts: device memory kept free for state and activations (the expert cache "
                  "gets the rest)")->capture_default_str();
  cmd->add_option("--spec-accept", o->spec_accept,
                  "Speculative decoding with this imposed mean acceptance length L (tokens per verify pass, "
                  "1..k+1; e.g. 2.35): decode tok/s with and without speculation at each --ctx and --seqs "
                  "(default 1,16), instead of the prefill/decode tables");
  auto* spec_tokens_opt =
      cmd->add_option("--speculative-tokens", o->spec_tokens, "Drafts k per verify pass with --spec-accept (1..3)");
  cmd->callback([o, &action, layers_opt, spec_tokens_opt] {
    const bool layers_given = layers_opt->count() > 0, spec_tokens_given = spec_tokens_opt->count() > 0;
    action = [o, layers_given, spec_tokens_given] {
      auto sizes = [](const std::string& s, const char* flag) {
        auto v = parse_int_list<int64_t>(s, flag);
        if (v.empty()) fail("{}: empty list", flag);
        for (int64_t x : v)
          if (x < 1) fail("{}: {} is not a positive size", flag, x);
        return v;
      };
      const ParallelConfig par{int(o->tp), int(o->ep)};
      if (o->layers < 1) fail("--layers must be >= 1");
      if (o->steps < 1) fail("--steps must be >= 1");
      [[maybe_unused]] const auto batches = sizes(o->batch, "--batch"), ctxs = sizes(o->ctx, "--ctx");
      const bool speculate = o->spec_accept != 0;
      [[maybe_unused]] const auto seq_counts = !o->seqs.empty() ? sizes(o->seqs, "--seqs")
                                               : speculate        ? std::vector<int64_t>{1, 16}
                                                                  : std::vector<int64_t>{};
      SpecBenchOptions spec;
      if (speculate) {
        if (!spec_tokens_given) fail("--spec-accept needs --speculative-tokens k");
        if (o->spec_tokens < 1 || o->spec_tokens > 3) fail("--speculative-tokens: must be 1..3, got {}", o->spec_tokens);
        if (!(o->spec_accept >= 1 && o->spec_accept <= o->spec_tokens + 1))
          fail("--spec-accept: {} is outside [1, k + 1 = {}] (tokens per verify pass with --speculative-tokens {})",
               o->spec_accept, o->spec_tokens + 1, o->spec_tokens);
        spec = {ctxs, seq_counts, o->steps, o->spec_tokens, o->spec_accept, o->kv_fp8 ? KvFormat::FP8 : KvFormat::F32};
      } else if (spec_tokens_given) {
        fail("--speculative-tokens needs --spec-accept L");
      }
      if (o->backend == "cpu") {
        if (o->preset == "flash") fail("--backend cpu: the flash preset does not fit a CPU run; use --preset tiny or small");
        if (!speculate) fail("--backend cpu: only the --spec-accept mode runs on the CPU");
        if (layers_given) fail("--layers: the {} preset has its own layers (--layers is for --preset flash)", o->preset);
        auto lm = LoadedModel::demo(o->preset, 1234, par);
        lm->model->on_every_rank([&](int, Model& m) { m.set_kv_fp8(o->kv_fp8); });
        lm->model->set_fp8_activations(o->gemm == "fp8");
        fmt::print("model: random {} preset ({} layers + {} MTP), CPU backend, {} rank(s) (--tp {} --ep {})\n",
                   o->preset, lm->config().num_hidden_layers, lm->config().num_nextn_predict_layers, par.world(),
                   par.tp, par.ep);
        run_spec_bench(*lm->model, spec);
        return 0;
      }
      if (o->preset != "flash") fail("--preset {}: the tiny presets run on the CPU (--backend cpu)", o->preset);
#ifdef DSV4_HAVE_CUDA
      if (!cuda_device_available()) fail("bench model needs a CUDA device");
      return run_bench(o->layers, batches, ctxs, seq_counts, o->steps, o->kv_fp8, o->gemm == "fp8", o->ops,
                       o->cuda_graphs == "on", speculate ? &spec : nullptr, parse_offload_spec(o->offload, speculate),
                       parse_memory_size(o->offload_reserve, "--offload-reserve"), par, o->prefill_chunk);
#else
      fail("bench model --backend cuda: built without CUDA (use --backend cpu with a tiny --preset)");
      return 1;
#endif
    };
  });
}

}  // namespace dsv4::cli
