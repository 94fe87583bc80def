// dsv4 bench model --spec-accept L --speculative-tokens k: decode steps driven as the engine
// drives them (llm_engine.cpp step(): ModelRunner pass, verdicts, Model::accept_drafts, MtpDrafter),
// with the verdicts imposed instead of computed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>

#include <fmt/format.h>

#include "backend/sampling.h"
#include "cli/bench_costs.h"
#include "cli/bench_spec.h"
#include "engine/model_runner.h"
#include "engine/mtp_drafter.h"
#include "engine/sampler.h"
#include "util/error.h"
#include "util/random.h"

namespace dsv4::cli {

double draft_accept_probability(double accept_length, int32_t drafts) {
  auto tokens_per_pass = [drafts](double a) {
    double t = 1, p = 1;
    for (int32_t j = 0; j < drafts; ++j) t += (p *= a);
    return t;
  };
  double lo = 0, hi = 1;  // tokens_per_pass increases with a
  for (int i = 0; i < 60; ++i) {
    const double mid = (lo + hi) / 2;
    (tokens_per_pass(mid) < accept_length ? lo : hi) = mid;
  }
  return (lo + hi) / 2;
}

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One sequence of the benchmark.
struct Lane {
  StateManager::Seq seq;
  std::vector<int32_t> tokens;  // every token; the last one is not fed yet
  std::vector<int32_t> drafts;  // verified by the next pass
  SamplerState sampler{1};
};

struct StepTotals {
  int64_t steps = 0, tokens = 0, verify_passes = 0, accepted = 0;
  double seconds = 0, draft_seconds = 0;
};

class Stepper {
 public:
  Stepper(Model& model, const SpecBenchOptions& o, int64_t block_tokens)
      : model_(model), runner_(model), drafter_(model), o_(o), block_tokens_(block_tokens),
        accept_(draft_accept_probability(o.accept_length, o.drafts)) {
    greedy_.temperature = 0;
    write_sample_params(sample_filter(greedy_), params_);
  }

  // One decode step of every lane: a pass over its unfed token (and its drafts), the verdicts,
  // the rollback of rejected drafts and, when speculating, the MTP block's catch-up and next drafts.
  void step(std::span<Lane> lanes, bool speculate, StepTotals& t) {
    Backend& be = model_.backend();
    const int64_t V = model_.config().vocab_size;
    be.synchronize();
    const double t0 = now_s();
    std::vector<ModelRunner::Item> items(lanes.size());
    std::vector<int64_t> pass_start(lanes.size());
    for (size_t i = 0; i < lanes.size(); ++i) {
      Lane& l = lanes[i];
      pass_start[i] = l.seq.st.num_tokens;
      l.tokens.insert(l.tokens.end(), l.drafts.begin(), l.drafts.end());
      ModelRunner::Item& it = items[i];
      it.state = &l.seq.st;
      it.tokens = std::span(l.tokens).subspan(size_t(pass_start[i]));
      it.sampled = true;
      it.draft_rows = int64_t(l.drafts.size());
      it.keep_streams = speculate;
      it.on_device = it.draft_rows == 0;  // as the engine: rows without drafts sample on the device
      it.params = params_;
    }
    ModelRunner::Result res = runner_.run(items);

    // The verdicts. The target's token (after the accepted drafts, or the device-sampled one) is
    // replaced by a random token: random weights make every sequence pick the same tokens, and
    // forked sequences fed identical tokens would share their experts, which real text does not.
    std::map<const SequenceState*, int64_t> accepted_of;
    size_t device_row = 0;
    for (size_t i = 0; i < lanes.size(); ++i) {
      Lane& l = lanes[i];
      const int64_t n = items[i].draft_rows;
      int64_t m = 0;
      if (items[i].on_device) ++device_row;
      else {
        m = imposed_accepted(n);
        accepted_of[&l.seq.st] = m;
        t.accepted += m;
        ++t.verify_passes;
      }
      l.tokens.resize(l.tokens.size() - size_t(n - m));  // rejected drafts
      l.tokens.push_back(int32_t(2 + rng_.below(uint64_t(V - 2))));
      t.tokens += m + 1;
      l.drafts.clear();
    }
    DSV4_CHECK(device_row == res.device_tokens.size());
    std::vector<int64_t> accepted;
    for (const DraftCommit::Seq& d : res.drafts.seqs) accepted.push_back(accepted_of.at(d.state));
    model_.accept_drafts(res.drafts, accepted);

    if (speculate) {
      be.synchronize();
      const double td = now_s();
      std::vector<MtpDrafter::Item> di(lanes.size());
      for (size_t i = 0; i < lanes.size(); ++i) {
        Lane& l = lanes[i];
        const SequenceState& st = l.seq.st;
        MtpDrafter::Item& it = di[i];
        it.state = &l.seq.st;
        it.pass_start = pass_start[i];
        it.stream_first = res.stream_first[i];
        for (int64_t p = st.mtp_tokens + 1; p <= st.num_tokens; ++p) it.next_tokens.push_back(l.tokens[size_t(p)]);
        // As the engine: a verify pass never crosses a block boundary.
        const int64_t N = st.num_tokens;
        it.drafts = int32_t(std::min<int64_t>(o_.drafts, (N / block_tokens_ + 1) * block_tokens_ - N - 1));
        it.params = &greedy_;
        it.sampler = &l.sampler;
      }
      std::vector<MtpDrafter::Drafts> out = drafter_.run(di, res.streams);
      for (size_t i = 0; i < lanes.size(); ++i) lanes[i].drafts = std::move(out[i].tokens);
      be.synchronize();
      t.draft_seconds += now_s() - td;
    }
    be.synchronize();
    t.seconds += now_s() - t0;
    ++t.steps;
  }

