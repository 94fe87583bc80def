// Logprob formatting helpers: one top_logprobs key per distinct token, text_offset in characters.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "server/api.h"
#include "text/tiny_tokenizer.h"

using namespace dsv4;
using namespace dsv4::server;

TEST(ApiLogprobs, EveryDistinctTokenHasItsOwnKey) {
  Tokenizer tok = Tokenizer::from_json(tiny_tokenizer_json(1024, 0, 1), "tiny");
  std::map<std::string, std::string> bytes_of_key;  // key -> the token bytes that produced it
  int partial = 0;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (!tok.contains(id)) continue;
    std::string bytes(tok.token_bytes(id));
    std::string key = logprob_token_text(bytes);
    auto [it, inserted] = bytes_of_key.emplace(key, bytes);
    EXPECT_TRUE(inserted || it->second == bytes) << "token " << id << " shares key " << key;
    partial += key.rfind("bytes:", 0) == 0;
  }
  EXPECT_GE(partial, 128) << "the 128 bytes >= 0x80 are not UTF-8 on their own";
  EXPECT_EQ(logprob_token_text("\xE4\xB8"), "bytes:\\xe4\\xb8");
  EXPECT_EQ(logprob_token_text("\xC3\xA9"), "\xC3\xA9");
}

TEST(ApiLogprobs, TextOffsetCountsCharacters) {
  // "é" (2 bytes) as two tokens, then "中" (3 bytes) whole, then "x".
  TextOffsets off;
  EXPECT_EQ(off.next("\xC3"), 0u);
  EXPECT_EQ(off.next("\xA9"), 0u);  // still inside "é"
  EXPECT_EQ(off.next("\xE4\xB8\xAD"), 1u);
  EXPECT_EQ(off.next("x"), 2u);
  EXPECT_EQ(off.next("yz"), 3u);
}
