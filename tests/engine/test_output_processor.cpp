// OutputProcessor against references computed from whole-sequence decoding: stop strings found
// in Tokenizer::decode of growing prefixes, stop tokens, the length limit, and the same result
// whether tokens arrive one by one or several per step (speculative decoding).
#include <gtest/gtest.h>

#include <algorithm>

#include "engine/output_processor.h"
#include "text/tiny_tokenizer.h"
#include "util/random.h"

using namespace dsv4;

namespace {

constexpr int32_t kEos = 1;

const Tokenizer& tokenizer() {
  static const Tokenizer tok = Tokenizer::from_json(tiny_tokenizer_json(1024, 0, kEos));
  return tok;
}

// Ordinary tokens whose bytes are printable ASCII, or any ordinary token (UTF-8 split across tokens).
std::vector<int32_t> ordinary_tokens(bool ascii_only) {
  const Tokenizer& tok = tokenizer();
  std::vector<int32_t> ids;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (!tok.contains(id) || tok.is_special(id) || tok.is_added(id)) continue;
    const std::string b(tok.token_bytes(id));
    if (ascii_only && !std::all_of(b.begin(), b.end(), [](char c) { return c >= 0x20 && c < 0x7f; })) continue;
    ids.push_back(id);
  }
  return ids;
}

struct Outcome {
  std::vector<int32_t> tokens;
  std::string text;
  int32_t consumed = 0;
  FinishReason finish = FinishReason::None;
  bool operator==(const Outcome&) const = default;
};

// Feeds `gen` in steps of random sizes (1 when max_step is 1), checking per step that released
// text is never retracted and that nothing follows a finish.
Outcome feed(OutputProcessor& p, const std::vector<int32_t>& gen, int max_step, uint64_t seed) {
  Rng rng(seed);
  Outcome o;
  size_t i = 0;
  while (i < gen.size() && o.finish == FinishReason::None) {
    const size_t n = std::min(gen.size() - i, size_t(1 + rng.below(uint64_t(max_step))));
    OutputProcessor::Delta d = p.append(std::span(gen).subspan(i, n));
    EXPECT_LE(d.consumed, int32_t(n));
    if (d.finish == FinishReason::None) EXPECT_EQ(d.consumed, int32_t(n));
    o.tokens.insert(o.tokens.end(), d.tokens.begin(), d.tokens.end());
    o.text += d.text;
    o.consumed += d.consumed;
    o.finish = d.finish;
    i += n;
  }
  EXPECT_EQ(p.finished(), o.finish != FinishReason::None);
  if (p.finished()) EXPECT_EQ(p.append(gen).consumed, 0);
  return o;
}

// The reference: the first prefix whose decoded text contains a stop string ends the sample;
// stop tokens end it without being shown; the limit ends it with Length.
Outcome reference(const std::vector<int32_t>& gen, const SamplingParams& sp, int64_t max_completion) {
  const Tokenizer& tok = tokenizer();
  Outcome o;
  for (int32_t t : gen) {
    ++o.consumed;
    const bool stop_tok = (!sp.ignore_eos && t == kEos) ||
                          std::count(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), t) > 0;
    if (stop_tok) {
      o.finish = FinishReason::Stop;
      break;
    }
    o.tokens.push_back(t);
    const std::string text = tok.decode(o.tokens, true);
    size_t cut = std::string::npos;
    for (const auto& s : sp.stop) cut = std::min(cut, text.find(s));
    if (cut != std::string::npos) {
      o.text = text.substr(0, cut);
      o.finish = FinishReason::Stop;
      return o;
    }
    if (o.consumed >= max_completion) {
      o.finish = FinishReason::Length;
      break;
    }
  }
  o.text = tok.decode(o.tokens, true);
  return o;
}

TEST(OutputProcessor, StopStringsAcrossTokensMatchWholeTextDecoding) {
  const auto ids = ordinary_tokens(true);
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    Rng rng(seed);
    std::vector<int32_t> gen(40);
    for (auto& t : gen) t = ids[rng.below(ids.size())];
    const std::string full = tokenizer().decode(gen, true);
    SamplingParams sp;
    // A stop string taken from the text (so it matches, often across a token boundary) and one
    // that shares its first bytes but never matches (a held-back prefix that must be released).
    const size_t at = rng.below(full.size() - 4), len = 1 + rng.below(4);
    sp.stop = {full.substr(at, len), full.substr(at, 1) + "\x01"};
    const int64_t limit = seed % 3 == 0 ? int64_t(10 + rng.below(30)) : 1000;
    const Outcome want = reference(gen, sp, limit);
    for (int max_step : {1, 2, 4, 40}) {
      OutputProcessor p(&tokenizer(), sp, {kEos}, limit);
      EXPECT_EQ(feed(p, gen, max_step, seed), want) << "seed " << seed << " max_step " << max_step;
      EXPECT_EQ(p.completion_tokens(), want.consumed);
    }
  }
}

TEST(OutputProcessor, SplitUtf8AndStopTokensChunkInvariant) {
  const auto ids = ordinary_tokens(false);
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    Rng rng(seed);
    std::vector<int32_t> gen(30);
    for (auto& t : gen) t = ids[rng.below(ids.size())];
    SamplingParams sp;
    if (seed % 2) gen[10 + rng.below(10)] = kEos;
    sp.stop_token_ids = {gen[20 + rng.below(10)]};  // so that every case finishes
    sp.ignore_eos = seed % 4 == 1;
    const Outcome want = reference(gen, sp, 1000);
    for (int max_step : {1, 3, 30}) {
      OutputProcessor p(&tokenizer(), sp, {kEos}, 1000);
      EXPECT_EQ(feed(p, gen, max_step, seed), want) << "seed " << seed << " max_step " << max_step;
    }
  }
}

TEST(OutputProcessor, WithoutTokenizerCountsTokensAndGivesNoText) {
  SamplingParams sp;
  OutputProcessor p(nullptr, sp, {kEos}, 3);
  OutputProcessor::Delta d = p.append(std::vector<int32_t>{5, 6, 7, 8});
  EXPECT_EQ(d.consumed, 3);
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_TRUE(d.text.empty());
  EXPECT_EQ(d.finish, FinishReason::Length);
}

}  // namespace
