// OpenAI request JSON -> ParsedRequest: accepted shapes, defaults, and every rejection's status
// and parameter.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "server/api.h"

using namespace dsv4;
using namespace dsv4::server;

namespace {

ParsedRequest chat(const std::string& body) { return parse_chat_request(body); }

// Expects an ApiError with the given status and param.
void expect_error(Endpoint ep, const std::string& body, int status, const std::string& param,
                  const std::string& needle = "") {
  try {
    parse_request(ep, body);
    FAIL() << "accepted: " << body;
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status, status) << body;
    EXPECT_EQ(e.param, param) << body << " -> " << e.what();
    if (!needle.empty()) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

const char* kMsgs = R"("messages":[{"role":"user","content":"hi"}])";

}  // namespace

TEST(RequestParser, MinimalChatDefaults) {
  auto r = chat(std::string("{") + kMsgs + "}");
  EXPECT_EQ(r.endpoint, Endpoint::Chat);
  EXPECT_EQ(r.messages.size(), 1u);
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.max_tokens_set);
  EXPECT_EQ(r.sampling.n, 1);
  EXPECT_EQ(r.sampling.logprobs, -1);
  EXPECT_EQ(r.chat.thinking, ThinkingMode::Chat);
  EXPECT_TRUE(r.tools.is_null());
  EXPECT_EQ(r.tool_choice, ToolChoice::Auto);
}

TEST(RequestParser, SamplingFields) {
  auto r = chat(std::string("{") + kMsgs +
                R"(,"temperature":0.5,"top_p":0.9,"top_k":40,"min_p":0.05,"presence_penalty":0.5,
                   "frequency_penalty":-0.5,"repetition_penalty":1.1,"seed":42,"max_tokens":7,"stop":["a","b"],
                   "n":3,"logprobs":true,"top_logprobs":4,"user":"u1","stream":true,
                   "stream_options":{"include_usage":true},"ignore_eos":true,"stop_token_ids":[5]})");
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(r.sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(r.sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.frequency_penalty, -0.5f);
  EXPECT_FLOAT_EQ(r.sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(*r.sampling.seed, 42u);
  EXPECT_EQ(r.sampling.max_tokens, 7);
  EXPECT_TRUE(r.max_tokens_set);
  EXPECT_EQ(r.sampling.stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(r.sampling.n, 3);
  EXPECT_EQ(r.sampling.logprobs, 4);
  EXPECT_EQ(r.user, "u1");
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_TRUE(r.sampling.ignore_eos);
  EXPECT_EQ(r.sampling.stop_token_ids, (std::vector<int32_t>{5}));
}

TEST(RequestParser, MaxCompletionTokensWins) {
  auto r = chat(std::string("{") + kMsgs + R"(,"max_tokens":10,"max_completion_tokens":20})");
  EXPECT_EQ(r.sampling.max_tokens, 20);
  r = chat(std::string("{") + kMsgs + R"(,"stop":"x"})");
  EXPECT_EQ(r.sampling.stop, std::vector<std::string>{"x"});
}

TEST(RequestParser, ThinkingShapes) {
  auto on = [](const std::string& extra) {
    return chat(std::string("{") + kMsgs + "," + extra + "}").chat.thinking == ThinkingMode::Thinking;
  };
  EXPECT_TRUE(on(R"("chat_template_kwargs":{"thinking":true})"));
  EXPECT_TRUE(on(R"("chat_template_kwargs":{"enable_thinking":true})"));
  EXPECT_TRUE(on(R"("thinking":{"type":"enabled"})"));
  EXPECT_TRUE(on(R"("reasoning_effort":"high")"));
  EXPECT_FALSE(on(R"("thinking":{"type":"disabled"})"));
  EXPECT_FALSE(on(R"("chat_template_kwargs":{"thinking":false})"));
  // An explicit "off" wins over reasoning_effort.
  EXPECT_FALSE(on(R"("thinking":{"type":"disabled"},"reasoning_effort":"max")"));
  auto r = chat(std::string("{") + kMsgs + R"(,"reasoning_effort":"max"})");
  EXPECT_EQ(r.chat.reasoning_effort, "max");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"thinking":{"type":"maybe"}})", 400, "thinking.type");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"chat_template_kwargs":{"thinking":"yes"}})", 400,
               "chat_template_kwargs.thinking");
}

