#pragma once
// Each subcommand lives in its own cmd_*.cpp and registers itself on the app.
#include <CLI/CLI.hpp>

namespace dsv4::cli {

// Subcommands set this to run after parsing; main() catches dsv4::Error and prints it.
using Action = std::function<int()>;

void register_make_tiny(CLI::App& app, Action& action);
void register_inspect(CLI::App& app, Action& action);
void register_logits(CLI::App& app, Action& action);
void register_tokenize(CLI::App& app, Action& action);
void register_detokenize(CLI::App& app, Action& action);
void register_chat_template(CLI::App& app, Action& action);
void register_serve(CLI::App& app, Action& action);
void register_bench(CLI::App& app, Action& action);
void register_bench_model(CLI::App& app, Action& action);  // dsv4 bench model (cmd_bench_model.cpp)
void register_generate(CLI::App& app, Action& action);  // dsv4 generate (cmd_generate.cpp)
void register_perplexity(CLI::App& app, Action& action);  // dsv4 perplexity (cmd_perplexity.cpp)

}  // namespace dsv4::cli
