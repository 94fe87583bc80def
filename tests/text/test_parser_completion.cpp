// Output parsing: the strict parser against the official
// parse_message_from_completion_text, and the streaming parser against the
// strict one for every split point of every completion.
#include <map>
#include <set>

#include "chat_test_util.h"
#include "text/chat_format.h"
#include "text/output_parser.h"
#include "util/utf8.h"
#include "util/error.h"

using namespace dsv4;
using namespace dsv4::testing_chat;

namespace {

struct PCase {
  std::string name, text;
  bool thinking = false;
  ojson vec;
};

// Where dsv4 deliberately differs from the official parser (output_parser.h): case -> the
// arguments of its tool call 0, which replace the official ones (those are not valid JSON).
const std::map<std::string, std::string> kDeviations = {
    {"tool_raw_not_json", R"({"x": "not json at all"})"},
};

std::vector<PCase> parse_cases() {
  std::map<std::string, ojson> texts;
  for (const auto& c : cases()["parse"]) texts[c["name"].get<std::string>()] = c;
  std::vector<PCase> out;
  for (const auto& v : vectors()["parse"]) {
    PCase p;
    p.name = v["name"];
    p.thinking = v["thinking"];
    p.text = v.contains("text") ? v["text"].get<std::string>() : texts.at(p.name)["text"].get<std::string>();
    p.vec = v;
    if (auto d = kDeviations.find(p.name); d != kDeviations.end()) {
      ojson& args = p.vec["result"]["tool_calls"][0]["arguments"];
      EXPECT_FALSE(nlohmann::json::accept(args.get<std::string>())) << p.name << ": no longer a deviation";
      args = d->second;
    }
    out.push_back(std::move(p));
  }
  return out;
}

ojson to_json(const ParsedMessage& m) {
  ojson calls = ojson::array();
  for (const auto& t : m.tool_calls) calls.push_back({{"name", t.name}, {"arguments", t.arguments_json}});
  return {{"reasoning_content", m.reasoning_content}, {"content", m.content}, {"tool_calls", calls}};
}

// Feeds `text` cut at `cuts` (sorted offsets); checks the delta invariants.
ParsedMessage stream(const std::string& text, bool thinking, const std::vector<size_t>& cuts, std::string* err,
                     bool check_utf8) {
  StreamParser p(thinking);
  ParsedMessage m;
  size_t prev = 0;
  auto take = [&](const std::vector<StreamDelta>& ds, bool final) {
    for (const auto& d : ds) {
      if (check_utf8 && !final && d.kind != StreamDelta::Kind::ToolCallStart) {
        EXPECT_TRUE(utf8::valid(d.text)) << "delta splits a UTF-8 character";
      }
      apply_delta(m, d);
    }
  };
  for (size_t c : cuts) {
    take(p.feed(std::string_view(text).substr(prev, c - prev)), false);
    prev = c;
  }
  take(p.feed(std::string_view(text).substr(prev)), false);
  take(p.finish(), true);
  if (err) *err = p.error();
  return m;
}

}  // namespace

TEST(ParserStrict, MatchesOfficialParser) {
  int ok = 0, errors = 0;
  for (const auto& p : parse_cases()) {
    if (p.vec.contains("error")) {
      EXPECT_THROW(parse_completion(p.text, p.thinking), Error) << p.name << ": official: " << p.vec["error"];
      ++errors;
      continue;
    }
    try {
      EXPECT_EQ(p.vec["result"], to_json(parse_completion(p.text, p.thinking))) << p.name;
    } catch (const std::exception& e) {
      ADD_FAILURE() << p.name << ": threw " << e.what();
    }
    ++ok;
  }
  EXPECT_GE(ok, 100);
  EXPECT_GE(errors, 20);
}

TEST(ParserStrict, ErrorMessagesNameTheFault) {
  for (const auto& p : parse_cases()) {
    if (!p.vec.contains("error")) continue;
    std::string official = p.vec["error"];
    try {
      parse_completion(p.text, p.thinking);
    } catch (const Error& e) {
      // "ValueError: <message>": same message text as the official parser.
      EXPECT_EQ(official.substr(official.find(": ") + 2), e.what()) << p.name;
    }
  }
}

