// Chat format: byte-exact prompts against the official encoder's output for
// every conversation of tests/data/text/chat_cases.json.
#include <cstdio>
#include <map>

#include "chat_test_util.h"
#include "text/chat_format.h"
#include "util/error.h"

using namespace dsv4;
using namespace dsv4::testing_chat;

namespace {

ChatOptions options_of(const ojson& c) {
  ChatOptions o = chat_options_from_mode(c.value("thinking", "chat"));
  if (c.contains("effort") && !c["effort"].is_null()) o.reasoning_effort = c["effort"].get<std::string>();
  o.legacy_effort = c.value("legacy_effort", false);
  o.drop_thinking = c.value("drop_thinking", true);
  o.add_bos = c.value("add_bos", true);
  return o;
}

std::map<std::string, ojson> vectors_by_name(const char* section) {
  std::map<std::string, ojson> m;
  for (const auto& v : vectors()[section]) m[v["name"].get<std::string>()] = v;
  return m;
}

}  // namespace

TEST(ChatFormat, VectorsCoverEveryCase) {
  auto vec = vectors_by_name("render");
  ASSERT_GE(cases()["render"].size(), 90u);
  for (const auto& c : cases()["render"]) {
    std::string name = c["name"];
    ASSERT_TRUE(vec.count(name)) << "no oracle output for case " << name << ": regenerate chat_vectors.json";
    EXPECT_FALSE(vec[name].value("unexpected", false)) << name;
  }
}

TEST(ChatFormat, MatchesOfficialEncoder) {
  auto vec = vectors_by_name("render");
  int checked = 0, errors = 0;
  for (const auto& c : cases()["render"]) {
    std::string name = c["name"];
    const ojson& v = vec.at(name);
    ojson tools = c.contains("tools") ? c["tools"] : ojson(nullptr);
    ojson rf = c.contains("response_format") ? c["response_format"] : ojson(nullptr);
    if (v.contains("error")) {
      EXPECT_THROW(render_chat(c["messages"], tools, options_of(c), rf), Error)
          << name << ": the official encoder fails with " << v["error"];
      ++errors;
      continue;
    }
    std::string want = v["prompt"];
    std::string got;
    try {
      got = render_chat(c["messages"], tools, options_of(c), rf);
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": threw " << e.what();
      continue;
    }
    EXPECT_EQ(want, got) << name << ": " << first_diff(want, got);
    ++checked;
  }
  EXPECT_GE(checked, 80);
  EXPECT_GE(errors, 10);
}

// Same conversations through `dsv4 chat-template` (exact stdout bytes).
TEST(ChatFormat, CliMatchesOfficialEncoder) {
  auto vec = vectors_by_name("render");
  std::string dir = ::testing::TempDir();
  int n = 0;
  for (const auto& c : cases()["render"]) {
    std::string name = c["name"];
    const ojson& v = vec.at(name);
    ojson doc = {{"messages", c["messages"]}};
    if (c.contains("tools")) doc["tools"] = c["tools"];
    if (c.contains("response_format")) doc["response_format"] = c["response_format"];
    std::string in = dir + "/chat_cli_" + name + ".json";
    {
      std::ofstream f(in, std::ios::binary);
      f << doc.dump();
    }
    std::string cmd = std::string(DSV4_BINARY) + " chat-template --messages '" + in + "' --thinking " +
                      c.value("thinking", "chat");
    if (c.contains("effort") && !c["effort"].is_null()) cmd += " --effort " + c["effort"].get<std::string>();
    if (c.value("legacy_effort", false)) cmd += " --legacy-effort";
    if (!c.value("drop_thinking", true)) cmd += " --keep-reasoning";
    if (!c.value("add_bos", true)) cmd += " --no-bos";
    if (c["name"] == "effort_invalid") continue;  // rejected by the option parser itself
    cmd += " 2>/dev/null";
    FILE* p = popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, k);
    int rc = pclose(p);
    if (v.contains("error")) {
      EXPECT_NE(rc, 0) << name;
    } else {
      EXPECT_EQ(rc, 0) << name;
      EXPECT_EQ(v["prompt"].get<std::string>(), out) << name << ": " << first_diff(v["prompt"], out);
    }
    ++n;
  }
  EXPECT_GE(n, 90);
}