 private:
  // Accepted drafts out of n: each is accepted with probability accept_ until the first
  // rejection, i.e. the largest m <= n with u < accept_^m. u walks the additive recurrence
  // u += 1/phi (mod 1), which is equidistributed: over s passes the mean acceptance length is
  // within O(1/s) of the imposed one, where random draws would leave O(1/sqrt(s)) noise.
  int64_t imposed_accepted(int64_t n) {
    u_ += 0.6180339887498949;
    u_ -= std::floor(u_);
    int64_t m = 0;
    for (double p = accept_; m < n && u_ < p; p *= accept_) ++m;
    return m;
  }

  Model& model_;
  ModelRunner runner_;
  MtpDrafter drafter_;
  const SpecBenchOptions& o_;
  int64_t block_tokens_;
  double accept_, u_ = 0;
  SamplingParams greedy_;
  float params_[kSampleParams];
  Rng rng_{11};
};

}  // namespace

void run_spec_bench(Model& model, const SpecBenchOptions& o) {
  auto out = [](const std::string& s) {
    std::fputs((s + "\n").c_str(), stdout);
    std::fflush(stdout);
  };
  const ModelConfig& cfg = model.config();
  const int64_t V = cfg.vocab_size, block = 256;
  const double a = draft_accept_probability(o.accept_length, o.drafts);
  out(fmt::format("speculative decoding: k = {} drafts per pass, imposed mean acceptance length {:.3f} (each draft "
                  "accepted with probability {:.4f} until the first rejection); drafts from the MTP block",
                  o.drafts, o.accept_length, a));
  out("");
  out("| seqs | ctx | k | imposed L | measured L | plain ms/step | plain tok/s | spec ms/step | drafting ms/step | "
      "spec tok/s | speedup | weight-bytes bound |");
  out("|---|---|---|---|---|---|---|---|---|---|---|---|");
  // The speedup if both modes streamed their weight bytes at one rate (decode is bandwidth-bound):
  // L x plain bytes / spec bytes per step. Spec: the verify pass over S (k + 1) rows and the k
  // MTP passes (pass 0 catches up ~L positions per sequence, pass j re-runs j + 1 rows), each
  // reading the head again. Uniform routing (random weights): more rows touch more experts.
  const ModelWeights& w = model.weights();
  auto bytes_bound = [&](int64_t S) {
    const double L = o.accept_length, rows = double(S);
    double spec = pass_weight_bytes(cfg, w, rows * (o.drafts + 1), false);
    for (int32_t j = 0; j < o.drafts; ++j) spec += pass_weight_bytes(cfg, w, rows * (j == 0 ? L : j + 1), true);
    return L * pass_weight_bytes(cfg, w, rows, false) / spec;
  };
  Rng rng(7);
  for (int64_t C : o.ctxs)
    for (int64_t S : o.seq_counts) {
      // Warm-up step and timed steps of both modes, each feeding at most k + 1 tokens.
      const int64_t tokens = C + 2 * int64_t(o.steps + 1) * (o.drafts + 1) + 2;
      const int64_t per_seq = (tokens + block - 1) / block;
      StateManager mgr(model, block, S * (per_seq + 1), S, 0, o.kv, /*mtp=*/true);
      Stepper stepper(model, o, block);
      std::vector<Lane> lanes(static_cast<size_t>(S));
      // One sequence prefilled (its last row sampled, the MTP block catching up and drafting), the
      // others forked from it (full blocks shared, slot and MTP state copied), as the engine does for n > 1.
      lanes[0].seq = mgr.acquire();
      if (!mgr.reserve(lanes[0].seq, tokens)) fail("bench: state pool too small");
      lanes[0].tokens.resize(size_t(C));
      for (auto& x : lanes[0].tokens) x = int32_t(2 + rng.below(uint64_t(V - 2)));
      StepTotals prefill;
      stepper.step(std::span(lanes).first(1), true, prefill);
      for (int64_t i = 1; i < S; ++i) {
        Lane& l = lanes[size_t(i)];
        if (!mgr.fork(lanes[0].seq, l.seq) || !mgr.reserve(l.seq, tokens)) fail("bench: state pool too small");
        l.tokens = lanes[0].tokens;
        l.drafts = lanes[0].drafts;
      }
      StepTotals spec, plain, warm;
      stepper.step(lanes, true, warm);
      for (int s = 0; s < o.steps; ++s) stepper.step(lanes, true, spec);
      for (Lane& l : lanes) l.drafts.clear();  // the plain engine runs no MTP block
      stepper.step(lanes, false, warm);
      for (int s = 0; s < o.steps; ++s) stepper.step(lanes, false, plain);
      const double plain_tps = double(plain.tokens) / plain.seconds, spec_tps = double(spec.tokens) / spec.seconds;
      out(fmt::format("| {} | {} | {} | {:.3f} | {:.3f} | {:.2f} | {:.1f} | {:.2f} | {:.2f} | {:.1f} | **{:.2f}x** | "
                      "{:.2f}x |",
                      S, C, o.drafts, o.accept_length,
                      double(spec.accepted + spec.verify_passes) / double(std::max<int64_t>(1, spec.verify_passes)),
                      plain.seconds / plain.steps * 1e3, plain_tps, spec.seconds / spec.steps * 1e3,
                      spec.draft_seconds / spec.steps * 1e3, spec_tps, spec_tps / plain_tps, bytes_bound(S)));
      for (Lane& l : lanes) mgr.release(l.seq);
    }
  out("");
  out("plain = one token per sequence per step, sampled on the device, no MTP block; spec = a verify pass over each");
  out("sequence's last token and its drafts, the imposed verdicts, rollback of the rejected drafts (Model::accept_drafts)");
  out("and the MTP block's catch-up and k chained drafts (drafting ms/step); measured L = tokens per verify pass;");
  out("weight-bytes bound = the speedup if both modes read their weights (each once per pass, the distinct experts of");
  out("uniformly routed rows) at the same rate: L x plain bytes / spec bytes per step.");
}

}  // namespace dsv4::cli
