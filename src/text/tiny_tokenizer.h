#pragma once
// A small byte-level BPE tokenizer.json for generated models: DeepSeek's special tokens,
// all 256 bytes, and merges of frequent English pairs up to vocab_size.
#include <cstdint>
#include <string>

namespace dsv4 {

std::string tiny_tokenizer_json(int64_t vocab_size, int64_t bos_id, int64_t eos_id);

}  // namespace dsv4
