#include "server/sse.h"

namespace dsv4::server {

void SseParser::line(std::string_view l, std::vector<std::string>& out) {
  if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
  if (l.empty()) {  // blank line: dispatch
    if (has_data_) out.push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  if (l[0] == ':') return;  // comment
  size_t colon = l.find(':');
  std::string_view field = l.substr(0, colon), value;
  if (colon != std::string_view::npos) {
    value = l.substr(colon + 1);
    if (!value.empty() && value[0] == ' ') value.remove_prefix(1);
  }
  if (field == "data") {
    if (has_data_) data_ += '\n';
    data_.append(value);
    has_data_ = true;
  }
}

std::vector<std::string> SseParser::feed(std::string_view bytes) {
  std::vector<std::string> out;
  buf_.append(bytes);
  size_t start = 0, nl;
  while ((nl = buf_.find('\n', start)) != std::string::npos) {
    line(std::string_view(buf_).substr(start, nl - start), out);
    start = nl + 1;
  }
  buf_.erase(0, start);
  return out;
}

std::vector<std::string> SseParser::finish() {
  std::vector<std::string> out;
  if (!buf_.empty()) line(buf_, out);
  buf_.clear();
  line("", out);
  return out;
}

}  // namespace dsv4::server
