// Tokenizer unit tests: loading errors, pre-tokenizer behaviours, added tokens, streaming decode,
// the make-tiny tokenizer, and the tokenize / detokenize CLI.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <random>

#include <sys/wait.h>
#include <unistd.h>

#include "text/tiny_tokenizer.h"
#include "util/utf8.h"
#include "tokenizer_test_util.h"
#include "util/error.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A small byte-level tokenizer.json built in the test: all 256 byte symbols, optional merges,
// optional added tokens and a configurable pre-tokenizer.
std::string byte_symbol(int b) {
  bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
  int n = 0;
  for (int x = 0; x < b; ++x)
    if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae))) ++n;
  uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n);
  std::string s;
  if (cp < 0x80) s.push_back(char(cp));
  else {
    s.push_back(char(0xc0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3f)));
  }
  return s;
}

json mini_json(const std::vector<std::string>& merges, const json& pre, const json& added = json::array()) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = b;
  int id = 256;
  for (const auto& m : merges) {
    auto sp = m.find(' ');
    std::string t = m.substr(0, sp) + m.substr(sp + 1);
    if (!vocab.contains(t)) vocab[t] = id++;
  }
  json j;
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = pre;
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}};
  return j;
}

json byte_level_only() { return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}; }

json split_then_bytes(const std::string& regex, const std::string& behavior, bool invert = false) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", behavior}, {"invert", invert}},
            byte_level_only()}}};
}

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected dsv4::Error";
  return "";
}