// Every tool call the parsers produce has valid JSON arguments: a string="false" value that is
// not JSON becomes a JSON string; one that is JSON stays verbatim (whatever its nesting).
TEST(ParserStream, NonJsonValuesBecomeStrings) {
  const std::string deep = std::string(20000, '[') + std::string(20000, ']');
  const std::string text =
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"weather\">\n"
      "<｜DSML｜parameter name=\"days\" string=\"false\">abc</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"when\" string=\"false\">{\"from\": 1, \"to\": [2, 3]}</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"q\" string=\"false\">\"Paris\" and</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"deep\" string=\"false\">" + deep + "</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  const std::string want = R"({"days": "abc", "when": {"from": 1, "to": [2, 3]}, "q": "\"Paris\" and", "deep": )" + deep + "}";
  ParsedMessage strict = parse_completion(text, false);
  ASSERT_EQ(strict.tool_calls.size(), 1u);
  EXPECT_EQ(strict.tool_calls[0].arguments_json, want);
  for (size_t i = 0; i <= text.size(); i += (i < 400 ? 1 : 997)) {
    ParsedMessage m = stream(text, false, {i}, nullptr, true);
    ASSERT_EQ(m.tool_calls.size(), 1u) << "split at " << i;
    ASSERT_EQ(m.tool_calls[0].arguments_json, want) << "split at " << i;
  }
}

// A NUL byte ends nlohmann's input early: "1<NUL>x" must not pass as the JSON value 1 (found by
// fuzz_dsml_parser: the arguments were invalid JSON).
TEST(ParserStream, ValueWithNulIsAString) {
  const std::string value("1\0x", 3);
  const std::string text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                           "<｜DSML｜parameter name=\"n\" string=\"false\">" + value + "</｜DSML｜parameter>\n"
                           "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  const std::string want = R"({"n": "1\u0000x"})";
  ParsedMessage strict = parse_completion(text, false);
  ASSERT_EQ(strict.tool_calls.size(), 1u);
  EXPECT_EQ(strict.tool_calls[0].arguments_json, want);
  ParsedMessage streamed = parse_completion_lenient(text, false);
  ASSERT_EQ(streamed.tool_calls.size(), 1u);
  EXPECT_EQ(streamed.tool_calls[0].arguments_json, want);
}

// An empty string="false" value is the JSON string "" in both parsers (found by fuzz_dsml_parser:
// the streaming parser emitted nothing, leaving '{"x": }').
TEST(ParserStream, EmptyNonStringValueIsAnEmptyString) {
  const std::string text = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                           "<｜DSML｜parameter name=\"x\" string=\"false\"></｜DSML｜parameter>\n"
                           "<｜DSML｜parameter name=\"y\" string=\"false\">2</｜DSML｜parameter>\n"
                           "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  const std::string want = R"({"x": "", "y": 2})";
  ParsedMessage strict = parse_completion(text, false);
  ASSERT_EQ(strict.tool_calls.size(), 1u);
  EXPECT_EQ(strict.tool_calls[0].arguments_json, want);
  for (size_t i = 0; i <= text.size(); ++i) {
    ParsedMessage m = stream(text, false, {i}, nullptr, true);
    ASSERT_EQ(m.tool_calls.size(), 1u) << "split at " << i;
    EXPECT_EQ(m.tool_calls[0].arguments_json, want) << "split at " << i;
  }
}

