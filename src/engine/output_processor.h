#pragma once
// What a client sees of one sample's generated tokens: stop tokens, stop strings, the length
// limit, and text released only when it can no longer change. Shared by every Engine (the real
// one and the scripted stand-in) so their streams follow the same rules.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "text/tokenizer.h"

namespace dsv4 {

class OutputProcessor {
 public:
  // `tok` may be null (a model without a tokenizer: no text, stop strings refused at submit).
  // `eos_ids` end the sample unless sp.ignore_eos; sp.stop_token_ids always do. The sample ends
  // with Length after `max_completion` tokens.
  OutputProcessor(const Tokenizer* tok, const SamplingParams& sp, std::vector<int32_t> eos_ids,
                  int64_t max_completion);

  struct Delta {
    int32_t consumed = 0;         // leading tokens of the input that count as generated
    std::vector<int32_t> tokens;  // the visible ones among them (a stop token is not)
    std::string text;             // newly released text
    FinishReason finish = FinishReason::None;
  };
  // Appends generated tokens (several when a speculative step accepted several); processing
  // stops at the first token that finishes the sample, later ones are not consumed.
  Delta append(std::span<const int32_t> generated);

  int64_t completion_tokens() const { return completion_; }
  bool finished() const { return finished_; }

 private:
  bool is_stop_token(int32_t tok) const;
  size_t stop_string_hold() const;

  const Tokenizer* tok_;
  SamplingParams sp_;
  std::vector<int32_t> eos_ids_;
  int64_t max_completion_;
  std::optional<IncrementalDecoder> decoder_;
  std::string text_;     // everything decoded so far (cut at a matched stop string)
  size_t released_ = 0;  // bytes of text_ already handed out
  int64_t completion_ = 0;
  bool finished_ = false;
};

}  // namespace dsv4