TEST(TokenizerLoad, ErrorsNameFileAndField) {
  auto bad = [](const std::string& text) { return expect_error([&] { Tokenizer::from_json(text, "t.json"); }); };
  {
    std::string e = bad("{\"model\": ");
    EXPECT_NE(e.find("t.json"), std::string::npos) << e;
    EXPECT_NE(e.find("invalid JSON"), std::string::npos) << e;
  }
  {
    std::string e = bad("[]");
    EXPECT_NE(e.find("t.json"), std::string::npos) << e;
  }
  {
    std::string e = bad("{}");
    EXPECT_NE(e.find("model"), std::string::npos) << e;
    EXPECT_NE(e.find("missing"), std::string::npos) << e;
  }
  {
    json j = mini_json({}, {{"type", "Whitespace"}});
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("pre_tokenizer.type"), std::string::npos) << e;
    EXPECT_NE(e.find("Whitespace"), std::string::npos) << e;
  }
  {
    json j = mini_json({}, {{"type", "Sequence"}, {"pretokenizers", {byte_level_only(), {{"type", "Digits"}}}}});
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("pre_tokenizer.pretokenizers[1]"), std::string::npos) << e;
  }
  {
    json j = mini_json({"a b"}, byte_level_only());
    j["model"]["merges"].push_back("a zz");
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("model.merges[1]"), std::string::npos) << e;
    EXPECT_NE(e.find("'zz'"), std::string::npos) << e;
  }
  {
    json j = mini_json({}, byte_level_only());
    j["model"]["merges"] = {"a b"};  // 'ab' is not in the vocab
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("model.merges[0]"), std::string::npos) << e;
    EXPECT_NE(e.find("'ab'"), std::string::npos) << e;
  }
  {
    json j = mini_json({}, byte_level_only());
    j["model"]["merges"] = {"abc"};
    EXPECT_NE(bad(j.dump()).find("model.merges[0]"), std::string::npos);
    j["model"]["merges"] = {42};
    EXPECT_NE(bad(j.dump()).find("model.merges[0]"), std::string::npos);
  }
  {
    json j = mini_json({}, byte_level_only());
    j["model"]["vocab"]["x"] = "seven";
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("model.vocab[\"x\"]"), std::string::npos) << e;
    j["model"]["vocab"]["x"] = -1;
    EXPECT_NE(bad(j.dump()).find("model.vocab[\"x\"]"), std::string::npos);
    j["model"]["vocab"]["x"] = 1 << 22;  // absurd ids are refused, not allocated
    EXPECT_NE(bad(j.dump()).find("out of range"), std::string::npos);
    j["model"]["vocab"]["x"] = 5;  // id 5 already belongs to a byte symbol
    EXPECT_NE(bad(j.dump()).find("used by both"), std::string::npos);
  }
  {
    json j = mini_json({}, byte_level_only());
    j["model"]["type"] = "WordPiece";
    EXPECT_NE(bad(j.dump()).find("model.type"), std::string::npos);
  }
  {
    json j = mini_json({}, split_then_bytes("(unclosed", "Isolated"));
    std::string e = bad(j.dump());
    EXPECT_NE(e.find("pre_tokenizer.pretokenizers[0].pattern"), std::string::npos) << e;
  }
  {
    json j = mini_json({}, split_then_bytes("a", "Sideways"));
    EXPECT_NE(bad(j.dump()).find("behavior"), std::string::npos);
  }
  {
    json j = mini_json({}, {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Isolated"}});
    EXPECT_NE(bad(j.dump()).find("ByteLevel"), std::string::npos);
  }
  {
    json j = mini_json({}, byte_level_only(), json::array({{{"id", 300}, {"special", true}}}));
    EXPECT_NE(bad(j.dump()).find("added_tokens[0].content"), std::string::npos);
  }
  {
    json j = mini_json({}, byte_level_only());
    j["normalizer"] = {{"type", "NFC"}};
    EXPECT_NE(bad(j.dump()).find("normalizer"), std::string::npos);
  }
  {
    std::string e = expect_error([] { Tokenizer::load("/nonexistent/tokenizer.json"); });
    EXPECT_NE(e.find("/nonexistent/tokenizer.json"), std::string::npos) << e;
  }
}

TEST(TokenizerDecode, OutOfRangeIdsAreErrors) {
  Tokenizer tok = Tokenizer::from_json(mini_json({}, byte_level_only()).dump());
  EXPECT_EQ(tok.vocab_size(), 256);
  std::vector<int32_t> ids = {72, 105, 256};
  std::string e = expect_error([&] { tok.decode(ids); });
  EXPECT_NE(e.find("256"), std::string::npos) << e;
  EXPECT_NE(e.find("position 2"), std::string::npos) << e;
  ids = {-1};
  EXPECT_NE(expect_error([&] { tok.decode(ids); }).find("-1"), std::string::npos);
  IncrementalDecoder dec(tok);
  EXPECT_NE(expect_error([&] { dec.push(1000); }).find("1000"), std::string::npos);
  EXPECT_NE(expect_error([&] { (void)tok.token_text(999); }).find("999"), std::string::npos);
}

TEST(TokenizerEncode, RejectsInvalidUtf8) {
  Tokenizer tok = Tokenizer::from_json(mini_json({}, byte_level_only()).dump());
  std::string e = expect_error([&] { tok.encode("ok\xff"); });
  EXPECT_NE(e.find("UTF-8"), std::string::npos) << e;
  EXPECT_NE(e.find("offset 2"), std::string::npos) << e;
}

TEST(TokenizerEncode, MergesLowestRankFirstLeftmostOnTies) {
  // "a a" before "b c": in "abc" the pair (a,b) wins over (b,c) only by rank.
  Tokenizer t1 = Tokenizer::from_json(mini_json({"a b", "b c"}, byte_level_only()).dump());
  Tokenizer t2 = Tokenizer::from_json(mini_json({"b c", "a b"}, byte_level_only()).dump());
  auto ab = t1.token_id("ab"), bc = t2.token_id("bc");
  ASSERT_TRUE(ab && bc);
  EXPECT_EQ(t1.encode("abc"), (std::vector<int32_t>{*ab, 'c'}));
  EXPECT_EQ(t2.encode("abc"), (std::vector<int32_t>{'a', *bc}));
  // Equal pairs: leftmost first ("aaa" -> "aa" "a").
  Tokenizer t3 = Tokenizer::from_json(mini_json({"a a"}, byte_level_only()).dump());
  auto aa = t3.token_id("aa");
  EXPECT_EQ(t3.encode("aaa"), (std::vector<int32_t>{*aa, 'a'}));
  EXPECT_EQ(t3.encode("aaaa"), (std::vector<int32_t>{*aa, *aa}));
  // Long words take the heap path; results must agree with short words.
  std::string longw(1001, 'a');
  std::vector<int32_t> want(500, *aa);
  want.push_back('a');
  EXPECT_EQ(t3.encode(longw), want);
}

TEST(TokenizerEncode, HeapAndScanPathsAgree) {
  // A richer merge table; words just below and above the 64-byte switch must match the same
  // words split into repeated units (where BPE result is periodic).
  Tokenizer tok = Tokenizer::from_json(
      mini_json({"a b", "c d", "ab cd", "e f", "abcd ef", "b c", "d e"}, byte_level_only()).dump());
  auto unit = tok.encode("abcdef");
  ASSERT_EQ(unit.size(), 1u);
  for (int reps : {1, 5, 10, 11, 12, 20, 300}) {
    std::string w;
    for (int r = 0; r < reps; ++r) w += "abcdef";
    EXPECT_EQ(tok.encode(w), std::vector<int32_t>(size_t(reps), unit[0])) << reps;
  }
  // Random words over a small alphabet: encoding the word twice (cache cold / warm) agrees, and
  // decoding restores the bytes.
  std::mt19937 rng(5);
  for (int i = 0; i < 300; ++i) {
    std::string w;
    size_t n = 1 + rng() % 200;
    for (size_t k = 0; k < n; ++k) w.push_back("abcdef"[rng() % 6]);
    auto a = tok.encode(w), b = tok.encode(w);
    EXPECT_EQ(a, b);
    EXPECT_EQ(tok.decode(a), w);
  }
}

// Split behaviours, observed through merges: a merge table that joins "a-" / "-b" etc. shows
// which characters ended up in one piece (BPE never merges across pieces).
TEST(TokenizerPreTokenizer, SplitBehaviours) {
  std::vector<std::string> merges = {"a -", "- b", "b -", "- c", "a b", "b c", "a- b", "a -b", "- -"};
  auto enc = [&](const std::string& behavior, bool invert, const std::string& text) {
    Tokenizer tok = Tokenizer::from_json(mini_json(merges, split_then_bytes("-", behavior, invert)).dump());
    std::vector<std::string> out;
    for (int32_t id : tok.encode(text)) out.emplace_back(tok.token_bytes(id));
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(enc("Isolated", false, "a-b-c"), (V{"a", "-", "b", "-", "c"}));
  EXPECT_EQ(enc("Removed", false, "a-b-c"), (V{"a", "b", "c"}));
  EXPECT_EQ(enc("MergedWithPrevious", false, "a-b-c"), (V{"a-", "b-", "c"}));
  EXPECT_EQ(enc("MergedWithNext", false, "a-b-c"), (V{"a", "-b", "-c"}));
  EXPECT_EQ(enc("Contiguous", false, "a--b"), (V{"a", "--", "b"}));  // "--" is one piece
  EXPECT_EQ(enc("Isolated", false, "a--b"), (V{"a", "-", "-", "b"}));
  EXPECT_EQ(enc("Removed", true, "a-b-c"), (V{"-", "-"}));             // invert: keep the delimiters
}

TEST(TokenizerPreTokenizer, ByteLevelPrefixSpaceAndRegex) {
  json pre = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  Tokenizer tok = Tokenizer::from_json(mini_json({}, pre).dump());
  // Prefix space added, then GPT-2 split; with no merges ids are the bytes.
  std::string back = tok.decode(tok.encode("hi there"));
  EXPECT_EQ(back, " hi there");
}

TEST(TokenizerAddedTokens, LeftmostLongestAndAllowSpecial) {
  json added = json::array({
      {{"id", 300}, {"content", "<x>"}, {"special", true}},
      {{"id", 301}, {"content", "<x>y"}, {"special", true}},
      {{"id", 302}, {"content", "zz"}, {"special", false}, {"normalized", true}},
  });
  Tokenizer tok = Tokenizer::from_json(mini_json({}, byte_level_only(), added).dump());
  EXPECT_EQ(tok.encode("a<x>yb"), (std::vector<int32_t>{'a', 301, 'b'}));
  EXPECT_EQ(tok.encode("a<x>b"), (std::vector<int32_t>{'a', 300, 'b'}));
  EXPECT_EQ(tok.encode("<x>zz", false), (std::vector<int32_t>{'<', 'x', '>', 302}));
  EXPECT_TRUE(tok.is_special(300));
  EXPECT_FALSE(tok.is_special(302));
  EXPECT_TRUE(tok.is_added(302));
  EXPECT_FALSE(tok.is_added('a'));
  EXPECT_EQ(tok.token_id("<x>y"), 301);
  EXPECT_FALSE(tok.token_id("nope").has_value());
  std::vector<int32_t> ids = {'a', 300, 302};
  EXPECT_EQ(tok.decode(ids), "a<x>zz");
  EXPECT_EQ(tok.decode(ids, true), "azz");
}

TEST(TokenizerAddedTokens, LstripRstrip) {
  json added = json::array({{{"id", 300}, {"content", "<m>"}, {"special", true}, {"lstrip", true}, {"rstrip", true}}});
  Tokenizer tok = Tokenizer::from_json(mini_json({}, byte_level_only(), added).dump());
  EXPECT_EQ(tok.encode("a  <m>  b"), (std::vector<int32_t>{'a', 300, 'b'}));
}

TEST(Utf8, LossyMatchesMaximalSubpartRule) {
  const std::string R = "\xef\xbf\xbd";
  EXPECT_EQ(utf8::lossy("abc"), "abc");
  EXPECT_EQ(utf8::lossy("\xe2\x82\xac"), "\xe2\x82\xac");
  EXPECT_EQ(utf8::lossy("\xe2\x82"), R);              // truncated at the end: one U+FFFD
  EXPECT_EQ(utf8::lossy("\xe2\x82" "A"), R + "A");    // truncated before ASCII
  EXPECT_EQ(utf8::lossy("\xf0\x80\x80"), R + R + R);  // F0 80 is never valid: three subparts
  EXPECT_EQ(utf8::lossy("\xed\xa0\x80"), R + R + R);  // surrogate
  EXPECT_EQ(utf8::lossy("\xc0\xaf"), R + R);          // overlong
  EXPECT_EQ(utf8::lossy("\xf4\x90\x80\x80"), R + R + R + R);  // above U+10FFFF
  EXPECT_EQ(utf8::lossy("\xff"), R);
  std::string out;
  EXPECT_EQ(utf8::append_lossy(out, "x\xe4\xb8", false), 1u);  // hold the incomplete tail
  EXPECT_EQ(out, "x");
  EXPECT_EQ(utf8::first_invalid("ab\xe4\xb8"), 2u);
  EXPECT_TRUE(utf8::valid("\xf0\x9f\x98\x80"));
}

TEST(TokenizerDecode, IncrementalHoldsSplitCharacters) {
  Tokenizer tok = Tokenizer::from_json(mini_json({}, byte_level_only()).dump());
  IncrementalDecoder dec(tok);
  // U+1F600 as four single-byte tokens, then 'a'.
  EXPECT_EQ(dec.push(0xf0), "");
  EXPECT_EQ(dec.push(0x9f), "");
  EXPECT_EQ(dec.push(0x98), "");
  EXPECT_EQ(dec.pending_bytes(), 3u);
  EXPECT_EQ(dec.push(0x80), "\xf0\x9f\x98\x80");
  EXPECT_EQ(dec.push('a'), "a");
  // An ill-formed sequence is replaced as soon as it is known to be ill-formed.
  EXPECT_EQ(dec.push(0xe4), "");
  EXPECT_EQ(dec.push('b'), "\xef\xbf\xbd" "b");
  EXPECT_EQ(dec.push(0xe4), "");
  EXPECT_EQ(dec.flush(), "\xef\xbf\xbd");
  EXPECT_EQ(dec.pending_bytes(), 0u);
  // Random byte tokens: streamed output equals one-shot decode and is always valid UTF-8.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> ids;
    for (int k = 0; k < 30; ++k) ids.push_back(int32_t(rng() % 256));
    IncrementalDecoder d(tok);
    std::string s;
    for (int32_t id : ids) {
      std::string p = d.push(id);
      ASSERT_TRUE(utf8::valid(p));
      s += p;
    }
    s += d.flush();
    EXPECT_EQ(s, tok.decode(ids));
  }
}

// ---------------------------------------------------------------------------------------------
// make-tiny's tokenizer.json: same pre-tokenizer structure as DeepSeek's, loads and round-trips.

TEST(TinyTokenizer, SameStructureAsDeepSeek) {
  json tiny = json::parse(tiny_tokenizer_json(1024, 0, 1));
  EXPECT_EQ(tiny["pre_tokenizer"]["type"], "Sequence");
  ASSERT_EQ(tiny["pre_tokenizer"]["pretokenizers"].size(), 4u);
  const Tokenizer* real = test::deepseek_tokenizer();
  ASSERT_NE(real, nullptr) << "missing " << test::deepseek_tokenizer_path() << ": run scripts/fetch-test-data.sh";
  json ds = test::load_json(test::deepseek_tokenizer_path());
  EXPECT_EQ(tiny["pre_tokenizer"], ds["pre_tokenizer"]);
  EXPECT_EQ(tiny["normalizer"], ds["normalizer"]);
  EXPECT_EQ(tiny["decoder"], ds["decoder"]);
}

TEST(TinyTokenizer, MakeTinyOutputLoadsAndRoundTrips) {
  fs::path dir = fs::temp_directory_path() / fmt::format("dsv4_tiny_tok_{}", ::getpid());
  fs::remove_all(dir);
  std::string cmd = fmt::format("\"{}\" make-tiny --out \"{}\" >/dev/null 2>&1", DSV4_BINARY, dir.string());
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  Tokenizer tok = Tokenizer::load((dir / "tokenizer.json").string());
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_TRUE(tok.is_special(0));
  for (const std::string text :
       {"Hello, world! The quick brown fox.", "中文 and 日本語 123456789 ok", "line1\r\nline2\n\n\tend  ",
        "<｜User｜>hi<｜Assistant｜><think>x</think>", "emoji 👩‍💻 🇯🇵 e\u0301", ""}) {
    auto ids = tok.encode(text);
    EXPECT_EQ(tok.decode(ids), text);
    for (int32_t id : ids) EXPECT_LT(id, tok.vocab_size());
  }
  auto ids = tok.encode("<｜User｜>the");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], *tok.token_id("<｜User｜>"));
  EXPECT_LT(ids.size(), 4u) << "merges should join 'the'";
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------------------
// CLI.

