#pragma once
// Environment switches of the fast paths (host code and CUDA launchers alike).
#include <cstdlib>
#include <string_view>

namespace dsv4 {

// A switch of a fast path that is on by default: environment variable `name` set to "0" turns it
// off (for A/B measurements and bisecting).
inline bool env_flag_default_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::string_view(v) == "0");
}

}  // namespace dsv4
