// libFuzzer target for dsv4::Tokenizer. The first input byte picks a mode:
//   0: encode the rest as text with the tiny tokenizer (and DeepSeek's, if DSV4_FUZZ_TOKENIZER names
//      its tokenizer.json): ids in range, decode(encode(x)) == x, streaming decode == decode;
//      invalid UTF-8 must raise dsv4::Error. Also with plain ranges (added tokens matched only
//      outside them): the middle third plain, and all of it plain, when no added token may appear.
//   1: decode the rest as little-endian int32 ids: output is valid UTF-8, streaming == one-shot,
//      unknown ids raise dsv4::Error.
//   2: load the rest as a tokenizer.json: either an Error or a usable tokenizer.
//   3: a tokenizer using every pre-tokenizer feature (split behaviours, invert, String patterns,
//      ByteLevel prefix space + regex, lstrip / rstrip / single_word added tokens) with a fuzzed
//      regex, then encode: no crash, ids in range, decode valid UTF-8.
// Any other exception type, a sanitizer report or a broken invariant is a finding.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "text/tiny_tokenizer.h"
#include "text/tokenizer.h"
#include "util/utf8.h"
#include "util/error.h"

namespace {

using dsv4::Error;
using dsv4::IncrementalDecoder;
using dsv4::Tokenizer;

#define CHECK(c)                                                              \
  do {                                                                        \
    if (!(c)) {                                                               \
      std::fprintf(stderr, "invariant failed: %s (line %d)\n", #c, __LINE__); \
      std::abort();                                                           \
    }                                                                         \
  } while (0)

struct Toks {
  std::vector<Tokenizer> round_trip;  // tokenizers for which decode(encode(x)) == x
  std::string tiny_json;
};

const Toks& toks() {
  static const Toks t = [] {
    Toks t;
    t.tiny_json = dsv4::tiny_tokenizer_json(1024, 0, 1);
    t.round_trip.push_back(Tokenizer::from_json(t.tiny_json, "tiny"));
    if (const char* p = std::getenv("DSV4_FUZZ_TOKENIZER"); p && *p) t.round_trip.push_back(Tokenizer::load(p));
    return t;
  }();
  return t;
}

void check_decode(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  std::string once = tok.decode(ids, skip_special);
  CHECK(dsv4::utf8::valid(once));
  IncrementalDecoder dec(tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    std::string piece = dec.push(id);
    CHECK(dsv4::utf8::valid(piece));
    streamed += piece;
  }
  streamed += dec.flush();
  CHECK(streamed == once);
}

void check_ids(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) CHECK(tok.contains(id));
}

void mode_encode(std::string_view text) {
  bool valid = dsv4::utf8::valid(text);
  for (const Tokenizer& tok : toks().round_trip) {
    for (bool allow_special : {true, false}) {
      std::vector<int32_t> ids;
      try {
        ids = tok.encode(text, allow_special);
      } catch (const Error&) {
        CHECK(!valid);
        continue;
      }
      CHECK(valid);
      check_ids(tok, ids);
      CHECK(tok.decode(ids) == text);
      check_decode(tok, ids, false);
    }
    if (!valid) continue;
    const dsv4::ByteRange middle{text.size() / 3, 2 * text.size() / 3}, all{0, text.size()};
    std::vector<int32_t> ids = tok.encode(text, std::vector<dsv4::ByteRange>{middle});
    check_ids(tok, ids);
    CHECK(tok.decode(ids) == text);
    ids = tok.encode(text, std::vector<dsv4::ByteRange>{all});
    CHECK(tok.decode(ids) == text);
    for (int32_t id : ids) CHECK(!tok.is_added(id));
  }
}

void mode_decode(std::string_view data) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 4 <= data.size(); i += 4) {
    int32_t v;
    std::memcpy(&v, data.data() + i, 4);
    ids.push_back(v);
  }
  for (const Tokenizer& tok : toks().round_trip) {
    std::vector<int32_t> in_range;
    bool all_known = true;
    for (int32_t v : ids) {
      all_known &= tok.contains(v);
      // Fold most values into the vocabulary so decode gets exercised, keep some raw.
      in_range.push_back((v & 0x7) == 0 ? v : int32_t(uint32_t(v) % uint32_t(tok.vocab_size())));
    }
    try {
      (void)tok.decode(ids);
      CHECK(all_known);
    } catch (const Error&) {
      CHECK(!all_known);
    }
    bool known = true;
    for (int32_t v : in_range) known &= tok.contains(v);
    if (known) {
      check_decode(tok, in_range, false);
      check_decode(tok, in_range, true);
    }
  }
}