// Tool names: DSML is a call only for an offered tool. Not offered: from the invoke on (from the
// block start when it is the first) the text is content; no tools at all: DSML is never parsed.
TEST(ParserStream, CallsOnlyToOfferedTools) {
  const std::string call_get = "<｜DSML｜invoke name=\"get\">\n<｜DSML｜parameter name=\"k\" string=\"true\">v</｜DSML｜parameter>\n</｜DSML｜invoke>\n";
  const std::string call_rm = "<｜DSML｜invoke name=\"rm\">\n<｜DSML｜parameter name=\"p\" string=\"true\">/</｜DSML｜parameter>\n</｜DSML｜invoke>\n";
  const std::string head = "\n\n<｜DSML｜tool_calls>\n";
  const std::string tail = "</｜DSML｜tool_calls>";
  const std::string eos(kEos);
  struct Case {
    std::string text;
    bool thinking;
    ToolNames tools;
    std::string content;
    std::vector<std::string> names;
  };
  const std::vector<Case> cases = {
      {"c" + head + call_get + tail + eos, false, ToolNames{{"get"}}, "c", {"get"}},
      {"c" + head + call_get + tail + eos, false, std::nullopt, "c", {"get"}},
      {"c" + head + call_get + tail + eos, false, ToolNames{{"other"}}, "c" + head + call_get + tail, {}},
      {"c" + head + call_get + tail + eos, false, ToolNames{std::set<std::string>{}}, "c" + head + call_get + tail, {}},
      {"r</think>c" + head + call_get + tail + eos, true, ToolNames{std::set<std::string>{}}, "c" + head + call_get + tail, {}},
      {"c" + head + call_get + call_rm + tail + eos, false, ToolNames{{"get"}}, "c" + call_rm + tail, {"get"}},
      {"c" + head + call_rm + call_get + tail + eos, false, ToolNames{{"get"}}, "c" + head + call_rm + call_get + tail, {}},
  };
  for (const auto& c : cases) {
    for (size_t i = 0; i <= c.text.size(); ++i) {
      StreamParser p(c.thinking, c.tools);
      ParsedMessage m;
      for (const auto& d : p.feed(std::string_view(c.text).substr(0, i))) apply_delta(m, d);
      for (const auto& d : p.feed(std::string_view(c.text).substr(i))) apply_delta(m, d);
      for (const auto& d : p.finish()) apply_delta(m, d);
      ASSERT_EQ(m.content, c.content) << c.text << " split at " << i;
      std::vector<std::string> names;
      for (const auto& t : m.tool_calls) names.push_back(t.name);
      ASSERT_EQ(names, c.names) << c.text << " split at " << i;
      EXPECT_TRUE(p.eos_seen());
    }
    EXPECT_EQ(parse_completion_lenient(c.text, c.thinking, nullptr, c.tools).content, c.content);
  }
}

TEST(ParserStream, EverySplitPointMatchesStrictParse) {
  size_t runs = 0;
  for (const auto& p : parse_cases()) {
    if (!p.vec.contains("result")) continue;
    const ojson want = p.vec["result"];
    for (size_t i = 0; i <= p.text.size(); ++i) {
      std::string err;
      ParsedMessage m = stream(p.text, p.thinking, {i}, &err, true);
      ASSERT_EQ(want, to_json(m)) << p.name << " split at " << i;
      EXPECT_EQ(err, "") << p.name;
      ++runs;
    }
    std::vector<size_t> bytes;
    for (size_t i = 1; i < p.text.size(); ++i) bytes.push_back(i);
    EXPECT_EQ(want, to_json(stream(p.text, p.thinking, bytes, nullptr, true))) << p.name << " byte by byte";
  }
  EXPECT_GT(runs, 10000u);
}

TEST(ParserStream, TwoSplitPointsOnShortCompletions) {
  for (const auto& p : parse_cases()) {
    if (!p.vec.contains("result") || p.text.size() > 260) continue;
    const ojson want = p.vec["result"];
    for (size_t i = 0; i <= p.text.size(); i += 1)
      for (size_t j = i; j <= p.text.size(); j += 3)
        ASSERT_EQ(want, to_json(stream(p.text, p.thinking, {i, j}, nullptr, true))) << p.name << " " << i << "," << j;
  }
}

// Malformed completions: never throws, and the result does not depend on how
// the text was split.
TEST(ParserStream, MalformedIsSplitInvariant) {
  std::vector<PCase> all = parse_cases();
  // Found by fuzz_stream_parser: a long value whose end tag lacks the '<'.
  const std::string head = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"";
  for (std::string tail : {"true\">a long value without the lt/｜DSML｜parameter>\n</｜DSML｜invoke>",
                           "false\">[1, 2, 3, 4, 5, 6]</｜DSML｜parameter>x\n", "true\">\xE4\xB8\xAD\xE6\x96\x87 tail <"}) {
    PCase p;
    p.name = "fuzz-found";
    p.text = head + tail;
    p.vec = {{"error", "malformed"}};
    all.push_back(p);
  }
  for (const auto& p : all) {
    if (!p.vec.contains("error")) continue;
    std::string err0;
    ojson whole = to_json(stream(p.text, p.thinking, {}, &err0, false));
    for (size_t i = 0; i <= p.text.size(); ++i) {
      std::string err;
      ASSERT_EQ(whole, to_json(stream(p.text, p.thinking, {i}, &err, false))) << p.name << " split at " << i;
    }
  }
}