// vLLM's DeepSeek-V4 mapping: "none" is chat mode; minimal/low/medium -> low, high/xhigh -> high,
// max -> max; anything else is refused with the accepted values listed.
TEST(RequestParser, ReasoningEffortValues) {
  auto req = [](const std::string& extra) { return chat(std::string("{") + kMsgs + "," + extra + "}"); };
  for (const char* key : {"reasoning_effort", "chat_template_kwargs"}) {
    auto effort = [&](const std::string& v) {
      return std::string(key) == "reasoning_effort" ? R"("reasoning_effort":")" + v + "\""
                                                    : R"("chat_template_kwargs":{"thinking":true,"reasoning_effort":")" + v + "\"}";
    };
    auto none = req(effort("none"));
    EXPECT_EQ(none.chat.thinking, ThinkingMode::Chat) << key;
    EXPECT_EQ(none.chat.reasoning_effort, "") << key;
    for (const char* v : {"minimal", "low", "medium"}) {
      EXPECT_EQ(req(effort(v)).chat.reasoning_effort, "low") << key << " " << v;
      EXPECT_EQ(req(effort(v)).chat.thinking, ThinkingMode::Thinking) << key << " " << v;
    }
    for (const char* v : {"high", "xhigh"}) EXPECT_EQ(req(effort(v)).chat.reasoning_effort, "high") << key << " " << v;
    EXPECT_EQ(req(effort("max")).chat.reasoning_effort, "max") << key;
  }
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"reasoning_effort":"ultra"})", 400, "reasoning_effort",
               "none, minimal, low, medium, high, xhigh, max");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"chat_template_kwargs":{"reasoning_effort":"lots"}})", 400,
               "chat_template_kwargs.reasoning_effort", "none, minimal, low, medium, high, xhigh, max");
}

// Nesting is bounded before the body is parsed: 50,000 levels anywhere, or 30,000 inside a tool's
// parameter schema (rendered into the prompt by a recursive walk), are a 400 naming the limit.
TEST(RequestParser, DeeplyNestedJsonIsRejected) {
  const size_t limit = ParseLimits{}.max_json_depth;
  auto nest = [](size_t depth, const std::string& leaf) {
    std::string s;
    for (size_t i = 0; i < depth; ++i) s += "{\"a\":";
    s += leaf;
    s.append(depth, '}');
    return s;
  };
  std::string deep_array = std::string(50000, '[') + std::string(50000, ']');
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"user","content":)" + deep_array + "}]}", 400, "",
               fmt::format("nested deeper than {} levels", limit));
  expect_error(Endpoint::Completion, R"({"prompt":"x","extra":)" + deep_array + "}", 400, "",
               fmt::format("nested deeper than {} levels", limit));
  std::string tools = R"(,"tools":[{"type":"function","function":{"name":"f","parameters":)" + nest(30000, "1") + "}}]";
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + tools + "}", 400, "", "nested deeper than");
  // Brackets inside strings do not count.
  auto r = chat(R"({"messages":[{"role":"user","content":")" + std::string(50000, '[') + R"("}]})");
  EXPECT_EQ(r.messages[0]["content"].get<std::string>().size(), 50000u);
  // A schema of moderate depth is fine, and renders.
  r = chat(std::string("{") + kMsgs + R"(,"tools":[{"type":"function","function":{"name":"f","parameters":)" +
           nest(limit - 8, "{}") + "}}]}");
  EXPECT_NE(render_chat_prompt(r).find("## Tools"), std::string::npos);
  // Tool-call arguments are a JSON string parsed when the prompt is rendered: bounded too.
  std::string args = std::string(30000, '[') + std::string(30000, ']');
  expect_error(Endpoint::Chat,
               R"({"messages":[{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":")" +
                   args + R"("}}]}]})",
               400, "messages[0].tool_calls[0].function.arguments", "nested deeper than");
}

TEST(RequestParser, StreamOptionsNeedStream) {
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"stream_options":{"include_usage":true}})", 400,
               "stream_options", "stream");
  expect_error(Endpoint::Completion, R"({"prompt":"x","stream":false,"stream_options":{"include_usage":true}})", 400,
               "stream_options", "stream");
  EXPECT_TRUE(chat(std::string("{") + kMsgs + R"(,"stream":true,"stream_options":{"include_usage":true}})").include_usage);
}

// Text-only model: image parts are refused (not silently dropped); user content and a tool
// message's tool_call_id are required.
TEST(RequestParser, MessageContentChecks) {
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"user"}]})", 400, "messages[0].content", "required");
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"user","content":null}]})", 400, "messages[0].content", "required");
  expect_error(Endpoint::Chat,
               R"({"messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},
                   {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]})",
               400, "messages[0].content[1].type", "text only");
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"user","content":[{"type":"text"}]}]})", 400,
               "messages[0].content[0].text");
  expect_error(Endpoint::Chat,
               R"({"messages":[{"role":"user","content":"q"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1",
                   "type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","content":"42"}]})",
               400, "messages[2].tool_call_id", "required");
}