void exercise(const Tokenizer& tok, std::string_view text) {
  for (bool allow_special : {true, false}) {
    std::vector<int32_t> ids;
    try {
      ids = tok.encode(text, allow_special);
    } catch (const Error&) {
      continue;
    }
    check_ids(tok, ids);
    check_decode(tok, ids, false);
    check_decode(tok, ids, true);
  }
}

void mode_load(std::string_view data) {
  try {
    Tokenizer tok = Tokenizer::from_json(data, "fuzz.json");
    exercise(tok, "Hello, world! 123 中文 <｜User｜>");
    exercise(tok, data.substr(0, 256));
  } catch (const Error&) {
  }
}

void mode_features(std::string_view data) {
  // data = regex \0 text
  size_t z = data.find('\0');
  std::string_view regex = data.substr(0, std::min<size_t>(z, 64));
  std::string_view text = z == std::string_view::npos ? std::string_view() : data.substr(z + 1);
  // A cut-down tiny tokenizer (specials, bytes, 40 merges) keeps each load cheap.
  static const nlohmann::json base = [] {
    nlohmann::json b = nlohmann::json::parse(toks().tiny_json);
    const size_t keep = 40;
    const int64_t limit = 19 + 256 + int64_t(keep);
    nlohmann::json vocab = nlohmann::json::object();
    for (auto& [k, v] : b["model"]["vocab"].items())
      if (v.get<int64_t>() < limit) vocab[k] = v;
    b["model"]["vocab"] = vocab;
    nlohmann::json merges = nlohmann::json::array();
    for (size_t i = 0; i < keep && i < b["model"]["merges"].size(); ++i) merges.push_back(b["model"]["merges"][i]);
    b["model"]["merges"] = merges;
    return b;
  }();
  if (!dsv4::utf8::valid(regex)) return;  // JSON strings are UTF-8
  // Loading (JSON + regex JIT) dominates; reuse tokenizers across inputs that differ only in text.
  static std::map<std::string, std::optional<Tokenizer>, std::less<>> cache;
  auto it = cache.find(regex);
  if (it == cache.end()) {
    nlohmann::json j = base;
    const char* behaviors[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    nlohmann::json seq = nlohmann::json::array();
    size_t pick = regex.empty() ? 0 : size_t(uint8_t(regex[0]));
    seq.push_back({{"type", "Split"},
                   {"pattern", {{"Regex", std::string(regex)}}},
                   {"behavior", behaviors[pick % 5]},
                   {"invert", (pick / 5) % 2 == 1}});
    seq.push_back({{"type", "Split"},
                   {"pattern", {{"String", "-"}}},
                   {"behavior", behaviors[(pick / 10) % 5]},
                   {"invert", true}});
    seq.push_back({{"type", "ByteLevel"}, {"add_prefix_space", (pick & 1) != 0}, {"use_regex", (pick & 2) != 0}});
    j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", seq}};
    j["added_tokens"][3]["lstrip"] = true;
    j["added_tokens"][4]["rstrip"] = true;
    j["added_tokens"][5]["single_word"] = true;
    j["added_tokens"][6]["normalized"] = true;
    j["added_tokens"][6]["special"] = false;
    if (cache.size() >= 512) cache.clear();
    std::optional<Tokenizer> tok;
    try {
      tok = Tokenizer::from_json(j.dump(), "features");
    } catch (const Error&) {
    }
    it = cache.emplace(std::string(regex), std::move(tok)).first;
  }
  if (it->second) exercise(*it->second, text);
}

}  // namespace

// Loading the DeepSeek tokenizer.json takes tens of seconds under ASan on a loaded machine: do it
// before libFuzzer's per-input timeout starts counting.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)toks();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view in(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 4) {
    case 0: mode_encode(in); break;
    case 1: mode_decode(in); break;
    case 2: mode_load(in); break;
    case 3: mode_features(in); break;
  }
  return 0;
}
