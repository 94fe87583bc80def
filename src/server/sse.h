#pragma once
// Incremental Server-Sent Events parser (the subset OpenAI-style streams use): feed arbitrary
// byte chunks, get complete events' data fields. Comment lines (": ping") are skipped; several
// data lines of one event are joined with "\n"; CRLF and LF line ends are accepted.
#include <string>
#include <string_view>
#include <vector>

namespace dsv4::server {

class SseParser {
 public:
  // Returns the data of every event completed by this chunk.
  std::vector<std::string> feed(std::string_view bytes);
  // Data of an unterminated last event, if any (stream ended without a blank line).
  std::vector<std::string> finish();

 private:
  void line(std::string_view l, std::vector<std::string>& out);
  std::string buf_, data_;
  bool has_data_ = false;
};

}  // namespace dsv4::server