TEST(RequestParser, ToolsAndToolChoice) {
  std::string tools = R"("tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}},
                                  {"type":"function","function":{"name":"g"}}])";
  auto r = chat(std::string("{") + kMsgs + "," + tools + R"(,"tool_choice":"required","parallel_tool_calls":false})");
  EXPECT_EQ(r.tool_choice, ToolChoice::Required);
  EXPECT_FALSE(r.parallel_tool_calls);
  EXPECT_EQ(effective_tools(r).size(), 2u);
  r = chat(std::string("{") + kMsgs + "," + tools + R"(,"tool_choice":{"type":"function","function":{"name":"g"}}})");
  EXPECT_EQ(r.tool_choice, ToolChoice::Named);
  ASSERT_EQ(effective_tools(r).size(), 1u);
  EXPECT_EQ(effective_tools(r)[0]["function"]["name"], "g");
  r = chat(std::string("{") + kMsgs + "," + tools + R"(,"tool_choice":"none"})");
  EXPECT_TRUE(effective_tools(r).is_null());
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + "," + tools + R"(,"tool_choice":{"type":"function","function":{"name":"h"}}})",
               400, "tool_choice", "'h'");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"tool_choice":"required"})", 400, "tool_choice");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"tool_choice":"sometimes"})", 400, "tool_choice");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"tools":[{"type":"function","function":{}}]})", 400,
               "tools[0].function.name");
  expect_error(Endpoint::Chat, std::string("{") + kMsgs + R"(,"tools":[{"type":"retrieval"}]})", 400, "tools[0].type");
}

TEST(RequestParser, RenderedPromptCarriesToolsAndThinking) {
  std::string tools = R"("tools":[{"type":"function","function":{"name":"lookup_thing","parameters":{"type":"object"}}}])";
  auto r = chat(std::string("{") + kMsgs + "," + tools + R"(,"thinking":{"type":"enabled"}})");
  std::string p = render_chat_prompt(r);
  EXPECT_NE(p.find("lookup_thing"), std::string::npos);
  EXPECT_EQ(p.substr(p.size() - 7), "<think>");
  r = chat(std::string("{") + kMsgs + "," + tools + R"(,"tool_choice":"none"})");
  p = render_chat_prompt(r);
  EXPECT_EQ(p.find("lookup_thing"), std::string::npos);
  EXPECT_EQ(p.substr(p.size() - 8), "</think>");
  r = chat(std::string("{") + kMsgs + R"(,"response_format":{"type":"json_object"}})");
  EXPECT_NE(render_chat_prompt(r), render_chat_prompt(chat(std::string("{") + kMsgs + "}")));
}

TEST(RequestParser, MessagesValidation) {
  expect_error(Endpoint::Chat, "{}", 400, "messages", "required");
  expect_error(Endpoint::Chat, R"({"messages":"hi"})", 400, "messages", "array");
  expect_error(Endpoint::Chat, R"({"messages":[]})", 400, "messages", "empty");
  expect_error(Endpoint::Chat, R"({"messages":[1]})", 400, "messages[0]");
  expect_error(Endpoint::Chat, R"({"messages":[{"content":"x"}]})", 400, "messages[0].role");
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"wizard","content":"x"}]})", 400, "messages[0].role");
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"user","content":5}]})", 400, "messages[0].content");
  expect_error(Endpoint::Chat, R"({"messages":[{"role":"assistant","tool_calls":[{"function":{"arguments":"{}"}}]}]})", 400,
               "messages[0].tool_calls[0].function.name");
  // Every role of the format is accepted.
  auto r = chat(R"({"messages":[{"role":"system","content":"s"},{"role":"developer","content":"d"},
     {"role":"user","content":[{"type":"text","text":"u"}]},
     {"role":"assistant","content":null,"reasoning_content":"r","tool_calls":[{"id":"c1","type":"function",
       "function":{"name":"f","arguments":"{\"a\": 1}"}}]},
     {"role":"tool","tool_call_id":"c1","content":"ok"}]})");
  EXPECT_EQ(r.messages.size(), 5u);
  EXPECT_FALSE(render_chat_prompt(r).empty());
}

