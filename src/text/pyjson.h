#pragma once
// Python-compatible JSON serialization, as `json.dumps(value, ensure_ascii=False)`
// writes it with its default separators (", " and ": "). The DeepSeek-V4 chat
// encoder (a Python program) embeds JSON this way into prompts and into parsed
// tool-call arguments, so byte-exact prompts need the same bytes:
//   * objects keep their key order (use nlohmann::ordered_json end to end);
//   * strings escape only '"', '\\' and control characters below 0x20
//     (\n \r \t \b \f by name, the rest as \u00xx), everything else verbatim;
//   * floats as Python's repr: shortest round-trip digits, "1.0", "1e-05",
//     "1e+16", "NaN", "Infinity", "-Infinity".
// Known gap: Python keeps integers of any size; nlohmann turns integers beyond
// 64 bits into doubles, so those print differently.
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace dsv4 {

using ojson = nlohmann::ordered_json;

// json.dumps(value, ensure_ascii=False)
std::string py_json_dumps(const ojson& value);
// Appends json.dumps(str, ensure_ascii=False) without the surrounding quotes.
void py_json_escape_append(std::string& out, std::string_view s);
// repr(float)
std::string py_float_repr(double v);

// JSON nesting is bounded wherever untrusted JSON enters (request bodies, tool-call argument
// strings): the walks over JSON values here and in the chat format recurse once per level.
// py_json_dumps throws dsv4::Error on a value nested deeper than this.
inline constexpr size_t kMaxJsonDepth = 1000;

// Offset of the first '[' or '{' of `text` (JSON text, possibly malformed) that opens nesting
// level max_depth + 1, counting brackets outside strings; npos when the nesting stays within
// max_depth. A cheap pre-scan: run it before parsing so that no recursive walk ever sees
// deeper values.
size_t json_depth_exceeded_at(std::string_view text, size_t max_depth);

}  // namespace dsv4
