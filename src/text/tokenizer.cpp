#include "text/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <mutex>
#include <queue>
#include <unordered_map>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <nlohmann/json.hpp>

#include "util/utf8.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace dsv4 {

using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// Byte-level alphabet: every byte maps to one printable code point (GPT-2's table).
struct ByteAlphabet {
  std::array<uint32_t, 256> cp{};          // byte -> code point
  std::array<int16_t, 324> byte_of{};      // code point (< 324) -> byte, or -1
  ByteAlphabet() {
    byte_of.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
      cp[b] = printable ? uint32_t(b) : uint32_t(256 + n++);
      byte_of[cp[b]] = int16_t(b);
    }
  }
};
const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

void append_cp(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else if (cp < 0x800) {
    s.push_back(char(0xc0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    s.push_back(char(0xe0 | (cp >> 12)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  } else {
    s.push_back(char(0xf0 | (cp >> 18)));
    s.push_back(char(0x80 | ((cp >> 12) & 0x3f)));
    s.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  }
}

// Decodes one code point from valid UTF-8 at s[i]; advances i.
uint32_t next_cp(std::string_view s, size_t& i) {
  auto b = uint8_t(s[i]);
  size_t len = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
  uint32_t cp = len == 1 ? b : len == 2 ? (b & 0x1f) : len == 3 ? (b & 0x0f) : (b & 0x07);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3f);
  i += len;
  return cp;
}

// Raw bytes a vocab token stands for: byte-level symbols mapped back to bytes; a token with any
// code point outside the alphabet (e.g. an added token like "<｜User｜>") stands for its own UTF-8.
std::string token_to_bytes(std::string_view tok) {
  const auto& a = alphabet();
  std::string out;
  if (!utf8::valid(tok)) return std::string(tok);
  for (size_t i = 0; i < tok.size();) {
    uint32_t cp = next_cp(tok, i);
    if (cp >= a.byte_of.size() || a.byte_of[cp] < 0) return std::string(tok);
    out.push_back(char(a.byte_of[cp]));
  }
  return out;
}

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return size_t(XXH3_64bits(s.data(), s.size())); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, SvHash, std::equal_to<>>;

// Open-addressing map (id_a, id_b) -> (rank, merged id), hashed with XXH3.
class PairMap {
 public:
  struct Slot {
    uint64_t key = kEmpty;
    uint32_t rank = 0;
    int32_t id = -1;
  };
  static constexpr uint64_t kEmpty = ~uint64_t(0);

  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  // Later entries overwrite earlier ones (as HF's HashMap collect does).
  void put(int32_t a, int32_t b, uint32_t rank, int32_t id) {
    uint64_t k = key(a, b);
    size_t i = hash(k) & mask_;
    while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask_;
    slots_[i] = {k, rank, id};
  }
  const Slot* find(int32_t a, int32_t b) const {
    uint64_t k = key(a, b);
    size_t i = hash(k) & mask_;
    for (;;) {
      const Slot& s = slots_[i];
      if (s.key == k) return &s;
      if (s.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }

 private:
  static uint64_t hash(uint64_t k) { return XXH3_64bits(&k, sizeof k); }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Byte trie over added-token contents for leftmost-longest matching.
class TokenTrie {
 public:
  TokenTrie() { nodes_.emplace_back(); }
  void add(std::string_view s, int32_t index) {
    if (s.empty()) return;
    uint32_t n = 0;
    for (char ch : s) {
      auto c = uint8_t(ch);
      uint32_t nx = child(n, c);
      if (nx == 0) {
        nx = uint32_t(nodes_.size());
        nodes_.emplace_back();
        nodes_[n].kids.emplace_back(c, nx);
      }
      n = nx;
    }
    nodes_[n].index = index;
    first_[uint8_t(s[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }
  // Longest token starting at text[pos]: returns {index, length} or {-1, 0}.
  std::pair<int32_t, size_t> longest_at(std::string_view text, size_t pos) const {
    if (!first_[uint8_t(text[pos])]) return {-1, 0};
    uint32_t n = 0;
    std::pair<int32_t, size_t> best{-1, 0};
    for (size_t i = pos; i < text.size(); ++i) {
      n = child(n, uint8_t(text[i]));
      if (n == 0) break;
      if (nodes_[n].index >= 0) best = {nodes_[n].index, i + 1 - pos};
    }
    return best;
  }
  bool may_start(uint8_t c) const { return first_[c]; }

 private:
  struct Node {
    int32_t index = -1;
    std::vector<std::pair<uint8_t, uint32_t>> kids;
  };
  uint32_t child(uint32_t n, uint8_t c) const {
    for (const auto& [k, v] : nodes_[n].kids)
      if (k == c) return v;
    return 0;
  }
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
  bool empty_ = true;
};

struct CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
using CodePtr = std::unique_ptr<pcre2_code, CodeDeleter>;

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreStep {
  enum Kind { kSplit, kPrefixSpace } kind = kSplit;
  CodePtr code;
  bool jit = false;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
};

// White_Space code points (for lstrip / rstrip of added tokens).
bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
         cp == 0x3000;
}

// HF tokenizers matches with Oniguruma, whose \s is exactly Unicode White_Space; PCRE2's UCP \s
// also takes U+180E (and other \h / \v extras). Rewrite \s and \S to the White_Space set so the
// two engines split alike. (\S inside a character class is left to PCRE2: it cannot be expanded
// there, and no known tokenizer uses it.)
constexpr const char* kWhiteSpace =
    "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

std::string onig_compatible(std::string_view re) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < re.size(); ++i) {
    char ch = re[i];
    if (ch == '\\' && i + 1 < re.size()) {
      char e = re[i + 1];
      if (e == 's') out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
      else if (e == 'S' && !in_class) out += "[^" + std::string(kWhiteSpace) + "]";
      else out.append(re.substr(i, 2));
      ++i;
      continue;
    }
    if (!in_class && ch == '[') {
      in_class = true;
      out += ch;
      // A ']' right after '[' or '[^' is a literal member.
      if (i + 1 < re.size() && re[i + 1] == '^') out += re[++i];
      if (i + 1 < re.size() && re[i + 1] == ']') out += re[++i];
      continue;
    }
    if (in_class && ch == '[' && i + 1 < re.size() && re[i + 1] == ':') {  // POSIX class [:name:]
      size_t end = re.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(re.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && ch == ']') in_class = false;
    out += ch;
  }
  return out;
}

constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ---------------------------------------------------------------------------------------------
// JSON access with errors that name the file and field.
constexpr int64_t kMaxId = int64_t(1) << 22;

struct Ctx {
  const std::string& origin;
  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail("tokenizer {}: {}: {}", origin, field, what);
  }
  const json& member(const json& obj, const std::string& field, const char* key) const {
    if (!obj.is_object()) bad(field, "expected an object");
    auto it = obj.find(key);
    if (it == obj.end()) bad(field.empty() ? key : field + "." + key, "missing");
    return *it;
  }
  const json* optional(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  std::string str(const json& v, const std::string& field) const {
    if (!v.is_string()) bad(field, fmt::format("expected a string, got {}", v.type_name()));
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& field, const char* key, bool dflt) const {
    const json* v = optional(obj, key);
    if (!v) return dflt;
    if (!v->is_boolean()) bad(field + "." + key, fmt::format("expected a boolean, got {}", v->type_name()));
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& field) const {
    if (!v.is_number_integer()) bad(field, fmt::format("expected an integer id, got {}", v.type_name()));
    int64_t x = v.get<int64_t>();
    // Ids index dense tables; the bound keeps a hostile file from asking for gigabytes.
    if (x < 0 || x >= kMaxId) bad(field, fmt::format("id {} is out of range [0, {})", x, kMaxId));
    return int32_t(x);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
struct Tokenizer::Impl {
  std::string origin;
  // Vocabulary (model vocab and added tokens).
  std::vector<std::string> text;     // id -> token text as in the json
  std::vector<std::string> bytes;    // id -> raw bytes
  std::vector<uint8_t> present, special, added;
  StrMap<int32_t> by_text;
  // BPE.
  std::array<int32_t, 256> byte_id{};
  PairMap merges;
  std::optional<int32_t> unk;
  bool fuse_unk = false, ignore_merges = false;
  StrMap<int32_t> by_bytes;  // model tokens by raw bytes (ignore_merges only)
  // Added tokens: phase 0 = non-normalized (matched first), phase 1 = normalized.
  std::vector<AddedToken> added_tokens;
  TokenTrie trie[2];
  CodePtr word_char;  // for single_word
  // Pre-tokenizer.
  std::vector<PreStep> steps;
  std::optional<int32_t> bos, eos;

  // Word cache: raw pre-token bytes -> ids. Sharded and locked; a full shard is cleared.
  static constexpr size_t kShards = 16, kShardCap = 8192, kMaxCachedWord = 96;
  struct Shard {
    std::mutex mu;
    StrMap<std::vector<int32_t>> map;
  };
  mutable std::array<Shard, kShards> cache;

  // Per-call state.
  struct Run {
    std::vector<pcre2_match_data*> md;
    std::deque<std::string> arena;
    std::vector<std::pair<size_t, size_t>> scratch;  // general split behaviours
    ~Run() {
      for (auto* m : md) pcre2_match_data_free(m);
    }
  };

  void load(const json& j);
  void load_model(const Ctx& c, const json& model);
  void load_added(const Ctx& c, const json& arr);
  void load_pre(const Ctx& c, const json* pre);
  CodePtr compile(const Ctx& c, const std::string& field, const std::string& pattern, bool literal, bool* jit) const;
  void set_token(const Ctx& c, int32_t id, const std::string& s, const std::string& field, bool is_added);

  // What split_added may match: special tokens or not, and nowhere overlapping `plain` (offsets
  // of the whole text; `base` is the offset of the piece being split).
  struct AddedMatching {
    bool allow_special = true;
    std::span<const ByteRange> plain;
    bool overlaps_plain(size_t begin, size_t end) const;
  };
  void encode(std::string_view text, std::vector<int32_t>& out, const AddedMatching& matching) const;
  void split_added(std::string_view text, size_t base, int phase, const AddedMatching& matching,
                   std::vector<int32_t>& out, Run& run) const;
  void pre_tokenize(size_t step, std::string_view piece, std::vector<int32_t>& out, Run& run) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_merge(const uint8_t* p, size_t n, std::vector<int32_t>& out) const;
  bool is_word_char_before(std::string_view s, size_t end) const;
  bool is_word_char_at(std::string_view s, size_t pos) const;
  [[noreturn]] void bad_id(int32_t id, size_t pos) const {
    fail("tokenizer {}: token id {} at position {} is not in the vocabulary (valid ids: 0..{})", origin, id, pos,
         int64_t(text.size()) - 1);
  }
  [[noreturn]] void bad_id(int32_t id) const {
    fail("tokenizer {}: token id {} is not in the vocabulary (valid ids: 0..{})", origin, id, int64_t(text.size()) - 1);
  }
};

void Tokenizer::Impl::set_token(const Ctx& c, int32_t id, const std::string& s, const std::string& field,
                                bool is_added) {
  if (size_t(id) >= text.size()) {
    size_t n = std::max(size_t(id) + 1, text.size() * 2);
    text.resize(n);
    bytes.resize(n);
    present.resize(n, 0);
    special.resize(n, 0);
    added.resize(n, 0);
  }
  if (present[id] && !is_added)
    c.bad(field, fmt::format("id {} is used by both '{}' and '{}'", id, text[id], s));
  text[id] = s;
  bytes[id] = token_to_bytes(s);
  present[id] = 1;
  if (is_added) added[id] = 1;
}

CodePtr Tokenizer::Impl::compile(const Ctx& c, const std::string& field, const std::string& pattern, bool literal,
                                 bool* jit) const {
  int err = 0;
  PCRE2_SIZE off = 0;
  uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  auto try_compile = [&](const std::string& re) {
    return pcre2_compile(reinterpret_cast<PCRE2_SPTR>(re.data()), re.size(), opts, &err, &off, nullptr);
  };
  // Syntax errors are reported against the pattern as written in the file.
  pcre2_code* code = try_compile(pattern);
  if (code && !literal) {
    pcre2_code_free(code);
    code = try_compile(onig_compatible(pattern));
  }
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    c.bad(field, fmt::format("bad regex at offset {}: {}", size_t(off), reinterpret_cast<const char*>(msg)));
  }
  *jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return CodePtr(code);
}

void Tokenizer::Impl::load(const json& j) {
  Ctx c{origin};
  if (!j.is_object()) c.bad("(top level)", "expected a JSON object");
  if (const json* norm = c.optional(j, "normalizer")) {
    std::string type = c.str(c.member(*norm, "normalizer", "type"), "normalizer.type");
    bool empty_seq = type == "Sequence" && norm->contains("normalizers") && (*norm)["normalizers"].is_array() &&
                     (*norm)["normalizers"].empty();
    if (!empty_seq) c.bad("normalizer", fmt::format("type '{}' is not supported (only null or an empty Sequence)", type));
  }
  const json& model = c.member(j, "", "model");
  load_model(c, model);
  if (const json* at = c.optional(j, "added_tokens")) load_added(c, *at);
  load_pre(c, c.optional(j, "pre_tokenizer"));
  if (const json* dec = c.optional(j, "decoder")) {
    std::string type = c.str(c.member(*dec, "decoder", "type"), "decoder.type");
    if (type != "ByteLevel") c.bad("decoder.type", fmt::format("'{}' is not supported (only ByteLevel)", type));
  }
  // Trim trailing holes so vocab_size is 1 + the largest id.
  size_t n = present.size();
  while (n > 0 && !present[n - 1]) --n;
  text.resize(n);
  bytes.resize(n);
  present.resize(n);
  special.resize(n);
  added.resize(n);
  if (n == 0) c.bad("model.vocab", "is empty");
  auto find = [&](std::string_view s) -> std::optional<int32_t> {
    auto it = by_text.find(s);
    if (it == by_text.end()) return std::nullopt;
    return it->second;
  };
  bos = find("<｜begin▁of▁sentence｜>");
  eos = find("<｜end▁of▁sentence｜>");
}

void Tokenizer::Impl::load_model(const Ctx& c, const json& model) {
  std::string type = c.str(c.member(model, "model", "type"), "model.type");
  if (type != "BPE") c.bad("model.type", fmt::format("'{}' is not supported (only BPE)", type));
  if (const json* d = c.optional(model, "dropout"))
    if (!d->is_number() || d->get<double>() != 0.0) c.bad("model.dropout", "BPE dropout is not supported");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = c.optional(model, k))
      if (!v->is_string() || !v->get<std::string>().empty())
        c.bad(std::string("model.") + k, "is not supported (must be null)");
  if (c.boolean(model, "model", "byte_fallback", false)) c.bad("model.byte_fallback", "is not supported");
  fuse_unk = c.boolean(model, "model", "fuse_unk", false);
  ignore_merges = c.boolean(model, "model", "ignore_merges", false);

  const json& vocab = c.member(model, "model", "vocab");
  if (!vocab.is_object()) c.bad("model.vocab", fmt::format("expected an object, got {}", vocab.type_name()));
  by_text.reserve(vocab.size() * 2);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    std::string field = "model.vocab[\"" + it.key() + "\"]";
    int32_t id = c.id(it.value(), field);
    set_token(c, id, it.key(), field, false);
    by_text.emplace(it.key(), id);
  }
  if (const json* u = c.optional(model, "unk_token")) {
    std::string s = c.str(*u, "model.unk_token");
    auto it = by_text.find(s);
    if (it == by_text.end()) c.bad("model.unk_token", fmt::format("'{}' is not in model.vocab", s));
    unk = it->second;
  }
  const auto& a = alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string sym;
    append_cp(sym, a.cp[b]);
    auto it = by_text.find(sym);
    byte_id[b] = it == by_text.end() ? -1 : it->second;
  }
  if (ignore_merges)
    for (const auto& [t, id] : by_text) by_bytes.emplace(bytes[id], id);

  const json& ms = c.member(model, "model", "merges");
  if (!ms.is_array()) c.bad("model.merges", fmt::format("expected an array, got {}", ms.type_name()));
  merges.reserve(ms.size());
  for (size_t r = 0; r < ms.size(); ++r) {
    const json& m = ms[r];
    std::string field = fmt::format("model.merges[{}]", r);
    std::string left, right;
    if (m.is_string()) {
      std::string s = m.get<std::string>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        c.bad(field, fmt::format("'{}' is not two tokens separated by one space", s));
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      c.bad(field, "expected \"a b\" or [\"a\", \"b\"]");
    }
    auto la = by_text.find(left), rb = by_text.find(right);
    if (la == by_text.end()) c.bad(field, fmt::format("token '{}' is not in model.vocab", left));
    if (rb == by_text.end()) c.bad(field, fmt::format("token '{}' is not in model.vocab", right));
    auto mg = by_text.find(left + right);
    if (mg == by_text.end()) c.bad(field, fmt::format("merged token '{}' is not in model.vocab", left + right));
    merges.put(la->second, rb->second, uint32_t(r), mg->second);
  }
}

void Tokenizer::Impl::load_added(const Ctx& c, const json& arr) {
  if (!arr.is_array()) c.bad("added_tokens", fmt::format("expected an array, got {}", arr.type_name()));
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string field = fmt::format("added_tokens[{}]", i);
    const json& t = arr[i];
    AddedToken a;
    a.id = c.id(c.member(t, field, "id"), field + ".id");
    a.content = c.str(c.member(t, field, "content"), field + ".content");
    if (a.content.empty()) c.bad(field + ".content", "is empty");
    if (!utf8::valid(a.content)) c.bad(field + ".content", "is not valid UTF-8");
    a.special = c.boolean(t, field, "special", false);
    a.lstrip = c.boolean(t, field, "lstrip", false);
    a.rstrip = c.boolean(t, field, "rstrip", false);
    a.single_word = c.boolean(t, field, "single_word", false);
    a.normalized = c.boolean(t, field, "normalized", !a.special);
    set_token(c, a.id, a.content, field, true);
    special[a.id] = a.special;
    by_text[a.content] = a.id;
    added_tokens.push_back(a);
  }
  bool any_single = false;
  for (size_t i = 0; i < added_tokens.size(); ++i) {
    const AddedToken& a = added_tokens[i];
    trie[a.normalized ? 1 : 0].add(a.content, int32_t(i));
    any_single |= a.single_word;
  }
  if (any_single) {
    bool jit = false;
    word_char = compile(c, "(single_word)", "[\\p{L}\\p{N}_]", false, &jit);
  }
}

void Tokenizer::Impl::load_pre(const Ctx& c, const json* pre) {
  std::vector<std::pair<const json*, std::string>> list;
  if (pre) {
    std::string type = c.str(c.member(*pre, "pre_tokenizer", "type"), "pre_tokenizer.type");
    if (type == "Sequence") {
      const json& ps = c.member(*pre, "pre_tokenizer", "pretokenizers");
      if (!ps.is_array()) c.bad("pre_tokenizer.pretokenizers", "expected an array");
      for (size_t i = 0; i < ps.size(); ++i)
        list.emplace_back(&ps[i], fmt::format("pre_tokenizer.pretokenizers[{}]", i));
    } else {
      list.emplace_back(pre, "pre_tokenizer");
    }
  }
  bool byte_level = false;
  for (const auto& [p, field] : list) {
    std::string type = c.str(c.member(*p, field, "type"), field + ".type");
    if (byte_level) c.bad(field, "nothing may follow the ByteLevel pre-tokenizer");
    if (type == "Split") {
      PreStep s;
      const json& pat = c.member(*p, field, "pattern");
      std::string pattern;
      bool literal = false;
      if (pat.is_object() && pat.contains("Regex")) {
        pattern = c.str(pat["Regex"], field + ".pattern.Regex");
      } else if (pat.is_object() && pat.contains("String")) {
        pattern = c.str(pat["String"], field + ".pattern.String");
        literal = true;
      } else {
        c.bad(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
      }
      s.code = compile(c, field + ".pattern", pattern, literal, &s.jit);
      std::string beh = c.str(c.member(*p, field, "behavior"), field + ".behavior");
      if (beh == "Removed") s.behavior = Behavior::Removed;
      else if (beh == "Isolated") s.behavior = Behavior::Isolated;
      else if (beh == "MergedWithPrevious") s.behavior = Behavior::MergedWithPrevious;
      else if (beh == "MergedWithNext") s.behavior = Behavior::MergedWithNext;
      else if (beh == "Contiguous") s.behavior = Behavior::Contiguous;
      else c.bad(field + ".behavior", fmt::format("unknown behavior '{}'", beh));
      s.invert = c.boolean(*p, field, "invert", false);
      steps.push_back(std::move(s));
    } else if (type == "ByteLevel") {
      byte_level = true;
      if (c.boolean(*p, field, "add_prefix_space", true)) {
        PreStep s;
        s.kind = PreStep::kPrefixSpace;
        steps.push_back(std::move(s));
      }
      if (c.boolean(*p, field, "use_regex", true)) {
        PreStep s;
        s.code = compile(c, field + " (ByteLevel regex)", kGpt2Pattern, false, &s.jit);
        steps.push_back(std::move(s));
      }
    } else {
      c.bad(field + ".type", fmt::format("pre-tokenizer type '{}' is not supported (Sequence, Split, ByteLevel)", type));
    }
  }
  if (!byte_level) c.bad("pre_tokenizer", "no ByteLevel pre-tokenizer: only byte-level BPE tokenizers are supported");
}

// ---------------------------------------------------------------------------------------------
// Encoding.

bool Tokenizer::Impl::is_word_char_at(std::string_view s, size_t pos) const {
  if (pos >= s.size() || !word_char) return false;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(word_char.get(), nullptr);
  int rc = pcre2_match(word_char.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                       PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, md, nullptr);
  pcre2_match_data_free(md);
  return rc > 0;
}

bool Tokenizer::Impl::is_word_char_before(std::string_view s, size_t end) const {
  if (end == 0) return false;
  size_t i = end - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xc0) == 0x80) --i;
  return is_word_char_at(s, i);
}

bool Tokenizer::Impl::AddedMatching::overlaps_plain(size_t begin, size_t end) const {
  auto it = std::upper_bound(plain.begin(), plain.end(), begin, [](size_t b, const ByteRange& r) { return b < r.end; });
  return it != plain.end() && it->begin < end;
}

void Tokenizer::Impl::encode(std::string_view text, std::vector<int32_t>& out, const AddedMatching& matching) const {
  size_t bad = utf8::first_invalid(text);
  if (bad != std::string_view::npos) fail("tokenizer: input text is not valid UTF-8 (byte offset {})", bad);
  Run run;
  run.md.resize(steps.size(), nullptr);
  for (size_t i = 0; i < steps.size(); ++i)
    if (steps[i].code) run.md[i] = pcre2_match_data_create_from_pattern(steps[i].code.get(), nullptr);
  split_added(text, 0, 0, matching, out, run);
}

// Splits `text` on the added tokens of `phase` (leftmost-longest, non-overlapping), emits their
// ids, and passes the text between them on to the next phase / the pre-tokenizer.
void Tokenizer::Impl::split_added(std::string_view text, size_t base, int phase, const AddedMatching& matching,
                                  std::vector<int32_t>& out, Run& run) const {
  auto pass_on = [&](std::string_view piece) {
    if (piece.empty()) return;
    if (phase == 0) split_added(piece, base + size_t(piece.data() - text.data()), 1, matching, out, run);
    else pre_tokenize(0, piece, out, run);
  };
  const TokenTrie& t = trie[phase];
  if (t.empty()) return pass_on(text);
  size_t prev = 0, pos = 0;
  const size_t n = text.size();
  while (pos < n) {
    if (!t.may_start(uint8_t(text[pos]))) {
      ++pos;
      continue;
    }
    auto [index, len] = t.longest_at(text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& a = added_tokens[size_t(index)];
    size_t start = pos, stop = pos + len;
    // A match touching plain text is no match: look again one byte on, so that a token of the
    // template text right after it is still found.
    if (matching.overlaps_plain(base + start, base + stop)) {
      ++pos;
      continue;
    }
    pos = stop;  // the match is consumed even when it is then skipped (as aho-corasick does)
    if (a.special && !matching.allow_special) continue;
    if (a.single_word && (is_word_char_before(text, start) || is_word_char_at(text, stop))) continue;
    if (a.lstrip) {
      size_t s = start;
      while (s > prev) {
        size_t k = s - 1;
        while (k > prev && (uint8_t(text[k]) & 0xc0) == 0x80) --k;
        size_t kk = k;
        if (!is_white_space(next_cp(text, kk))) break;
        s = k;
      }
      start = s;
    }
    if (a.rstrip) {
      while (stop < n) {
        size_t k = stop;
        if (!is_white_space(next_cp(text, k))) break;
        stop = k;
      }
      pos = stop;
    }
    pass_on(text.substr(prev, start - prev));
    out.push_back(a.id);
    prev = stop;
  }
  pass_on(text.substr(prev));
}

void Tokenizer::Impl::pre_tokenize(size_t k, std::string_view piece, std::vector<int32_t>& out, Run& run) const {
  if (piece.empty()) return;
  if (k == steps.size()) return bpe(piece, out);
  const PreStep& st = steps[k];
  if (st.kind == PreStep::kPrefixSpace) {
    if (piece[0] == ' ') return pre_tokenize(k + 1, piece, out, run);
    run.arena.push_back(" " + std::string(piece));
    return pre_tokenize(k + 1, run.arena.back(), out, run);
  }
  pcre2_match_data* md = run.md[k];
  const auto* subj = reinterpret_cast<PCRE2_SPTR>(piece.data());
  const size_t n = piece.size();
  auto next_match = [&](size_t from, size_t& ms, size_t& me) -> bool {
    if (from > n) return false;
    int rc = st.jit ? pcre2_jit_match(st.code.get(), subj, n, from, PCRE2_NO_UTF_CHECK, md, nullptr)
                    : pcre2_match(st.code.get(), subj, n, from, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      fail("tokenizer {}: pre-tokenizer regex failed: {}", origin, reinterpret_cast<const char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    ms = ov[0];
    me = ov[1];
    return true;
  };
  auto advance = [&](size_t ms, size_t me) {
    if (me > ms) return me;
    if (ms >= n) return n + 1;
    size_t l = utf8::sequence_length(piece.substr(ms));
    return ms + (l ? l : 1);
  };
  if (st.behavior == Behavior::Isolated) {  // every match and every gap is a piece (invert is moot)
    size_t prev = 0, from = 0, ms = 0, me = 0;
    while (next_match(from, ms, me)) {
      if (ms > prev) pre_tokenize(k + 1, piece.substr(prev, ms - prev), out, run);
      if (me > ms) pre_tokenize(k + 1, piece.substr(ms, me - ms), out, run);
      prev = me;
      from = advance(ms, me);
    }
    if (prev < n) pre_tokenize(k + 1, piece.substr(prev), out, run);
    return;
  }
  // General behaviours: list (begin, end, is_match) covering the piece, then combine.
  struct Part {
    size_t b, e;
    bool m;
  };
  std::vector<Part> parts;
  {
    size_t prev = 0, from = 0, ms = 0, me = 0;
    while (next_match(from, ms, me)) {
      if (ms > prev) parts.push_back({prev, ms, st.invert});
      parts.push_back({ms, me, !st.invert});
      prev = me;
      from = advance(ms, me);
    }
    if (prev < n) parts.push_back({prev, n, st.invert});
  }
  std::vector<std::pair<size_t, size_t>> res;
  switch (st.behavior) {
    case Behavior::Removed:
      for (const Part& p : parts)
        if (!p.m) res.emplace_back(p.b, p.e);
      break;
    case Behavior::MergedWithPrevious: {
      bool prev_match = false;
      for (const Part& p : parts) {
        if (p.m && !prev_match && !res.empty()) res.back().second = p.e;
        else res.emplace_back(p.b, p.e);
        prev_match = p.m;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev_match = false;
      for (size_t i = parts.size(); i-- > 0;) {
        const Part& p = parts[i];
        if (p.m && !prev_match && !res.empty()) res.back().first = p.b;
        else res.emplace_back(p.b, p.e);
        prev_match = p.m;
      }
      std::reverse(res.begin(), res.end());
      break;
    }
    case Behavior::Contiguous: {
      bool prev_match = false;
      for (const Part& p : parts) {
        if (p.m == prev_match && !res.empty()) res.back().second = p.e;
        else res.emplace_back(p.b, p.e);
        prev_match = p.m;
      }
      break;
    }
    case Behavior::Isolated:
      break;
  }
  for (const auto& [b, e] : res)
    if (e > b) pre_tokenize(k + 1, piece.substr(b, e - b), out, run);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  const auto* p = reinterpret_cast<const uint8_t*>(word.data());
  if (word.size() == 1 && byte_id[p[0]] >= 0) {
    out.push_back(byte_id[p[0]]);
    return;
  }
  if (ignore_merges) {
    auto it = by_bytes.find(word);
    if (it != by_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWord) return bpe_merge(p, word.size(), out);
  const uint64_t h = XXH3_64bits(word.data(), word.size());
  Shard& sh = cache[h % kShards];
  {
    std::lock_guard<std::mutex> lk(sh.mu);
    auto it = sh.map.find(word);
    if (it != sh.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t before = out.size();
  bpe_merge(p, word.size(), out);
  std::vector<int32_t> ids(out.begin() + std::ptrdiff_t(before), out.end());
  std::lock_guard<std::mutex> lk(sh.mu);
  if (sh.map.size() >= kShardCap) sh.map.clear();
  sh.map.emplace(std::string(word), std::move(ids));
}

// Applies merges lowest rank first, leftmost first among equal ranks (what HF's heap does).
void Tokenizer::Impl::bpe_merge(const uint8_t* p, size_t n, std::vector<int32_t>& out) const {
  constexpr uint32_t kNone = ~uint32_t(0);
  auto initial = [&](auto&& emit) {
    bool last_unk = false;
    for (size_t i = 0; i < n; ++i) {
      int32_t id = byte_id[p[i]];
      if (id < 0) {
        if (!unk) continue;
        if (fuse_unk && last_unk) continue;
        id = *unk;
        last_unk = true;
      } else {
        last_unk = false;
      }
      emit(id);
    }
  };
  constexpr size_t kSmall = 64;
  if (n <= kSmall) {
    int32_t sym[kSmall];
    uint32_t rank[kSmall];
    int32_t nid[kSmall];
    size_t m = 0;
    initial([&](int32_t id) { sym[m++] = id; });
    auto look = [&](size_t i) {
      const PairMap::Slot* s = merges.find(sym[i], sym[i + 1]);
      rank[i] = s ? s->rank : kNone;
      nid[i] = s ? s->id : -1;
    };
    for (size_t i = 0; i + 1 < m; ++i) look(i);
    while (m > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < m; ++i)
        if (rank[i] < rank[best]) best = i;
      if (rank[best] == kNone) break;
      sym[best] = nid[best];
      for (size_t j = best + 1; j + 1 < m; ++j) {
        sym[j] = sym[j + 1];
        rank[j] = rank[j + 1];
        nid[j] = nid[j + 1];
      }
      --m;
      if (best > 0) look(best - 1);
      if (best + 1 < m) look(best);
      else rank[best] = kNone;
    }
    out.insert(out.end(), sym, sym + m);
    return;
  }
  // Long words: linked list + min-heap of candidate merges (rank, position).
  struct Sym {
    int32_t id, prev, next;
  };
  std::vector<Sym> sy;
  sy.reserve(n);
  initial([&](int32_t id) {
    int32_t i = int32_t(sy.size());
    sy.push_back({id, i - 1, i + 1});
  });
  if (sy.empty()) return;
  sy.back().next = -1;
  struct Cand {
    uint32_t rank;
    int32_t pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t pos) {
    int32_t nx = sy[size_t(pos)].next;
    if (nx < 0) return;
    if (const PairMap::Slot* s = merges.find(sy[size_t(pos)].id, sy[size_t(nx)].id)) heap.push({s->rank, pos, s->id});
  };
  for (int32_t i = 0; i + 1 < int32_t(sy.size()); ++i) push(i);
  std::vector<uint8_t> dead(sy.size(), 0);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Sym& a = sy[size_t(c.pos)];
    if (dead[size_t(c.pos)] || a.next < 0) continue;
    const PairMap::Slot* s = merges.find(a.id, sy[size_t(a.next)].id);
    if (!s || s->id != c.id) continue;  // stale: the pair changed since it was queued
    int32_t b = a.next;
    a.id = c.id;
    dead[size_t(b)] = 1;
    a.next = sy[size_t(b)].next;
    if (a.next >= 0) sy[size_t(a.next)].prev = c.pos;
    if (a.prev >= 0) push(a.prev);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sy[size_t(i)].next) out.push_back(sy[size_t(i)].id);
}

// ---------------------------------------------------------------------------------------------
// Public API.

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& origin) {
  json j;
  try {
    j = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    fail("tokenizer {}: invalid JSON: {}", origin, e.what());
  }
  auto impl = std::make_shared<Impl>();
  impl->origin = origin;
  try {
    impl->load(j);
  } catch (const json::exception& e) {  // a type mismatch the checks above did not anticipate
    fail("tokenizer {}: malformed field: {}", origin, e.what());
  }
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::string data;
  try {
    data = read_text_file(path);
  } catch (const Error& e) {
    fail("tokenizer {}: cannot read: {}", path, e.what());
  }
  return from_json(data, path);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, out, {.allow_special = allow_special, .plain = {}});
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special) const {
  impl_->encode(text, out, {.allow_special = allow_special, .plain = {}});
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, std::span<const ByteRange> plain) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, out, {.allow_special = true, .plain = plain});
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string raw;
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t id = ids[i];
    if (!contains(id)) impl_->bad_id(id, i);
    if (skip_special && impl_->special[size_t(id)]) continue;
    raw += impl_->bytes[size_t(id)];
  }
  if (utf8::valid(raw)) return raw;
  return utf8::lossy(raw);
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->by_text.find(token);
  if (it == impl_->by_text.end()) return std::nullopt;
  return it->second;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->text.size()); }
bool Tokenizer::contains(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->present.size() && impl_->present[size_t(id)];
}
std::string_view Tokenizer::token_text(int32_t id) const {
  if (!contains(id)) impl_->bad_id(id);
  return impl_->text[size_t(id)];
}
std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (!contains(id)) impl_->bad_id(id);
  return impl_->bytes[size_t(id)];
}
bool Tokenizer::is_special(int32_t id) const { return contains(id) && impl_->special[size_t(id)]; }
bool Tokenizer::is_added(int32_t id) const { return contains(id) && impl_->added[size_t(id)]; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
const std::string& Tokenizer::origin() const { return impl_->origin; }

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tok, bool skip_special)
    : tok_(tok), skip_special_(skip_special) {}

void IncrementalDecoder::push(int32_t id, std::string& out) {
  if (!tok_.contains(id)) tok_.impl_->bad_id(id);
  if (skip_special_ && tok_.impl_->special[size_t(id)]) return;
  pending_ += tok_.impl_->bytes[size_t(id)];
  size_t used = utf8::append_lossy(out, pending_, false);
  pending_.erase(0, used);
}

std::string IncrementalDecoder::push(int32_t id) {
  std::string out;
  push(id, out);
  return out;
}

std::string IncrementalDecoder::flush() {
  std::string out;
  utf8::append_lossy(out, pending_, true);
  pending_.clear();
  return out;
}

}  // namespace dsv4
