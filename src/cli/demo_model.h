#pragma once
// Where the committed demo checkpoint (models/demo-brown, docs/DEMO_MODEL.md) is found when no
// --model is given: $DSV4_DEMO_MODEL, then models/demo-brown next to the binary's parent
// directory (build/dsv4 -> models/demo-brown), then in the source tree the binary was built
// from. Empty when none holds a config.json.
#include <string>

namespace dsv4::cli {

std::string default_demo_model_dir();

}  // namespace dsv4::cli
