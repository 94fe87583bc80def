// The default model of serve / generate / perplexity (cli/demo_model.h). DSV4_SOURCE_DIR is set
// for this file only (CMakeLists.txt).
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "cli/demo_model.h"

namespace dsv4::cli {

std::string default_demo_model_dir() {
  namespace fs = std::filesystem;
  auto ok = [](const fs::path& p) {
    std::error_code ec;
    return fs::exists(p / "config.json", ec);
  };
  if (const char* env = std::getenv("DSV4_DEMO_MODEL"); env && *env) return ok(env) ? std::string(env) : std::string();
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path p = exe.parent_path().parent_path() / "models" / "demo-brown";
    if (ok(p)) return p.string();
  }
#ifdef DSV4_SOURCE_DIR
  const fs::path src = fs::path(DSV4_SOURCE_DIR) / "models" / "demo-brown";
  if (ok(src)) return src.string();
#endif
  return {};
}

}  // namespace dsv4::cli