// Request-level tools join the leading system/developer message ("{content}\n\n## Tools ..."),
// exactly as if that message carried them (a path the vectors check against the encoder), and
// replace tools it carries itself.
TEST(ChatFormat, RequestToolsJoinTheLeadingMessage) {
  const ojson tools = ojson::parse(R"([{"type":"function","function":{"name":"lookup","parameters":{"type":"object"}}}])");
  const ojson other = ojson::parse(R"([{"type":"function","function":{"name":"other_tool"}}])");
  const ojson rf = ojson::parse(R"({"type":"json_object"})");
  for (const char* role : {"system", "developer"}) {
    for (const char* mode : {"chat", "thinking"}) {
      ChatOptions o = chat_options_from_mode(mode);
      ojson plain = ojson::array({{{"role", role}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "hi"}}});
      ojson carried = plain;
      carried[0]["tools"] = tools;
      carried[0]["response_format"] = rf;
      std::string got = render_chat(plain, tools, o, rf);
      EXPECT_EQ(got, render_chat(carried, nullptr, o)) << role << " " << mode;
      EXPECT_NE(got.find("Be brief.\n\n## Tools"), std::string::npos) << got;
      carried[0]["tools"] = other;
      got = render_chat(carried, tools, o);
      EXPECT_EQ(got.find("other_tool"), std::string::npos) << role;
      EXPECT_EQ(got.find("## Tools"), got.rfind("## Tools")) << "tools rendered twice";
    }
  }
  // No leading system/developer message: a system message is inserted first.
  ojson user_first = ojson::array({{{"role", "user"}, {"content", "hi"}}});
  ojson with_sys = ojson::array({{{"role", "system"}, {"tools", tools}}, {{"role", "user"}, {"content", "hi"}}});
  EXPECT_EQ(render_chat(user_first, tools, ChatOptions{}), render_chat(with_sys, nullptr, ChatOptions{}));
}

TEST(ChatFormat, ThinkingModeNames) {
  EXPECT_EQ(chat_options_from_mode("chat").thinking, ThinkingMode::Chat);
  EXPECT_EQ(chat_options_from_mode("thinking").thinking, ThinkingMode::Thinking);
  ChatOptions m = chat_options_from_mode("max");
  EXPECT_EQ(m.thinking, ThinkingMode::Thinking);
  EXPECT_EQ(m.reasoning_effort, "max");
  EXPECT_THROW(chat_options_from_mode("fast"), Error);
}

TEST(ChatFormat, BadInputIsAnErrorNotACrash) {
  ChatOptions o;
  EXPECT_THROW(render_chat(ojson::parse(R"({"role":"user"})"), nullptr, o), Error);
  EXPECT_THROW(render_chat(ojson::parse(R"([1, 2])"), nullptr, o), Error);
  EXPECT_THROW(render_chat(ojson::parse(R"([{"role":"user","content":5}])"), nullptr, o), Error);
  EXPECT_THROW(render_chat(ojson::parse(R"([{"role":"user","content":"x"}])"), ojson::parse(R"("tools")"), o), Error);
  EXPECT_THROW(render_chat(ojson::parse(R"([{"role":"assistant","tool_calls":[{"function":{"name":3,"arguments":"{}"}}]}])"),
                           nullptr, o),
               Error);
  EXPECT_THROW(render_chat(ojson::parse(R"([{"role":"assistant","reasoning":7,"content":"x"}])"), nullptr,
                           chat_options_from_mode("thinking")),
               Error);
  // Documented leniency: the Python encoder crashes on a null user content.
  EXPECT_EQ(render_chat(ojson::parse(R"([{"role":"user","content":null}])"), nullptr, o),
            "<｜begin▁of▁sentence｜><｜User｜><｜Assistant｜></think>");
}

TEST(ChatFormat, PythonJsonDumps) {
  EXPECT_EQ(py_json_dumps(ojson::parse(R"({"b": [1, 2.0, 1e-5, 1e16, 123456789012345678, -0.0, 0.1], "a": null})")),
            R"({"b": [1, 2.0, 1e-05, 1e+16, 123456789012345678, -0.0, 0.1], "a": null})");
  EXPECT_EQ(py_json_dumps(ojson("q\"\\\n\x01\x7f é")), "\"q\\\"\\\\\\n\\u0001\x7f é\"");
  EXPECT_EQ(py_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(py_float_repr(0.0001), "0.0001");
  EXPECT_EQ(py_float_repr(1.5e300), "1.5e+300");
  EXPECT_EQ(py_float_repr(5e-324), "5e-324");
}
