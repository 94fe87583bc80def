#include "text/tiny_tokenizer.h"

#include <map>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace dsv4 {

namespace {

// GPT-2 byte-to-unicode table used by ByteLevel BPE.
std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
    uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n++);
    std::string s;
    if (cp < 0x80) s.push_back(char(cp));
    else {
      s.push_back(char(0xc0 | (cp >> 6)));
      s.push_back(char(0x80 | (cp & 0x3f)));
    }
    out[b] = s;
  }
  return out;
}

}  // namespace

std::string tiny_tokenizer_json(int64_t vocab_size, int64_t bos_id, int64_t eos_id) {
  static const char* kSpecials[] = {
      "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
      "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
      "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
      "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"};
  const int64_t n_special = std::size(kSpecials);
  if (vocab_size < n_special + 256)
    fail("tokenizer: vocab_size {} is too small for {} special tokens and 256 bytes", vocab_size, n_special + 256);
  if (bos_id != 0 || eos_id != 1) fail("tokenizer: generated tokenizers use bos 0 and eos 1");

  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  nlohmann::json added = nlohmann::json::array();
  int64_t id = 0;
  for (const char* s : kSpecials) {
    vocab[s] = id;
    added.push_back({{"id", id}, {"content", s}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
    ++id;
  }
  auto sym = byte_symbols();
  for (int b = 0; b < 256; ++b) vocab[sym[b]] = id++;
  // Merge frequent English pairs (and a leading-space variant) until the vocabulary is full.
  static const char* kPairs[] = {"th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or",
                                 "te", "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha",
                                 "as", "ou", "io", "le", "ve", "co", "me", "de", "hi", "ri", "ro", "ic", "ne",
                                 "ea", "ra", "ce", "li", "ch", "ll", "be", "ma", "si", "om", "ur"};
  nlohmann::json merges = nlohmann::json::array();
  std::set<std::string> have;
  const std::string space = sym[' '];
  for (const char* p : kPairs) {
    if (id >= vocab_size) break;
    std::string a(1, p[0]), b(1, p[1]);
    if (have.insert(a + b).second) {
      merges.push_back(a + " " + b);
      vocab[a + b] = id++;
    }
    if (id >= vocab_size) break;
    if (have.insert(space + a).second) {
      merges.push_back(space + " " + a);
      vocab[space + a] = id++;
    }
  }
  // Fill what is left with two-letter lowercase pairs in a fixed order.
  for (char x = 'a'; x <= 'z' && id < vocab_size; ++x)
    for (char y = 'a'; y <= 'z' && id < vocab_size; ++y) {
      std::string a(1, x), b(1, y);
      if (!have.insert(a + b).second) continue;
      merges.push_back(a + " " + b);
      vocab[a + b] = id++;
    }
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added;
  // Same normalizer / pre-tokenizer / post-processor structure as DeepSeek's tokenizer.json:
  // digits in runs of up to three, CJK runs, then the word/punctuation/whitespace split, then
  // ByteLevel without its own regex.
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", nlohmann::json::array()}};
  auto split = [](const char* re) {
    return nlohmann::ordered_json{
        {"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}};
  };
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {split("\\p{N}{1,3}"), split("[一-龥぀-ゟ゠-ヿ]+"),
        split("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
              " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  j["post_processor"] = {
      {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  j["model"] = {{"type", "BPE"},          {"dropout", nullptr},        {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},      {"byte_fallback", false},    {"vocab", vocab},
                {"merges", merges}};
  return j.dump(1) + "\n";
}

}  // namespace dsv4
