// dsv4 chat-template: render an OpenAI-style conversation into the DeepSeek-V4
// prompt text (exact bytes on stdout, no trailing newline added).
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli/commands.h"
#include "text/chat_format.h"
#include "util/error.h"

namespace dsv4::cli {

namespace {

ojson read_json_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {} file '{}'", what, path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return ojson::parse(ss.str());
  } catch (const std::exception& e) {
    fail("{} file '{}' is not valid JSON: {}", what, path, e.what());
  }
}

}  // namespace

void register_chat_template(CLI::App& app, Action& action) {
  struct Opts {
    std::string messages, tools, response_format, thinking = "chat", effort;
    bool legacy_effort = false, keep_reasoning = false, no_bos = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("chat-template", "Render a conversation into the DeepSeek-V4 prompt text");
  cmd->add_option("--messages", o->messages,
                  "JSON file: a list of OpenAI-style messages, or an object with \"messages\" (and optional "
                  "\"tools\", \"response_format\")")
      ->required();
  cmd->add_option("--tools", o->tools, "JSON file: OpenAI tool list");
  cmd->add_option("--response-format", o->response_format, "JSON file: response_format object");
  cmd->add_option("--thinking", o->thinking, "chat | thinking | max (thinking with effort max)")
      ->check(CLI::IsMember({"chat", "thinking", "max"}));
  cmd->add_option("--effort", o->effort, "Reasoning effort in thinking mode: low | high | max")
      ->check(CLI::IsMember({"low", "high", "max"}));
  cmd->add_flag("--legacy-effort", o->legacy_effort,
                "Effort preamble of the first V4 release (only max adds text, the older one)");
  cmd->add_flag("--keep-reasoning", o->keep_reasoning, "Do not drop reasoning of earlier turns");
  cmd->add_flag("--no-bos", o->no_bos, "Do not start with the BOS token");
  cmd->callback([o, &action] {
    action = [o] {
      ojson doc = read_json_file(o->messages, "messages");
      ojson messages = doc, tools = nullptr, rf = nullptr;
      if (doc.is_object()) {
        if (!doc.contains("messages")) fail("messages file '{}': object without \"messages\"", o->messages);
        messages = doc["messages"];
        if (doc.contains("tools")) tools = doc["tools"];
        if (doc.contains("response_format")) rf = doc["response_format"];
      }
      if (!o->tools.empty()) tools = read_json_file(o->tools, "tools");
      if (!o->response_format.empty()) rf = read_json_file(o->response_format, "response format");
      ChatOptions opts = chat_options_from_mode(o->thinking);
      if (!o->effort.empty()) opts.reasoning_effort = o->effort;
      opts.legacy_effort = o->legacy_effort;
      opts.drop_thinking = !o->keep_reasoning;
      opts.add_bos = !o->no_bos;
      std::string prompt = render_chat(messages, tools, opts, rf);
      std::fwrite(prompt.data(), 1, prompt.size(), stdout);
      std::fflush(stdout);
      return 0;
    };
  });
}

}  // namespace dsv4::cli