struct CliRun {
  int rc;
  std::string out;
};
CliRun run_cli(const std::string& args) {
  std::string cmd = fmt::format("\"{}\" {} 2>&1", DSV4_BINARY, args);
  FILE* p = ::popen(cmd.c_str(), "r");
  CliRun r{-1, ""};
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = ::pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

TEST(TokenizerCli, TokenizeAndDetokenize) {
  fs::path dir = fs::temp_directory_path() / fmt::format("dsv4_tok_cli_{}", ::getpid());
  fs::create_directories(dir);
  std::string tj = (dir / "tokenizer.json").string();
  std::string tiny = tiny_tokenizer_json(1024, 0, 1);
  write_binary_file(tj, tiny.data(), tiny.size());
  Tokenizer tok = Tokenizer::load(tj);

  std::string text = "a\r\nb  <｜User｜>the\n";
  std::string tf = (dir / "in.txt").string();
  write_binary_file(tf, text.data(), text.size());
  auto want = tok.encode(text);
  std::string want_json = "[";
  for (size_t i = 0; i < want.size(); ++i) want_json += (i ? "," : "") + std::to_string(want[i]);
  want_json += "]\n";

  CliRun r = run_cli(fmt::format("tokenize --tokenizer '{}' --file '{}'", tj, tf));
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out, want_json);
  r = run_cli(fmt::format("tokenize --tokenizer '{}' --file '{}' --bos", tj, tf));
  EXPECT_EQ(r.out, "[0," + want_json.substr(1));
  r = run_cli(fmt::format("tokenize --tokenizer '{}' --text 'the cat'", tj));
  EXPECT_EQ(r.rc, 0);
  auto tc = tok.encode("the cat");
  EXPECT_EQ(r.out, json(tc).dump() + "\n");

  std::string ids_arg;
  for (size_t i = 0; i < want.size(); ++i) ids_arg += (i ? "," : "") + std::to_string(want[i]);
  r = run_cli(fmt::format("detokenize --tokenizer '{}' --ids {}", tj, ids_arg));
  EXPECT_EQ(r.rc, 0);
  EXPECT_EQ(r.out, text);  // bytes exactly, \r\n kept, no newline added
  std::string idf = (dir / "ids.json").string();
  write_binary_file(idf, want_json.data(), want_json.size());
  r = run_cli(fmt::format("detokenize --tokenizer '{}' --file '{}' --skip-special", tj, idf));
  EXPECT_EQ(r.out, "a\r\nb  the\n");

  // Errors: clear message, exit status 1, no crash.
  r = run_cli(fmt::format("detokenize --tokenizer '{}' --ids 1,5000", tj));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("token id 5000"), std::string::npos) << r.out;
  r = run_cli(fmt::format("detokenize --tokenizer '{}' --ids 1,x", tj));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("--ids"), std::string::npos) << r.out;
  std::string bad = (dir / "bad.json").string();
  write_binary_file(bad, "{\"model\":", 9);
  r = run_cli(fmt::format("tokenize --tokenizer '{}' --text hi", bad));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("bad.json"), std::string::npos) << r.out;
  r = run_cli(fmt::format("tokenize --tokenizer '{}'", tj));
  EXPECT_NE(r.rc, 0);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace dsv4
