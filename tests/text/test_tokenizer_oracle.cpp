// dsv4's tokenizer against ids produced by Hugging Face `tokenizers` (Rust) for the committed
// corpus (scripts/text/gen_tokenizer_oracle.py; see docs/TESTING.md).
#include <gtest/gtest.h>

#include <thread>

#include "tokenizer_test_util.h"
#include "text/tiny_tokenizer.h"
#include "util/utf8.h"

namespace dsv4 {
namespace {

using test::corpus_dir;
using test::load_json;

std::string read_corpus(const std::string& name) { return read_text_file(corpus_dir() + "/" + name + ".txt"); }

// Compares id lists; on mismatch reports the first differing index with decoded context.
::testing::AssertionResult same_ids(const Tokenizer& tok, const std::vector<int32_t>& want,
                                    const std::vector<int32_t>& got) {
  if (want == got) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < want.size() && i < got.size() && want[i] == got[i]) ++i;
  auto ctx = [&](const std::vector<int32_t>& v) {
    std::string s;
    for (size_t k = i >= 3 ? i - 3 : 0; k < std::min(v.size(), i + 4); ++k)
      s += fmt::format("{}{}:{:?} ", k == i ? ">" : "", v[k], std::string(tok.token_bytes(v[k])));
    return s;
  };
  return ::testing::AssertionFailure() << "ids differ at index " << i << " (want " << want.size() << " ids, got "
                                       << got.size() << ")\n  want: " << ctx(want) << "\n  got:  " << ctx(got);
}

std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

TEST(TokenizerOracle, CorpusIsLargeAndMixed) {
  auto exp = load_json(corpus_dir() + "/expected_ids.json");
  size_t total = 0;
  for (auto& [name, v] : exp["files"].items()) total += read_corpus(name).size();
  EXPECT_GE(total, 200u * 1000u);
  EXPECT_GE(exp["files"].size(), 8u);
  EXPECT_GE(exp["cases"].size(), 100u);
}

TEST(TokenizerOracle, CorpusFilesMatchHuggingFace) {
  DSV4_REQUIRE_DEEPSEEK_TOKENIZER(tok);
  auto exp = load_json(corpus_dir() + "/expected_ids.json");
  for (auto& [name, v] : exp["files"].items()) {
    SCOPED_TRACE(name);
    std::string text = read_corpus(name);
    EXPECT_TRUE(same_ids(tok, ids_of(v["ids"]), tok.encode(text, true)));
    EXPECT_TRUE(same_ids(tok, ids_of(v["ids_no_special"]), tok.encode(text, false)));
  }
}

TEST(TokenizerOracle, EdgeCasesMatchHuggingFace) {
  DSV4_REQUIRE_DEEPSEEK_TOKENIZER(tok);
  auto exp = load_json(corpus_dir() + "/expected_ids.json");
  for (const auto& c : exp["cases"]) {
    std::string text = c["text"].get<std::string>();
    SCOPED_TRACE(fmt::format("{:?}", text));
    EXPECT_TRUE(same_ids(tok, ids_of(c["ids"]), tok.encode(text, true)));
    EXPECT_TRUE(same_ids(tok, ids_of(c["ids_no_special"]), tok.encode(text, false)));
  }
}

TEST(TokenizerOracle, DecodeMatchesHuggingFace) {
  DSV4_REQUIRE_DEEPSEEK_TOKENIZER(tok);
  auto exp = load_json(corpus_dir() + "/expected_decode.json");
  ASSERT_GE(exp.size(), 100u);
  size_t with_replacement = 0;
  for (const auto& c : exp) {
    auto ids = ids_of(c["ids"]);
    SCOPED_TRACE(c["ids"].dump());
    std::string want = c["text"].get<std::string>();
    EXPECT_EQ(tok.decode(ids, false), want);
    EXPECT_EQ(tok.decode(ids, true), c["text_skip_special"].get<std::string>());
    // Streaming gives the same text, and every piece is complete UTF-8.
    IncrementalDecoder dec(tok);
    std::string streamed;
    for (int32_t id : ids) {
      std::string piece = dec.push(id);
      EXPECT_TRUE(utf8::valid(piece));
      streamed += piece;
    }
    streamed += dec.flush();
    EXPECT_EQ(streamed, want);
    with_replacement += want.find("\xef\xbf\xbd") != std::string::npos;
  }
  EXPECT_GT(with_replacement, 10u) << "decode cases should exercise ill-formed UTF-8";
}

TEST(TokenizerOracle, RoundTripAndStreamingOnCorpus) {
  DSV4_REQUIRE_DEEPSEEK_TOKENIZER(tok);
  auto exp = load_json(corpus_dir() + "/expected_ids.json");
  for (auto& [name, v] : exp["files"].items()) {
    SCOPED_TRACE(name);
    std::string text = read_corpus(name);
    auto ids = tok.encode(text);
    EXPECT_EQ(tok.decode(ids), text);
    IncrementalDecoder dec(tok);
    std::string streamed;
    size_t held = 0;
    for (int32_t id : ids) {
      std::string piece = dec.push(id);
      ASSERT_TRUE(utf8::valid(piece));
      held += dec.pending_bytes() > 0;
      streamed += piece;
    }
    EXPECT_EQ(dec.flush(), "");  // the corpus is valid UTF-8: nothing is left over
    EXPECT_EQ(streamed, text);
    if (name == "cjk" || name == "scripts_emoji" || name == "random_unicode") {
      EXPECT_GT(held, 0u) << "multi-byte characters split across tokens should be held back";
    }
  }
}

TEST(TokenizerOracle, ConcurrentEncodeIsConsistent) {
  DSV4_REQUIRE_DEEPSEEK_TOKENIZER(tok);
  auto exp = load_json(corpus_dir() + "/expected_ids.json");
  std::vector<std::string> names;
  for (auto& [name, v] : exp["files"].items()) names.push_back(name);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      int good = 0;
      for (size_t k = 0; k < names.size(); ++k) {
        const std::string& n = names[(k + size_t(t)) % names.size()];
        good += tok.encode(read_corpus(n)) == ids_of(exp["files"][n]["ids"]);
      }
      ok[size_t(t)] = good;
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[size_t(t)], int(names.size())) << "thread " << t;
}

// The make-tiny tokenizer.json (vocab 1024 as in the 'tiny' preset) against HF on the same corpus.
TEST(TokenizerOracle, TinyTokenizerMatchesHuggingFace) {
  Tokenizer tok = Tokenizer::from_json(tiny_tokenizer_json(1024, 0, 1), "tiny");
  auto exp = load_json(corpus_dir() + "/expected_tiny.json");
  auto cases = load_json(corpus_dir() + "/expected_ids.json")["cases"];
  for (auto& [name, ids] : exp["files"].items()) {
    SCOPED_TRACE(name);
    std::string text = read_corpus(name);
    EXPECT_TRUE(same_ids(tok, ids_of(ids), tok.encode(text)));
  }
  ASSERT_EQ(exp["cases"].size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string text = cases[i]["text"].get<std::string>();
    SCOPED_TRACE(fmt::format("{:?}", text));
    EXPECT_TRUE(same_ids(tok, ids_of(exp["cases"][i]), tok.encode(text)));
  }
}

}  // namespace
}  // namespace dsv4
