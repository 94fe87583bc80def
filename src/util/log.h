#pragma once
// Progress and status lines go to stderr so stdout stays machine-readable.
#include <cstdint>
#include <cstdio>
#include <fmt/format.h>
#include <string>

namespace dsv4 {

template <class... Args>
void log_info(fmt::format_string<Args...> fmt, Args&&... args) {
  std::fputs((fmt::format(fmt, std::forward<Args>(args)...) + "\n").c_str(), stderr);
}

// A single-line progress bar; redraws only when the shown percentage changes.
class ProgressBar {
 public:
  ProgressBar(std::string label, uint64_t total);
  void advance(uint64_t n);
  void finish();

 private:
  std::string label_;
  uint64_t total_, done_ = 0;
  int shown_ = -1;
  bool tty_;
};

}  // namespace dsv4
