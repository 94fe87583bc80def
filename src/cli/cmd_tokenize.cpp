// dsv4 tokenize / detokenize: thin wrappers around dsv4::Tokenizer.
#include <chrono>
#include <cstdio>
#include <ctime>

#include <fmt/format.h>

#include "cli/commands.h"
#include "text/tokenizer.h"
#include "util/error.h"
#include "util/mapped_file.h"

namespace dsv4::cli {

namespace {

void write_stdout(std::string_view s) {
  if (!s.empty() && std::fwrite(s.data(), 1, s.size(), stdout) != s.size()) fail("stdout: write failed");
  std::fflush(stdout);
}

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(ids[i]);
  }
  return out + "]\n";
}

// Ids from "1,2,3", "[1, 2, 3]" or whitespace-separated text.
std::vector<int32_t> parse_ids(std::string_view s, const std::string& where) {
  std::vector<int32_t> ids;
  size_t i = 0;
  auto sep = [](char c) { return c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '[' || c == ']'; };
  while (i < s.size()) {
    if (sep(s[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    if (s[j] == '-' || s[j] == '+') ++j;
    size_t digits = j;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    if (j == digits || (j < s.size() && !sep(s[j])))
      fail("{}: expected token ids separated by commas or spaces, got '{}' at offset {}", where,
           s.substr(i, std::min<size_t>(16, s.size() - i)), i);
    std::string tok(s.substr(i, j - i));
    long long v = 0;
    try {
      v = std::stoll(tok);
    } catch (const std::exception&) {
      fail("{}: id '{}' at offset {} is out of range", where, tok, i);
    }
    if (v < INT32_MIN || v > INT32_MAX) fail("{}: id '{}' at offset {} is out of range", where, tok, i);
    ids.push_back(int32_t(v));
    i = j;
  }
  return ids;
}

}  // namespace

void register_tokenize(CLI::App& app, Action& action) {
  struct Opts {
    std::string tokenizer, text, file;
    bool bos = false, no_special = false;
    int bench = 0;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("tokenize", "Encode text to token ids (JSON array on stdout)");
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer.json")->required();
  auto* t = cmd->add_option("--text", o->text, "Text to encode (bytes as given)");
  auto* f = cmd->add_option("--file", o->file, "File to encode (bytes as they are, no newline translation)");
  t->excludes(f);
  cmd->add_flag("--bos", o->bos, "Prepend the BOS token");
  cmd->add_flag("--no-special", o->no_special, "Encode special tokens' text as plain text");
  cmd->add_option("--bench", o->bench, "Encode N times and print throughput JSON instead of ids")
      ->check(CLI::Range(1, 1000000));
  cmd->callback([o, t, f, &action] {
    if (t->count() + f->count() != 1) throw CLI::RequiredError("exactly one of --text or --file");
    action = [o] {
      Tokenizer tok = Tokenizer::load(o->tokenizer);
      std::string input = o->file.empty() ? o->text : read_text_file(o->file);
      if (o->bench > 0) {
        // Wall time and this thread's CPU time (the latter is not inflated by other processes).
        auto cpu_now = [] {
          timespec ts{};
          clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
          return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
        };
        using clk = std::chrono::steady_clock;
        std::vector<int32_t> ids;
        double first = 0, first_cpu = 0, total = 0, total_cpu = 0;
        for (int i = 0; i < o->bench; ++i) {
          auto t0 = clk::now();
          double c0 = cpu_now();
          ids = tok.encode(input, !o->no_special);
          double dc = cpu_now() - c0;
          double dt = std::chrono::duration<double>(clk::now() - t0).count();
          if (i == 0) first = dt, first_cpu = dc;
          total += dt;
          total_cpu += dc;
        }
        double mb = double(input.size()) / 1e6;
        write_stdout(fmt::format(
            "{{\"bytes\":{},\"tokens\":{},\"runs\":{},\"first_run_mb_per_s\":{:.2f},\"mean_mb_per_s\":{:.2f},"
            "\"first_run_cpu_mb_per_s\":{:.2f},\"mean_cpu_mb_per_s\":{:.2f}}}\n",
            input.size(), ids.size(), o->bench, mb / first, mb * o->bench / total, mb / first_cpu,
            mb * o->bench / total_cpu));
        return 0;
      }
      std::vector<int32_t> ids;
      if (o->bos) {
        auto b = tok.bos_id();
        if (!b) fail("tokenizer {}: --bos given but the tokenizer has no <｜begin▁of▁sentence｜> token", o->tokenizer);
        ids.push_back(*b);
      }
      tok.encode_append(input, ids, !o->no_special);
      write_stdout(ids_json(ids));
      return 0;
    };
  });
}

void register_detokenize(CLI::App& app, Action& action) {
  struct Opts {
    std::string tokenizer, ids, file;
    bool skip_special = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("detokenize", "Decode token ids to text on stdout");
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer.json")->required();
  auto* i = cmd->add_option("--ids", o->ids, "Ids: 1,2,3");
  auto* f = cmd->add_option("--file", o->file, "File of ids (JSON array, or comma/space separated)");
  i->excludes(f);
  cmd->add_flag("--skip-special", o->skip_special, "Leave out special tokens");
  cmd->callback([o, i, f, &action] {
    if (i->count() + f->count() != 1) throw CLI::RequiredError("exactly one of --ids or --file");
    action = [o] {
      Tokenizer tok = Tokenizer::load(o->tokenizer);
      std::vector<int32_t> ids =
          o->file.empty() ? parse_ids(o->ids, "--ids") : parse_ids(read_text_file(o->file), o->file);
      write_stdout(tok.decode(ids, o->skip_special));
      return 0;
    };
  });
}

}  // namespace dsv4::cli
