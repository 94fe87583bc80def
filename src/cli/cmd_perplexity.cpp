// dsv4 perplexity: quality of a model on a text file (docs/DEMO_MODEL.md). The text is encoded
// with the model's tokenizer (special-token text stays plain text) and cut into segments of
// --ctx - 1 tokens; each segment runs as a fresh sequence after a BOS token through
// Model::forward, and every segment token is scored. Also printed: the unigram perplexity of the
// same tokens under their own frequencies in the file (the best any context-free model can do on
// it), and with --mtp the MTP block's draft quality: how often its top-1 draft for x_{t+2} equals
// the main model's top-1 prediction at t+1 (speculative decoding's acceptance of one draft token).
#include <cmath>
#include <cstdio>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/demo_model.h"
#include "cli/numerics.h"
#include "engine/llm_engine.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace dsv4::cli {

namespace {

// log-sum-exp based log-probability of `target` and the argmax of one logit row.
std::pair<double, int32_t> score_row(const float* row, int64_t V, int32_t target) {
  float mx = row[0];
  int32_t arg = 0;
  for (int64_t v = 1; v < V; ++v)
    if (row[v] > mx) {
      mx = row[v];
      arg = int32_t(v);
    }
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
  return {double(row[target]) - mx - std::log(sum), arg};
}

}  // namespace

void register_perplexity(CLI::App& app, Action& action) {
  struct Opts {
    std::string model, file, backend = "cpu";
    NumericsOptions numerics;
    int64_t ctx = 512, max_tokens = 0;
    bool mtp = false, json = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("perplexity", "Perplexity of a model on a text file (and unigram / MTP baselines)");
  cmd->add_option("--model", o->model, "Model directory (default: the committed demo model)");
  cmd->add_option("--file", o->file, "UTF-8 text file")->required();
  cmd->add_option("--ctx", o->ctx, "Tokens per sequence, BOS included")->capture_default_str()->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  cmd->add_option("--max-tokens", o->max_tokens, "Score only the first N tokens of the file (0: all)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--backend", o->backend, "cpu | cuda")->capture_default_str();
  o->numerics.add_to(cmd);
  cmd->add_flag("--mtp", o->mtp, "Also measure the MTP block: top-1 agreement with the main model, perplexity of x_{t+2}");
  cmd->add_flag("--json", o->json, "Print one JSON object instead of text");
  cmd->callback([o, &action] {
    o->numerics.resolve(o->backend);
    action = [o] {
      std::string dir = o->model.empty() ? default_demo_model_dir() : o->model;
      if (dir.empty()) fail("--model: not given and the demo model (models/demo-brown) was not found");
      auto lm = LoadedModel::load(dir, o->backend);
      if (!lm->tokenizer) fail("--model: {} has no tokenizer.json", dir);
      Model& model = *lm->model;
      model.set_kv_fp8(o->numerics.kv_fp8());
      model.set_fp8_activations(o->numerics.fp8_activations());
      const ModelConfig& cfg = model.config();
      if (o->mtp && cfg.num_nextn_predict_layers < 1) fail("--mtp: {} has no MTP block", dir);
      std::vector<int32_t> ids = lm->tokenizer->encode(read_text_file(o->file), /*allow_special=*/false);
      if (o->max_tokens > 0 && int64_t(ids.size()) > o->max_tokens) ids.resize(size_t(o->max_tokens));
      if (ids.empty()) fail("--file: {} holds no tokens", o->file);
      const int64_t V = cfg.vocab_size, seg = o->ctx - 1;
      const int32_t bos = int32_t(cfg.bos_token_id);
      Backend& be = model.backend();
      double nll = 0, mtp_nll = 0;
      int64_t n = 0, mtp_n = 0, agree = 0, segments = 0;
      std::vector<float> logits, mtp_logits;
      for (size_t at = 0; at < ids.size(); at += size_t(seg), ++segments) {
        std::vector<int32_t> toks{bos};
        toks.insert(toks.end(), ids.begin() + int64_t(at), ids.begin() + int64_t(std::min(ids.size(), at + size_t(seg))));
        const int64_t T = int64_t(toks.size());
        SequenceState st = model.new_sequence(T);
        Tensor X;
        Tensor lg = model.forward(st, toks, o->mtp ? &X : nullptr);
        logits.resize(size_t(T * V));
        be.download(lg, logits.data());
        std::vector<int32_t> main_arg(static_cast<size_t>(T));
        for (int64_t t = 0; t < T; ++t) {
          auto [lp, arg] = score_row(logits.data() + t * V, V, t + 1 < T ? toks[size_t(t + 1)] : 0);
          main_arg[size_t(t)] = arg;
          if (t + 1 < T) {
            nll -= lp;
            ++n;
          }
        }
        if (o->mtp && T >= 3) {  // row t: streams of position t + token t+1, drafts x_{t+2}
          Tensor ml = model.forward_mtp(st, X.rows_view(0, T - 2), std::span<const int32_t>(toks).subspan(1, size_t(T - 2)));
          mtp_logits.resize(size_t((T - 2) * V));
          be.download(ml, mtp_logits.data());
          for (int64_t t = 0; t + 2 < T; ++t) {
            auto [lp, arg] = score_row(mtp_logits.data() + t * V, V, toks[size_t(t + 2)]);
            mtp_nll -= lp;
            ++mtp_n;
            agree += arg == main_arg[size_t(t + 1)];
          }
        }
      }
      std::map<int32_t, int64_t> counts;
      for (auto id : ids) ++counts[id];
      double h = 0;
      for (auto& [id, c] : counts) {
        const double p = double(c) / double(ids.size());
        h -= p * std::log(p);
      }
      const double ppl = std::exp(nll / double(n)), uni = std::exp(h);
      nlohmann::ordered_json j = {{"model", dir},
                                  {"file", o->file},
                                  {"backend", o->backend},
                                  {"gemm", o->numerics.gemm},
                                  {"kv", o->numerics.kv},
                                  {"ctx", o->ctx},
                                  {"segments", segments},
                                  {"tokens", n},
                                  {"perplexity", ppl},
                                  {"unigram_perplexity", uni},
                                  {"unigram_over_model", uni / ppl}};
      if (o->mtp) {
        j["mtp_drafts"] = mtp_n;
        j["mtp_top1_agreement"] = mtp_n ? double(agree) / double(mtp_n) : 0.0;
        j["mtp_perplexity"] = mtp_n ? std::exp(mtp_nll / double(mtp_n)) : 0.0;
      }
      if (o->json) {
        std::printf("%s\n", j.dump().c_str());
        return 0;
      }
      std::printf("%s", fmt::format("model {} | {} tokens of {} in {} segments of <= {} (BOS + text) | backend {}, gemm {}, kv {}\n",
                                    dir, n, o->file, segments, o->ctx, o->backend, o->numerics.gemm, o->numerics.kv).c_str());
      std::printf("perplexity          %.3f\n", ppl);
      std::printf("unigram perplexity  %.3f  (the file's own token frequencies; %.2fx the model's)\n", uni, uni / ppl);
      if (o->mtp)
        std::printf("MTP draft           top-1 agreement with the main model's next token %.4f over %lld drafts; "
                    "perplexity of x_{t+2} %.3f\n",
                    double(j["mtp_top1_agreement"]), (long long)mtp_n, double(j["mtp_perplexity"]));
      return 0;
    };
  });
}

}  // namespace dsv4::cli
