#pragma once
// Shared helpers of the chat-format / output-parser tests: the committed cases
// (tests/data/text/chat_cases.json) and the official encoder's outputs for them
// (tests/data/text/chat_vectors.json, scripts/text/gen_chat_vectors.py).
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "text/pyjson.h"

namespace dsv4::testing_chat {

inline ojson load_json(const std::string& rel) {
  std::string path = std::string(DSV4_SOURCE_DIR) + "/" + rel;
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ojson::parse(ss.str());
}

inline const ojson& cases() {
  static const ojson j = load_json("tests/data/text/chat_cases.json");
  return j;
}
inline const ojson& vectors() {
  static const ojson j = load_json("tests/data/text/chat_vectors.json");
  return j;
}

// First differing byte, for readable failures of long prompts.
inline std::string first_diff(const std::string& want, const std::string& got) {
  size_t i = 0;
  while (i < want.size() && i < got.size() && want[i] == got[i]) ++i;
  auto ctx = [&](const std::string& s) {
    size_t b = i > 40 ? i - 40 : 0;
    return ojson(s.substr(b, 80)).dump(-1, ' ', false, ojson::error_handler_t::replace);
  };
  return "first difference at byte " + std::to_string(i) + " (sizes " + std::to_string(want.size()) + " vs " +
         std::to_string(got.size()) + ")\n want: " + ctx(want) + "\n got:  " + ctx(got);
}

}  // namespace dsv4::testing_chat