TEST(ParserStream, NoMarkerTextInContent) {
  for (const auto& p : parse_cases()) {
    ParsedMessage m = stream(p.text, p.thinking, {}, nullptr, false);
    for (std::string_view mk : {std::string_view("｜DSML｜"), kEos, kThinkEnd}) {
      if (p.text.find(mk) == std::string::npos) continue;
      // Only texts that misuse markers inside content may keep them (e.g. a
      // second </think>); a well-formed one never does.
      if (p.vec.contains("result")) {
        EXPECT_EQ(m.content.find(mk), std::string::npos) << p.name;
        EXPECT_EQ(m.reasoning_content.find(mk), std::string::npos) << p.name;
      }
    }
  }
}

TEST(ParserStream, LenientBehaviour) {
  std::string err;
  // Thinking without </think>: all reasoning.
  ParsedMessage m = parse_completion_lenient("just thinking", true, &err);
  EXPECT_EQ(m.reasoning_content, "just thinking");
  EXPECT_EQ(m.content, "");
  // No EOS (server stripped it): fine, no error.
  m = parse_completion_lenient("hello", false, &err);
  EXPECT_EQ(m.content, "hello");
  EXPECT_EQ(err, "");
  // A trailing partial marker is content when the text ends.
  m = parse_completion_lenient("a\n\n<｜DS", false, &err);
  EXPECT_EQ(m.content, "a\n\n<｜DS");
  // Unterminated DSML: the started call is kept, the rest dropped, error set.
  m = parse_completion_lenient("x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
                               "string=\"true\">abc",
                               false, &err);
  EXPECT_EQ(m.content, "x");
  ASSERT_EQ(m.tool_calls.size(), 1u);
  EXPECT_EQ(m.tool_calls[0].name, "f");
  EXPECT_EQ(m.tool_calls[0].arguments_json, "{\"a\": \"abc");
  EXPECT_NE(err, "");
  // Garbage inside the block: abandoned, nothing leaks into content.
  m = parse_completion_lenient("x\n\n<｜DSML｜tool_calls>\nGARBAGE <｜DSML｜ more", false, &err);
  EXPECT_EQ(m.content, "x");
  EXPECT_TRUE(m.tool_calls.empty());
  EXPECT_NE(err, "");
  // Text after EOS is ignored.
  m = parse_completion_lenient("a<｜end▁of▁sentence｜>b", false, &err);
  EXPECT_EQ(m.content, "a");
}

TEST(ParserStream, DeltaShapes) {
  StreamParser p(true);
  std::vector<StreamDelta> all;
  std::string text =
      "r1</think>c1\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get\">\n<｜DSML｜parameter name=\"k\" "
      "string=\"true\">v\"</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  for (char ch : text)
    for (auto& d : p.feed(std::string(1, ch))) all.push_back(d);
  for (auto& d : p.finish()) all.push_back(d);
  EXPECT_TRUE(p.eos_seen());
  std::string reasoning, content, args;
  int starts = 0;
  for (const auto& d : all) {
    if (d.kind == StreamDelta::Kind::Reasoning) reasoning += d.text;
    if (d.kind == StreamDelta::Kind::Content) content += d.text;
    if (d.kind == StreamDelta::Kind::ToolCallStart) {
      ++starts;
      EXPECT_EQ(d.text, "get");
      EXPECT_EQ(d.index, 0);
      EXPECT_TRUE(args.empty()) << "name comes before arguments";
    }
    if (d.kind == StreamDelta::Kind::ToolCallArgs) {
      EXPECT_EQ(d.index, 0);
      args += d.text;
    }
  }
  EXPECT_EQ(reasoning, "r1");
  EXPECT_EQ(content, "c1");
  EXPECT_EQ(starts, 1);
  EXPECT_EQ(args, "{\"k\": \"v\\\"\"}");
}
