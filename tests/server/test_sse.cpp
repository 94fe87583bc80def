// SSE parsing for the bench client: any chunking gives the same events.
#include <gtest/gtest.h>

#include "server/sse.h"

using dsv4::server::SseParser;

TEST(Sse, EventsCommentsAndChunking) {
  const std::string stream =
      ": ping\n\ndata: {\"a\":1}\n\ndata: x\r\ndata: y\r\n\r\nevent: e\ndata:z\n\ndata: [DONE]\n\n";
  const std::vector<std::string> want = {"{\"a\":1}", "x\ny", "z", "[DONE]"};
  for (size_t step = 1; step <= stream.size(); ++step) {
    SseParser p;
    std::vector<std::string> got;
    for (size_t i = 0; i < stream.size(); i += step) {
      auto ev = p.feed(std::string_view(stream).substr(i, step));
      got.insert(got.end(), ev.begin(), ev.end());
    }
    auto tail = p.finish();
    got.insert(got.end(), tail.begin(), tail.end());
    ASSERT_EQ(got, want) << "chunk size " << step;
  }
}

TEST(Sse, UnterminatedLastEvent) {
  SseParser p;
  EXPECT_TRUE(p.feed("data: partial").empty());
  EXPECT_EQ(p.finish(), std::vector<std::string>{"partial"});
}
