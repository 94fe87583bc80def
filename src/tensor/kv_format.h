#pragma once
// The production KV row (--kv fp8, docs/MODEL.md §2.14): how one window key or one compressed
// entry of width dim = nope + rope is stored. The single definition of the layout, used by the
// CPU reference (kv_format.cpp), the CUDA kernels (backend/cuda/kv.cu), the forward pass and the
// engine's memory accounting. Plain header (no std::bit_cast, no model types): nvcc includes it.
//
//   bytes [0, nope)                       E4M3 codes of the no-RoPE dims
//   bytes [nope, nope + 2 rope)           the RoPE dims as BF16 (RNE), little-endian
//   next ceil(nope / 64) bytes            UE8M0 scale code of each block of 64 no-RoPE dims
//                                         (the last block is partial when nope % 64 != 0)
//   zero bytes up to a multiple of 8      (the row stride)
//
// No-RoPE dim i decodes to e4m3(code_i) * 2^(scale_code_{i/64} - 127). A block's scale is
// 2^ceil(log2(amax / 448)) with amax = max(1e-4, max |x| of the block) (the official QAT's
// power-of-two scale), the codes are RNE E4M3 of x / scale clamped to +-448. DeepSeek-V4
// (dim 512 = 448 + 64): 448 + 128 + 7 = 583 -> 584 bytes per row (F32: 2048).
#include <cstdint>

namespace dsv4 {

// How a sequence stores its window keys and compressed entries (Lightning Indexer keys and the
// compressors' partial windows are always F32).
enum class KvFormat : uint8_t {
  F32,           // exact (HF-faithful), the default
  FP8,           // packed rows as above, in U8 tensors [rows, kv_row_layout(...).bytes]
  FP8Simulated,  // F32 storage holding the values the FP8 rows decode to (Backend::quantize_kv);
                 // a reference for tests and diagnostics, same logits as FP8
};
const char* kv_format_name(KvFormat f);  // "f32", "fp8", "fp8-simulated"

inline constexpr int64_t kKvScaleBlock = 64;  // no-RoPE dims per scale
inline constexpr int64_t kKvRowAlign = 8;     // the row stride is a multiple of this (bytes)

struct KvRowLayout {
  int64_t dim = 0, nope = 0, rope = 0;
  int64_t rope_offset = 0;   // first byte of the BF16 dims
  int64_t scale_offset = 0;  // first scale byte
  int64_t scales = 0;        // number of scale bytes (blocks)
  int64_t bytes = 0;         // row stride, padding included
};

constexpr KvRowLayout kv_row_layout(int64_t dim, int64_t nope) {
  KvRowLayout L;
  L.dim = dim;
  L.nope = nope;
  L.rope = dim - nope;
  L.rope_offset = nope;
  L.scale_offset = nope + 2 * L.rope;
  L.scales = (nope + kKvScaleBlock - 1) / kKvScaleBlock;
  L.bytes = (L.scale_offset + L.scales + kKvRowAlign - 1) / kKvRowAlign * kKvRowAlign;
  return L;
}
static_assert(kv_row_layout(512, 448).bytes == 584, "DeepSeek-V4 row");
static_assert(kv_row_layout(64, 48).bytes == 88, "tiny preset row: 48 + 32 + 1 -> 88");

// CPU reference codec (kv_format.cpp): the no-RoPE blocks go through the power-of-two dynamic
// FP8 quantiser of tensor/quant.h (fp8_dynamic_quant_block), the RoPE dims through BF16.
// x [dim] -> row [L.bytes] (padding written as zeros).
void pack_kv_row(const float* x, const KvRowLayout& L, uint8_t* row);
// row [L.bytes] -> out [dim].
void unpack_kv_row(const uint8_t* row, const KvRowLayout& L, float* out);

}  // namespace dsv4