TEST(RequestParser, WrongTypesAndRanges) {
  const std::string m = std::string("{") + kMsgs + ",";
  expect_error(Endpoint::Chat, m + R"("temperature":"hot"})", 400, "temperature", "number");
  expect_error(Endpoint::Chat, m + R"("temperature":-1})", 400, "temperature");
  expect_error(Endpoint::Chat, m + R"("top_p":0})", 400, "top_p");
  expect_error(Endpoint::Chat, m + R"("max_tokens":0})", 400, "max_tokens");
  expect_error(Endpoint::Chat, m + R"("max_tokens":1.5})", 400, "max_tokens", "integer");
  expect_error(Endpoint::Chat, m + R"("max_tokens":99999999999})", 400, "max_tokens");
  expect_error(Endpoint::Chat, m + R"("n":0})", 400, "n");
  expect_error(Endpoint::Chat, m + R"("n":1000})", 400, "n");
  expect_error(Endpoint::Chat, m + R"("stream":"yes"})", 400, "stream", "boolean");
  expect_error(Endpoint::Chat, m + R"("stop":[1]})", 400, "stop[0]");
  expect_error(Endpoint::Chat, m + R"("seed":"x"})", 400, "seed");
  expect_error(Endpoint::Chat, m + R"("top_logprobs":3})", 400, "top_logprobs", "logprobs");
  expect_error(Endpoint::Chat, m + R"("logprobs":true,"top_logprobs":99})", 400, "top_logprobs");
  expect_error(Endpoint::Chat, m + R"("response_format":{"type":"xml"}})", 400, "response_format.type");
  expect_error(Endpoint::Chat, m + R"("response_format":{"type":"json_schema"}})", 400, "response_format.json_schema");
  expect_error(Endpoint::Chat, m + R"("logit_bias":{"5":10}})", 400, "logit_bias");
  expect_error(Endpoint::Chat, m + R"("stream_options":true})", 400, "stream_options");
  expect_error(Endpoint::Chat, m + R"("model":7})", 400, "model");
}

TEST(RequestParser, MalformedJson) {
  expect_error(Endpoint::Chat, "", 400, "", "malformed JSON");
  expect_error(Endpoint::Chat, "{\"messages\": [", 400, "", "malformed JSON");
  expect_error(Endpoint::Chat, "[1,2]", 400, "", "JSON object");
  expect_error(Endpoint::Completion, "\"prompt\"", 400, "", "JSON object");
  expect_error(Endpoint::Chat, "{\"messages\": \"\xff\"}", 400, "", "malformed JSON");
}

TEST(RequestParser, Completions) {
  auto r = parse_completion_request(R"({"prompt":"hello","echo":true,"logprobs":2,"max_tokens":3})");
  EXPECT_EQ(r.prompt_text, "hello");
  EXPECT_FALSE(r.prompt_is_ids);
  EXPECT_TRUE(r.echo);
  EXPECT_EQ(r.sampling.logprobs, 2);
  r = parse_completion_request(R"({"prompt":[1,2,3]})");
  EXPECT_TRUE(r.prompt_is_ids);
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  r = parse_completion_request(R"({"prompt":[[4,5]]})");
  EXPECT_EQ(r.prompt_ids, (std::vector<int32_t>{4, 5}));
  r = parse_completion_request(R"({"prompt":["text"]})");
  EXPECT_EQ(r.prompt_text, "text");
  expect_error(Endpoint::Completion, "{}", 400, "prompt", "required");
  expect_error(Endpoint::Completion, R"({"prompt":5})", 400, "prompt");
  expect_error(Endpoint::Completion, R"({"prompt":[]})", 400, "prompt");
  expect_error(Endpoint::Completion, R"({"prompt":[1,-2]})", 400, "prompt[1]");
  expect_error(Endpoint::Completion, R"({"prompt":["a","b"]})", 400, "prompt", "batched");
  expect_error(Endpoint::Completion, R"({"prompt":"x","logprobs":true})", 400, "logprobs");
  expect_error(Endpoint::Completion, R"({"prompt":"x","suffix":"y"})", 400, "suffix");
}

TEST(RequestParser, ErrorBodyShape) {
  ApiError e(401, "bad key", "", "", "invalid_api_key");
  auto j = nlohmann::json::parse(error_body(e));
  EXPECT_EQ(j["error"]["message"], "bad key");
  EXPECT_EQ(j["error"]["type"], "authentication_error");
  EXPECT_TRUE(j["error"]["param"].is_null());
  EXPECT_EQ(j["error"]["code"], "invalid_api_key");
  EXPECT_EQ(ApiError(404, "x").type, "not_found_error");
  EXPECT_EQ(ApiError(500, "x").type, "server_error");
  // Invalid UTF-8 in a message does not break the body.
  EXPECT_NO_THROW(nlohmann::json::parse(error_body(ApiError(400, "bad \xff byte"))));
}
