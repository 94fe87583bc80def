// dsv4: one binary, subcommands.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"dsv4: a native inference server for DeepSeek-V4"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dsv4 0.1.0");
  dsv4::cli::Action action;
  dsv4::cli::register_make_tiny(app, action);
  dsv4::cli::register_inspect(app, action);
  dsv4::cli::register_logits(app, action);
  dsv4::cli::register_tokenize(app, action);
  dsv4::cli::register_detokenize(app, action);
  dsv4::cli::register_chat_template(app, action);
  dsv4::cli::register_serve(app, action);
  dsv4::cli::register_bench(app, action);
  dsv4::cli::register_bench_model(app, action);
  dsv4::cli::register_generate(app, action);
  dsv4::cli::register_perplexity(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return action ? action() : 0;
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
