#include "engine/output_processor.h"

#include <algorithm>

namespace dsv4 {

OutputProcessor::OutputProcessor(const Tokenizer* tok, const SamplingParams& sp, std::vector<int32_t> eos_ids,
                                 int64_t max_completion)
    : tok_(tok), sp_(sp), eos_ids_(std::move(eos_ids)), max_completion_(max_completion) {
  if (tok_) decoder_.emplace(*tok_, true);
}

bool OutputProcessor::is_stop_token(int32_t tok) const {
  const auto has = [tok](const std::vector<int32_t>& v) { return std::find(v.begin(), v.end(), tok) != v.end(); };
  return (!sp_.ignore_eos && has(eos_ids_)) || has(sp_.stop_token_ids);
}

// Bytes at the end of the unreleased text that begin some stop string: they may still become
// part of a match, so they stay back until the next token decides.
size_t OutputProcessor::stop_string_hold() const {
  const size_t open = text_.size() - released_;
  size_t hold = 0;
  for (const auto& st : sp_.stop)
    for (size_t k = std::min(st.size() - 1, open); k > hold; --k)
      if (text_.compare(text_.size() - k, k, st, 0, k) == 0) {
        hold = k;
        break;
      }
  return hold;
}

OutputProcessor::Delta OutputProcessor::append(std::span<const int32_t> generated) {
  Delta d;
  bool cut_by_string = false;
  for (int32_t tok : generated) {
    if (finished_) break;
    ++d.consumed;
    ++completion_;
    if (is_stop_token(tok)) {
      d.finish = FinishReason::Stop;
    } else {
      d.tokens.push_back(tok);
      if (decoder_ && tok_->contains(tok)) decoder_->push(tok, text_);  // no text for unknown ids
      if (!sp_.stop.empty()) {
        size_t longest = 0;
        for (const auto& st : sp_.stop) longest = std::max(longest, st.size());
        // A match must end in the new bytes; it may start up to longest-1 bytes before them.
        const size_t from = released_ > longest ? released_ - longest : 0;
        size_t first = std::string::npos;
        for (const auto& st : sp_.stop) first = std::min(first, text_.find(st, from));
        if (first != std::string::npos) {
          text_.resize(first);
          d.finish = FinishReason::Stop;
          cut_by_string = true;
        }
      }
    }
    if (d.finish == FinishReason::None && completion_ >= max_completion_) d.finish = FinishReason::Length;
    finished_ = d.finish != FinishReason::None;
  }
  if (finished_ && !cut_by_string && decoder_) text_ += decoder_->flush();
  const size_t upto = finished_ ? text_.size() : text_.size() - stop_string_hold();
  if (upto > released_) {
    d.text = text_.substr(released_, upto - released_);
    released_ = upto;
  }
  return d;
}

}  // namespace dsv4
