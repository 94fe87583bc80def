#include "cli/commands.h"
namespace dsv4::cli {
void register_bench(CLI::App& app, Action& action) { (void)app; (void)action; }
}  // namespace dsv4::cli
