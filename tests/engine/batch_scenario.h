#pragma once
// A mixed batch for the batched forward pass (issue: batched execution): decodes, a fresh
// prefill, a chunk crossing a block boundary, two sequences sharing prefix blocks (a fork), a
// long chunk crossing two boundaries, on scattered block tables of one StateManager. The batch
// runs on `model`; each sequence also runs alone (a self-contained sequence, same chunks) on
// `ref`. Both return the logits rows of the batched step (every row) and of a second step in
// which every sequence decodes one token (last rows only), in the same order.
#include <span>
#include <vector>

#include "engine/state_manager.h"
#include "model/forward.h"
#include "util/random.h"

namespace dsv4::test {

struct BatchScenario {
  std::vector<float> batched, alone;  // [rows, vocab], the same rows in the same order
  int64_t rows = 0;
};

inline BatchScenario run_batch_scenario(Model& model, Model& ref, KvFormat kv, uint64_t seed) {
  const ModelConfig& c = model.config();
  const int64_t B = model.block_granularity(), V = c.vocab_size;
  struct Spec {
    int64_t history, chunk;
    int fork_of;  // -1: own history; else forked from that sequence after its history
  };
  const std::vector<Spec> specs = {{20, 1, -1},     {2 * B + 1, 1, -1}, {0, 13, -1}, {B - 6, 12, -1},
                                   {2 * B, 5, -1},  {2 * B, 1, 4},     {1, 1, -1},  {3 * B + 5, 2 * B, -1}};
  const int64_t S = int64_t(specs.size());
  Rng rng(seed);
  auto tokens_of = [&](int64_t n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(2 + rng.below(uint64_t(V - 2)));
    return t;
  };
  // Each sequence's tokens: history, chunk, one decode token.
  std::vector<std::vector<int32_t>> toks(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    const Spec& sp = specs[size_t(s)];
    toks[size_t(s)] = sp.fork_of >= 0 ? std::vector<int32_t>(toks[size_t(sp.fork_of)].begin(),
                                                             toks[size_t(sp.fork_of)].begin() + sp.history)
                                      : tokens_of(sp.history);
    const auto more = tokens_of(sp.chunk + 1);
    toks[size_t(s)].insert(toks[size_t(s)].end(), more.begin(), more.end());
  }

  BatchScenario out;
  Backend& be = model.backend();
  StateManager mgr(model, B, 8 * S, S, 0, kv);
  std::vector<StateManager::Seq> seqs(static_cast<size_t>(S));
  auto span_of = [&](int64_t s, int64_t from, int64_t n) { return std::span(toks[size_t(s)]).subspan(size_t(from), size_t(n)); };
  for (int64_t s = 0; s < S; ++s) {
    const Spec& sp = specs[size_t(s)];
    if (sp.fork_of >= 0) {
      if (!mgr.fork(seqs[size_t(sp.fork_of)], seqs[size_t(s)])) throw Error("batch scenario: fork failed");
      continue;
    }
    seqs[size_t(s)] = mgr.acquire();
    if (!mgr.reserve(seqs[size_t(s)], std::max<int64_t>(sp.history, 1))) throw Error("batch scenario: pool too small");
    if (sp.history) model.forward(seqs[size_t(s)].st, span_of(s, 0, sp.history));
  }
  // Blocks for the rest, handed out one at a time round robin: no table is contiguous.
  for (bool more = true; more;) {
    more = false;
    for (int64_t s = 0; s < S; ++s) {
      const Spec& sp = specs[size_t(s)];
      auto& q = seqs[size_t(s)];
      const int64_t want = sp.history + sp.chunk + 1;
      if (int64_t(q.st.blocks.size()) * B >= want) continue;
      if (!mgr.reserve(q, int64_t(q.st.blocks.size() + 1) * B)) throw Error("batch scenario: pool too small");
      more = true;
    }
  }
  auto run = [&](bool decode) {
    std::vector<ForwardSeq> batch;
    for (int64_t s = 0; s < S; ++s) {
      const Spec& sp = specs[size_t(s)];
      const int64_t n = decode ? 1 : sp.chunk;
      batch.push_back({&seqs[size_t(s)].st, span_of(s, decode ? sp.history + sp.chunk : sp.history, n), n, 0});
    }
    ForwardOutput o = model.forward(batch);
    const size_t at = out.batched.size();
    out.batched.resize(at + size_t(o.logits.numel()));
    be.download(o.logits, out.batched.data() + at);
    out.rows += o.logits.dim(0);
  };
  run(false);
  run(true);
  for (auto& q : seqs) mgr.release(q);

  // Alone: the same chunks, one self-contained sequence at a time; chunk rows first, then decodes.
  std::vector<float> decodes;
  ref.set_kv_format(kv);
  for (int64_t s = 0; s < S; ++s) {
    const Spec& sp = specs[size_t(s)];
    SequenceState st = ref.new_sequence(sp.history + sp.chunk + 1);
    if (sp.history) ref.forward(st, span_of(s, 0, sp.history));
    std::vector<float> a(static_cast<size_t>(sp.chunk * V)), d(static_cast<size_t>(V));
    ref.backend().download(ref.forward(st, span_of(s, sp.history, sp.chunk)), a.data());
    ref.backend().download(ref.forward(st, span_of(s, sp.history + sp.chunk, 1)), d.data());
    out.alone.insert(out.alone.end(), a.begin(), a.end());
    decodes.insert(decodes.end(), d.begin(), d.end());
  }
  out.alone.insert(out.alone.end(), decodes.begin(), decodes.end());
  return out;
}

}  // namespace dsv4::test
