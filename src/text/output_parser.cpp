// DeepSeek-V4 completion parsing; see output_parser.h.
#include "text/output_parser.h"

#include <algorithm>
#include <initializer_list>
#include <span>

#include "text/chat_format.h"
#include "text/pyjson.h"
#include "util/error.h"

namespace dsv4 {

namespace {

const std::string kToolCallsStart = "\n\n<" + std::string(kDsml) + "tool_calls";
const std::string kToolCallsBare = "<" + std::string(kDsml) + "tool_calls";
const std::string kToolCallsEnd = "</" + std::string(kDsml) + "tool_calls>";
const std::string kInvoke = "<" + std::string(kDsml) + "invoke";
const std::string kInvokeEnd = "</" + std::string(kDsml) + "invoke";
const std::string kParam = "<" + std::string(kDsml) + "parameter";
const std::string kParamEnd = "/" + std::string(kDsml) + "parameter";

struct Found {
  size_t pos = std::string_view::npos;  // npos: none
  int which = -1;
};

// Earliest occurrence of any stop at or after `from` (first listed wins ties).
Found find_first(std::string_view text, size_t from, std::span<const std::string_view> stops) {
  Found f;
  int i = 0;
  for (auto s : stops) {
    size_t p = text.find(s, from);
    if (p != std::string_view::npos && (f.pos == std::string_view::npos || p < f.pos)) {
      f.pos = p;
      f.which = i;
    }
    ++i;
  }
  return f;
}
Found find_first(std::string_view text, size_t from, std::initializer_list<std::string_view> stops) {
  return find_first(text, from, std::span(stops.begin(), stops.size()));
}

// _read_until_stop: returns content before the stop and advances index past it.
struct Read {
  std::string_view content;
  int which = -1;  // -1: no stop found (index moves to the end)
};
Read read_until(std::string_view text, size_t& index, std::initializer_list<std::string_view> stops) {
  Found f = find_first(text, index, stops);
  Read r;
  if (f.which < 0) {
    r.content = text.substr(index);
    index = text.size();
    return r;
  }
  r.content = text.substr(index, f.pos - index);
  r.which = f.which;
  index = f.pos + std::data(stops)[f.which].size();
  return r;
}

// Python str.isspace() for one UTF-8 encoded code point at s[i]; sets len.
bool py_space_at(std::string_view s, size_t i, size_t& len) {
  auto c = static_cast<unsigned char>(s[i]);
  uint32_t cp;
  if (c < 0x80) {
    cp = c;
    len = 1;
  } else {
    size_t n = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    cp = c & (0xFF >> (n + 1));
    for (size_t k = 1; k < n; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    len = n;
  }
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// re.findall(r'^\s*name="(.*?)">\n$', s, DOTALL) with exactly one match.
bool match_tool_name(std::string_view s, std::string& name) {
  size_t p = 0, len = 0;
  while (p < s.size() && py_space_at(s, p, len)) p += len;
  constexpr std::string_view head = "name=\"";
  if (s.substr(p, head.size()) != head) return false;
  size_t start = p + head.size(), n = s.size();
  // "$" matches at the end or before a final "\n": the shorter name wins.
  if (n >= start + 4 && s[n - 1] == '\n' && s.substr(n - 4, 3) == "\">\n") {
    name = std::string(s.substr(start, n - 4 - start));
    return true;
  }
  if (n >= start + 3 && s.substr(n - 3) == "\">\n") {
    name = std::string(s.substr(start, n - 3 - start));
    return true;
  }
  return false;
}

// Position of the closing '<' for r'(.*?)<$' over the whole string, or npos.
size_t value_end(std::string_view s) {
  size_t n = s.size();
  if (n >= 2 && s[n - 2] == '<' && s[n - 1] == '\n') return n - 2;
  if (n >= 1 && s[n - 1] == '<') return n - 1;
  return std::string_view::npos;
}

// Header ' name="K" string="true|false">' of a parameter: sets name, is_string and
// the offset where the value starts. `limit` bounds where the value may start.
bool match_param_header(std::string_view s, std::string& name, bool& is_string, size_t& value_start,
                        size_t limit, bool* incomplete = nullptr) {
  constexpr std::string_view head = " name=\"";
  constexpr std::string_view mid = "\" string=\"";
  if (s.substr(0, head.size()) != head) return false;
  size_t q = head.size();
  while ((q = s.find(mid, q)) != std::string_view::npos) {
    std::string_view rest = s.substr(q + mid.size());
    size_t vs = 0;
    if (rest.substr(0, 6) == "true\">") {
      is_string = true;
      vs = q + mid.size() + 6;
    } else if (rest.substr(0, 7) == "false\">") {
      is_string = false;
      vs = q + mid.size() + 7;
    } else {
      if (incomplete && (std::string_view("true\">").substr(0, rest.size()) == rest ||
                         std::string_view("false\">").substr(0, rest.size()) == rest)) {
        *incomplete = true;  // the alternative may still complete here
        return false;
      }
      ++q;
      continue;
    }
    if (vs > limit) return false;
    name = std::string(s.substr(head.size(), q - head.size()));
    value_start = vs;
    return true;
  }
  return false;
}

// param_kv regex over the full parameter content.
bool match_param(std::string_view s, std::string& name, bool& is_string, std::string& value) {
  size_t end = value_end(s);
  if (end == std::string_view::npos) return false;
  size_t vs = 0;
  if (!match_param_header(s, name, is_string, vs, end)) return false;
  value = std::string(s.substr(vs, end - vs));
  return true;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  py_json_escape_append(out, s);
  out += '"';
  return out;
}

// A parameter's value as it goes into the arguments JSON: string="true" values as JSON strings;
// string="false" values verbatim when they are JSON (the official decoder pastes them verbatim
// even when they are not, which makes the arguments invalid JSON), else as JSON strings.
// (nlohmann's accept() is a non-recursive SAX pass, whatever the nesting. It also takes a NUL byte
// as the end of its input, so "1<NUL>junk" would pass: JSON text has no raw NUL anywhere.)
std::string param_json(std::string_view value, bool is_string) {
  if (!is_string && value.find('\0') == std::string_view::npos && nlohmann::json::accept(value))
    return std::string(value);
  return json_string(value);
}

// Length of the longest suffix of `buf` that is a proper prefix of a marker.
size_t partial_marker(std::string_view buf, std::span<const std::string_view> markers) {
  size_t best = 0;
  for (auto m : markers) {
    size_t maxk = std::min(buf.size(), m.size() - 1);
    for (size_t k = maxk; k > best; --k) {
      if (buf.substr(buf.size() - k) == m.substr(0, k)) {
        best = k;
        break;
      }
    }
  }
  return best;
}
size_t partial_marker(std::string_view buf, std::initializer_list<std::string_view> markers) {
  return partial_marker(buf, std::span(markers.begin(), markers.size()));
}

// Markers that end a reasoning / content run, in tie-breaking order, with and without DSML
// tool calls.
const std::string_view kReasoningEnds[] = {kThinkEnd, kToolCallsStart, kEos};
const std::string_view kReasoningEndsNoTools[] = {kThinkEnd, kEos};
const std::string_view kContentEnds[] = {kEos, kToolCallsStart, kToolCallsBare};
const std::string_view kContentEndsNoTools[] = {kEos};

// Bytes of an incomplete UTF-8 sequence at the end of s[0, n).
size_t incomplete_utf8_tail(std::string_view s, size_t n) {
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    size_t need = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

ParsedMessage parse_completion(std::string_view text, bool thinking) {
  ParsedMessage msg;
  size_t index = 0;
  int stop = -1;
  if (thinking) {
    Read r = read_until(text, index, {kThinkEnd, kToolCallsStart});
    msg.reasoning_content = std::string(r.content);
    if (r.which != 0) fail("Invalid thinking format: missing </think>");
  }
  Read r = read_until(text, index, {kEos, kToolCallsStart});
  msg.content = std::string(r.content);
  bool tool_calling = r.which == 1;
  bool stop_is_eos_or_none = r.which != 1;  // stop_token in [eos, None]
  if (!tool_calling && r.which != 0) fail("Invalid format: missing EOS token");
  if (tool_calling) {
    // parse_tool_calls
    std::string_view last_stop;  // the stop token it returns ("" = None)
    while (index < text.size()) {
      Read a = read_until(text, index, {kInvoke, kToolCallsEnd});
      last_stop = a.which == 0 ? std::string_view(kInvoke) : a.which == 1 ? std::string_view(kToolCallsEnd) : "";
      if (a.content != ">\n")
        fail("Tool call format error: expected '>\\n' but got '{}'", a.content);
      if (a.which == 1) break;
      if (a.which < 0) fail("Missing special token in tool calls");
      Read h = read_until(text, index, {kParam, kInvokeEnd});
      last_stop = h.which == 0 ? std::string_view(kParam) : h.which == 1 ? std::string_view(kInvokeEnd) : "";
      ToolCall tc;
      if (!match_tool_name(h.content, tc.name)) fail("Tool name format error: '{}'", h.content);
      std::vector<std::pair<std::string, std::string>> args;  // key, rendered value
      int st = h.which;
      while (st == 0) {
        Read p = read_until(text, index, {kParamEnd});
        std::string key, value;
        bool is_string = false;
        if (!match_param(p.content, key, is_string, value)) fail("Parameter format error: '{}'", p.content);
        for (const auto& kv : args)
          if (kv.first == key) fail("Duplicate parameter name: '{}'", key);
        args.emplace_back(key, param_json(value, is_string));
        Read after = read_until(text, index, {kParam, kInvokeEnd});
        st = after.which;
        last_stop = st == 0 ? std::string_view(kParam) : st == 1 ? std::string_view(kInvokeEnd) : "";
        if (after.content != ">\n")
          fail("Parameter format error: expected '>\\n' but got '{}'", after.content);
      }
      tc.arguments_json = "{";
      for (size_t i = 0; i < args.size(); ++i) {
        if (i) tc.arguments_json += ", ";
        tc.arguments_json += json_string(args[i].first) + ": " + args[i].second;
      }
      tc.arguments_json += "}";
      msg.tool_calls.push_back(std::move(tc));
    }
    (void)last_stop;
    Read e = read_until(text, index, {kEos});
    if (!e.content.empty()) fail("Unexpected content after tool calls");
    stop_is_eos_or_none = true;  // the last read's stop is EOS or None
  }
  (void)stop;
  if (index != text.size() || !stop_is_eos_or_none) fail("Unexpected content at end");
  for (std::string_view sp : {kBos, kEos, kThinkStart, kThinkEnd, kDsml}) {
    if (msg.content.find(sp) != std::string::npos || msg.reasoning_content.find(sp) != std::string::npos)
      fail("Unexpected special token '{}' in content", sp);
  }
  return msg;
}

// ---------------------------------------------------------------------------
// Streaming

StreamParser::StreamParser(bool thinking, ToolNames tools)
    : state_(thinking ? State::Reasoning : State::Content),
      tools_(std::move(tools)),
      dsml_(!tools_ || !tools_->empty()) {}

void StreamParser::keep_block_as_text() {
  buf_.insert(0, raw_);
  raw_.clear();
  dsml_ = false;
  state_ = State::Content;
  scanned_ = 0;
}

std::vector<StreamDelta> StreamParser::feed(std::string_view bytes) {
  std::vector<StreamDelta> out;
  if (state_ == State::Done || state_ == State::Broken) {
    if (state_ == State::Done && !bytes.empty() && error_.empty()) error_ = "text after EOS ignored";
    return out;
  }
  buf_.append(bytes);
  run(out, false);
  return out;
}

std::vector<StreamDelta> StreamParser::finish() {
  std::vector<StreamDelta> out;
  run(out, true);
  return out;
}

void StreamParser::run(std::vector<StreamDelta>& out, bool final) {
  while (step(out, final)) {
  }
}

void StreamParser::push(std::vector<StreamDelta>& out, StreamDelta::Kind kind, std::string text, int index) {
  if (text.empty() && kind != StreamDelta::Kind::ToolCallStart) return;
  // Merge with the previous delta of the same kind to keep the list short.
  if (!out.empty() && kind != StreamDelta::Kind::ToolCallStart && out.back().kind == kind &&
      out.back().index == index) {
    out.back().text += text;
    return;
  }
  out.push_back(StreamDelta{kind, std::move(text), index});
}

void StreamParser::consume(size_t n) {
  buf_.erase(0, n);
  scanned_ = 0;
}

void StreamParser::broken(const std::string& why) {
  if (error_.empty()) error_ = why;
  state_ = State::Broken;
  buf_.clear();
  scanned_ = 0;
}

// Emits up to n bytes of buf_ as text of `kind`, stopping short of an
// incomplete UTF-8 sequence unless final.
void StreamParser::emit_text(std::vector<StreamDelta>& out, StreamDelta::Kind kind, size_t n, bool final) {
  if (!final) n -= incomplete_utf8_tail(buf_, n);
  if (n == 0) return;
  push(out, kind, buf_.substr(0, n));
  consume(n);
}

// A string value streams out escaped as it arrives (its quotes are pushed around it); any other
// value is held until it is complete (`final`), then goes out through param_json.
void StreamParser::emit_value(std::vector<StreamDelta>& out, size_t n, bool final) {
  if (!param_is_string_ && !final) return;
  if (!final) n -= incomplete_utf8_tail(buf_, n);
  if (n == 0 && param_is_string_) return;  // an empty non-string value still goes out (as "")
  std::string frag;
  if (param_is_string_) py_json_escape_append(frag, std::string_view(buf_).substr(0, n));
  else frag = param_json(std::string_view(buf_).substr(0, n), false);
  push(out, StreamDelta::Kind::ToolCallArgs, std::move(frag), tool_index_);
  consume(n);
}

// One transition; returns true when it made progress and should run again.
bool StreamParser::step(std::vector<StreamDelta>& out, bool final) {
  using K = StreamDelta::Kind;
  std::string_view b = buf_;
  // Markers can straddle feeds: search again from a marker's length before the
  // old end (64 bytes covers the longest marker).
  auto from = [&](size_t) { return scanned_ > 64 ? scanned_ - 64 : size_t{0}; };
  switch (state_) {
    case State::Reasoning:
    case State::Content: {
      const bool reasoning = state_ == State::Reasoning;
      const K kind = reasoning ? K::Reasoning : K::Content;
      using Ends = std::span<const std::string_view>;
      Ends ends = reasoning ? (dsml_ ? Ends(kReasoningEnds) : Ends(kReasoningEndsNoTools))
                            : (dsml_ ? Ends(kContentEnds) : Ends(kContentEndsNoTools));
      Found f = find_first(b, from(kToolCallsStart.size()), ends);
      if (f.which < 0) {
        scanned_ = b.size();
        size_t hold = final ? 0 : partial_marker(b, ends);
        emit_text(out, kind, b.size() - hold, final);
        return false;
      }
      std::string_view marker = ends[size_t(f.which)];
      size_t before = f.pos;
      if (before) {
        push(out, kind, buf_.substr(0, before));
      }
      consume(before + marker.size());
      if (marker == kThinkEnd) {
        state_ = State::Content;
      } else if (marker == kEos) {
        if (reasoning && error_.empty()) error_ = "missing </think> before EOS";
        state_ = State::Done;
        if (!buf_.empty() && error_.empty()) error_ = "text after EOS ignored";
        buf_.clear();
      } else {
        if (reasoning && error_.empty()) error_ = "tool calls inside reasoning (missing </think>)";
        raw_ = marker;
        state_ = State::ToolsOpen;
      }
      return true;
    }
    case State::ToolsOpen:
    case State::ParamAfter: {
      const bool after_param = state_ == State::ParamAfter;
      std::string_view m0 = after_param ? std::string_view(kParam) : std::string_view(kInvoke);
      std::string_view m1 = after_param ? std::string_view(kInvokeEnd) : std::string_view(kToolCallsEnd);
      Found f = find_first(b, from(kToolCallsEnd.size()), {m0, m1});
      if (f.which < 0) {
        scanned_ = b.size();
        if (!final) {
          // Exactly ">\n" precedes the next tag: fail early on anything else.
          std::string_view gap = b.substr(0, std::min<size_t>(b.size(), 2));
          std::string_view tag = b.size() > 2 ? b.substr(2) : std::string_view();
          if (gap != std::string_view(">\n").substr(0, gap.size()) ||
              (tag != m0.substr(0, std::min(tag.size(), m0.size())) &&
               tag != m1.substr(0, std::min(tag.size(), m1.size()))))
            broken("Tool call format error: expected '>\\n'");
          return false;
        }
        if (after_param && b == ">\n") {  // text ends after the last parameter
          push(out, K::ToolCallArgs, "}", tool_index_);
          buf_.clear();
          state_ = State::ToolsClosed;
          return false;
        }
        if (!b.empty() || after_param) broken("Tool call format error: truncated tool calls");
        return false;
      }
      if (b.substr(0, f.pos) != ">\n") {
        broken("Tool call format error: expected '>\\n'");
        return false;
      }
      if (!after_param && f.which == 0) {  // an invoke starts: the text kept if its tool was not offered
        if (tool_index_ >= 0) raw_ = m0;    // from the invoke tag on (the calls before it stay calls)
        else raw_ += b.substr(0, f.pos + m0.size());  // from the block start on
      }
      consume(f.pos + (f.which == 0 ? m0 : m1).size());
      if (after_param) {
        if (f.which == 0) {
          state_ = State::ParamHeader;
        } else {
          push(out, K::ToolCallArgs, "}", tool_index_);
          state_ = State::ToolsOpen;
        }
      } else {
        state_ = f.which == 0 ? State::InvokeHeader : State::ToolsClosed;
      }
      return true;
    }
    case State::InvokeHeader: {
      Found f = find_first(b, from(kInvokeEnd.size()), {kParam, kInvokeEnd});
      if (f.which < 0) {
        scanned_ = b.size();
        if (!final) return false;
        std::string name;
        if (!match_tool_name(b, name)) {
          broken("Tool name format error");
          return false;
        }
        if (!offered(name)) {
          keep_block_as_text();
          return true;
        }
        ++tool_index_;
        push(out, K::ToolCallStart, name, tool_index_);
        push(out, K::ToolCallArgs, "{}", tool_index_);
        buf_.clear();
        state_ = State::ToolsClosed;
        return false;
      }
      std::string name;
      if (!match_tool_name(b.substr(0, f.pos), name)) {
        broken("Tool name format error");
        return false;
      }
      if (!offered(name)) {
        keep_block_as_text();
        return true;
      }
      ++tool_index_;
      push(out, K::ToolCallStart, name, tool_index_);
      push(out, K::ToolCallArgs, "{", tool_index_);
      first_param_ = true;
      param_names_.clear();
      consume(f.pos + (f.which == 0 ? kParam : kInvokeEnd).size());
      if (f.which == 0) {
        state_ = State::ParamHeader;
      } else {
        push(out, K::ToolCallArgs, "}", tool_index_);
        state_ = State::ToolsOpen;
      }
      return true;
    }
    case State::ParamHeader: {
      // The header ends at the first '" string="true">' / '" string="false">';
      // the parameter end tag before it is an error.
      size_t pend = b.find(kParamEnd);
      std::string name;
      bool is_string = false;
      size_t vs = 0;
      std::string_view head = pend == std::string_view::npos ? b : b.substr(0, pend);
      bool incomplete = false;
      if (!match_param_header(head, name, is_string, vs, head.size(),
                              pend == std::string_view::npos && !final ? &incomplete : nullptr)) {
        constexpr std::string_view lead = " name=\"";
        std::string_view start = b.substr(0, std::min(b.size(), lead.size()));
        if (final || pend != std::string_view::npos || start != lead.substr(0, start.size()))
          broken("Parameter format error");
        return false;
      }
      if (!param_names_.insert(name).second && error_.empty()) error_ = "Duplicate parameter name: '" + name + "'";
      std::string frag = first_param_ ? "" : ", ";
      frag += json_string(name) + ": " + (is_string ? "\"" : "");
      push(out, K::ToolCallArgs, frag, tool_index_);
      first_param_ = false;
      param_is_string_ = is_string;
      consume(vs);
      state_ = State::ParamValue;
      return true;
    }
    case State::ParamValue: {
      size_t p = b.find(kParamEnd, from(kParamEnd.size()));
      if (p == std::string_view::npos) {
        scanned_ = b.size();
        if (final) {
          emit_value(out, b.size(), true);
          broken("Parameter format error: unterminated parameter");
          return false;
        }
        size_t hold = partial_marker(b, {kParamEnd}) + 2;  // the '<' or "<\n" before the end tag
        if (b.size() > hold) emit_value(out, b.size() - hold, false);
        return false;
      }
      size_t end = value_end(b.substr(0, p));
      if (end == std::string_view::npos) {
        emit_value(out, p, true);  // what a split feed would have emitted already
        broken("Parameter format error");
        return false;
      }
      emit_value(out, end, true);
      if (param_is_string_) push(out, K::ToolCallArgs, "\"", tool_index_);
      consume(p - end + kParamEnd.size());
      state_ = State::ParamAfter;
      return true;
    }
    case State::ToolsClosed: {
      if (b.empty()) return false;
      if (b.substr(0, kEos.size()) == kEos) {
        if (b.size() > kEos.size() && error_.empty()) error_ = "text after EOS ignored";
        buf_.clear();
        state_ = State::Done;
        return false;
      }
      if (final || b != kEos.substr(0, b.size())) broken("Unexpected content after tool calls");
      return false;
    }
    case State::Done:
    case State::Broken:
      buf_.clear();
      return false;
  }
  return false;
}

void apply_delta(ParsedMessage& msg, const StreamDelta& d) {
  switch (d.kind) {
    case StreamDelta::Kind::Reasoning: msg.reasoning_content += d.text; break;
    case StreamDelta::Kind::Content: msg.content += d.text; break;
    case StreamDelta::Kind::ToolCallStart: msg.tool_calls.push_back(ToolCall{"", d.text, ""}); break;
    case StreamDelta::Kind::ToolCallArgs:
      DSV4_CHECK(d.index >= 0 && static_cast<size_t>(d.index) < msg.tool_calls.size());
      msg.tool_calls[static_cast<size_t>(d.index)].arguments_json += d.text;
      break;
  }
}

ParsedMessage parse_completion_lenient(std::string_view text, bool thinking, std::string* error, ToolNames tools) {
  StreamParser p(thinking, std::move(tools));
  ParsedMessage msg;
  for (const auto& d : p.feed(text)) apply_delta(msg, d);
  for (const auto& d : p.finish()) apply_delta(msg, d);
  if (error) *error = p.error();
  return msg;
}

}  // namespace dsv4
