#pragma once
// The draft side of speculative decoding (docs/ENGINE.md, "Speculative decoding"): keeps every
// sequence's MTP block in step with the main model and proposes chained draft tokens.
//
// MTP position p reads the main model's final streams of p and token p + 1. Between steps a
// sequence's MTP block has committed positions < num_tokens - 1 (mtp_tokens = num_tokens - 1) and
// the store's mtp_stream row of its slot holds the main streams of position num_tokens - 1, so
// that the state only depends on tokens < num_tokens (prefix-cache snapshots stay exact). After a
// main pass, run() commits the positions it completed and, for a sequence whose next token is
// known, proposes drafts: row 0 is position num_tokens - 1 (main streams, next token); row j > 0
// is position num_tokens - 1 + j, fed the MTP block's own output streams of row j - 1 and draft
// j - 1. Draft rows are never committed: pass j re-runs rows 0..j (at most 3 rows) instead.
#include <cstdint>
#include <span>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "model/forward.h"

namespace dsv4 {

class MtpDrafter {
 public:
  explicit MtpDrafter(Model& model) : model_(model) {}

  struct Item {
    SequenceState* state = nullptr;
    int64_t pass_start = 0;    // position of the first row this step's main pass fed
    int64_t stream_first = 0;  // row of that position in the main pass's streams
    // The tokens at positions mtp_tokens + 1 .. num_tokens (the last one only when known: it is
    // the token just sampled or accepted).
    std::vector<int32_t> next_tokens;
    int32_t drafts = 0;  // tokens to propose (needs the token at num_tokens)
    const SamplingParams* params = nullptr;
    SamplerState* sampler = nullptr;
  };
  struct Drafts {
    std::vector<int32_t> tokens;
    std::vector<std::vector<float>> probs;  // per draft: its distribution q (empty: greedy)
  };
  // streams: the main pass's final streams [rows, hc_mult, hidden]. Returns one Drafts per item.
  std::vector<Drafts> run(std::span<Item> items, const Tensor& streams);

 private:
  Model& model_;
};

}  // namespace dsv4
