#include "cli/commands.h"
#include "model/tiny.h"
#include "util/log.h"

namespace dsv4::cli {

void register_make_tiny(CLI::App& app, Action& action) {
  struct Opts {
    std::string out, preset = "tiny";
    uint64_t seed = 1;
    int shards = 2;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand("make-tiny", "Write a small random model in the official checkpoint layout");
  cmd->add_option("--out", o->out, "Output directory")->required();
  cmd->add_option("--seed", o->seed, "Random seed");
  std::string presets;
  for (const auto& n : tiny_preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  cmd->add_option("--preset", o->preset, "Preset: " + presets);
  cmd->add_option("--shards", o->shards, "Number of safetensors shards")->check(CLI::Range(1, 64));
  cmd->callback([o, &action] {
    action = [o] {
      GeneratedModel m(tiny_preset_config(o->preset), o->seed);
      m.write(o->out, o->shards);
      log_info("wrote preset '{}' (seed {}) to {}", o->preset, o->seed, o->out);
      return 0;
    };
  });
}

}  // namespace dsv4::cli
