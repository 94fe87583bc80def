#include "util/log.h"

#include <unistd.h>

namespace dsv4 {

ProgressBar::ProgressBar(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total ? total : 1), tty_(::isatty(2)) {}

void ProgressBar::advance(uint64_t n) {
  done_ += n;
  int pct = static_cast<int>(100 * done_ / total_);
  if (pct == shown_ || !tty_) return;
  shown_ = pct;
  int bars = pct / 4;
  std::fprintf(stderr, "\r%s [%.*s%*s] %3d%%", label_.c_str(), bars, "=========================", 25 - bars, "", pct);
}

void ProgressBar::finish() {
  if (tty_) std::fprintf(stderr, "\r%s [=========================] 100%%\n", label_.c_str());
  else std::fprintf(stderr, "%s: done\n", label_.c_str());
}

}  // namespace dsv4
