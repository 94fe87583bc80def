#pragma once
// The model runner (docs/ENGINE.md): between the scheduler and the model. It turns one step's
// scheduled work (decodes and prefill chunks of many sequences) into one batched forward pass,
// computes logits only for the rows that are sampled, samples the device-sampled rows in one
// Backend::sample call and hands host-sampled rows back in one download.
#include <cstdint>
#include <span>
#include <vector>

#include "model/forward.h"

namespace dsv4 {

class ModelRunner {
 public:
  explicit ModelRunner(Model& model) : model_(model) {}

  // One sequence's work in a step: `tokens` fed at its next positions; `sampled`: its last row's
  // logits are wanted (the chunk reaches the end of what is known); `on_device`: that row is
  // sampled by Backend::sample with params (kSampleParams floats) and uniform; `scored`: every
  // row's logits are wanted on the host (prompt logprobs; never on_device). Speculative
  // decoding: the last draft_rows tokens are drafts (host-sampled: the logits of all draft_rows + 1
  // last rows come back); keep_streams: the final streams of every row are kept (the MTP drafter's input).
  struct Item {
    SequenceState* state = nullptr;
    std::span<const int32_t> tokens;
    bool sampled = false, on_device = false, scored = false;
    const float* params = nullptr;
    float uniform = 0;
    int64_t draft_rows = 0;
    bool keep_streams = false;
  };
  struct Result {
    std::vector<int32_t> device_tokens;  // per on_device item, in item order
    std::vector<float> host_logits;      // [rows, vocab]: draft_rows + 1 rows per host-sampled item,
                                         // every row of a scored one, in item order (with_device_rows:
                                         // the device-sampled rows first, then the host ones)
    Tensor streams;                      // [rows of keep_streams items, hc_mult, hidden]
    std::vector<int64_t> stream_first;   // per item: its first row in streams (-1: none)
    DraftCommit drafts;                  // for Model::accept_drafts
  };
  // Runs the step. with_device_rows: also download the device-sampled rows (a diagnostics hook).
  Result run(std::span<const Item> items, bool with_device_rows = false);

 private:
  Model& model_;
};

}  // namespace dsv4
