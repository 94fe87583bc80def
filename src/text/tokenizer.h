#pragma once
// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (the format DeepSeek ships).
//
// Supported (everything else is rejected at load time with an error naming the field):
//   model:          BPE (vocab + merges as "a b" strings or ["a","b"] pairs; ignore_merges;
//                   no dropout, no continuing_subword_prefix / end_of_word_suffix, no byte_fallback)
//   added_tokens:   special and non-special; lstrip / rstrip / single_word; split before the
//                   pre-tokenizer, leftmost-longest, non-normalized tokens first (as HF does)
//   normalizer:     null or an empty Sequence
//   pre_tokenizer:  Sequence of Split (Regex via PCRE2 UTF+UCP+JIT, or String; every behavior;
//                   invert) ending in ByteLevel (add_prefix_space, use_regex)
//   decoder:        ByteLevel (or null, treated the same)
//   post_processor: ignored; encode() never adds BOS/EOS (callers prepend bos_id() if wanted)
//
// encode() matches Hugging Face `tokenizers` ids exactly on the committed oracle corpus
// (tests/data/text/tokenizer_corpus). Instances are immutable after load and safe to use from
// several threads at once (the BPE word cache is internally locked). Copies share state.
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

// Bytes [begin, end) of a text.
struct ByteRange {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const ByteRange&) const = default;
};

class Tokenizer {
 public:
  // Loads a tokenizer.json; errors name the file and the field at fault.
  static Tokenizer load(const std::string& path);
  // Parses tokenizer.json text; `origin` names it in error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& origin = "<tokenizer.json>");

  // Text must be valid UTF-8 (an Error names the first bad byte offset). With allow_special
  // false, special added tokens are encoded as plain text (non-special added tokens still match),
  // like HF's encode_special_tokens=True.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out, bool allow_special = true) const;
  // Like encode(), except that no added token (special or not) is matched where it would overlap
  // one of `plain` (sorted, disjoint): the text there encodes as ordinary text, and everything
  // outside encodes exactly as encode() does. A chat prompt uses it to keep format tokens out of
  // client text.
  std::vector<int32_t> encode(std::string_view text, std::span<const ByteRange> plain) const;

  // Concatenates token bytes; ill-formed UTF-8 becomes U+FFFD (as HF does). Ids outside the
  // vocabulary raise an Error naming the id and its position.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  std::optional<int32_t> token_id(std::string_view token) const;  // token text as in the vocab
  int32_t vocab_size() const;                                     // 1 + the largest id
  bool contains(int32_t id) const;                                // a token with this id exists
  std::string_view token_text(int32_t id) const;  // vocab form (byte-level symbols); Error if unknown
  std::string_view token_bytes(int32_t id) const;  // the raw bytes the token decodes to
  bool is_special(int32_t id) const;
  bool is_added(int32_t id) const;
  std::optional<int32_t> bos_id() const;  // <｜begin▁of▁sentence｜> if present
  std::optional<int32_t> eos_id() const;  // <｜end▁of▁sentence｜> if present
  const std::string& origin() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
  friend class IncrementalDecoder;
};

// Streaming decode: push() returns only complete UTF-8; bytes of a character split across
// tokens are held back until it completes. Ill-formed bytes become U+FFFD as soon as they are
// known to be ill-formed. Concatenating every push() and a final flush() gives exactly
// Tokenizer::decode() of the same ids.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tok, bool skip_special = false);
  std::string push(int32_t id);
  void push(int32_t id, std::string& out);  // appends to out
  std::string flush();                      // emits held bytes (as U+FFFD) and resets
  size_t pending_bytes() const { return pending_.size(); }

 private:
  Tokenizer tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace dsv4
