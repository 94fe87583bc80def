#pragma once
// One exception type for every user-facing failure: the message must name the
// file / field / tensor / parameter at fault, because the CLI prints it as is.
#include <stdexcept>
#include <string>
#include <fmt/format.h>

namespace dsv4 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

template <class... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> fmt, Args&&... args) {
  throw Error(fmt::format(fmt, std::forward<Args>(args)...));
}

// Internal invariant (a bug in dsv4, not bad input).
#define DSV4_CHECK(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) ::dsv4::fail("internal check failed: {} ({}:{})", #cond, __FILE__, __LINE__); \
  } while (0)

}  // namespace dsv4
