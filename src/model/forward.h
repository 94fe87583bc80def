#pragma once
// The DeepSeek-V4 forward pass, written once against the Backend interface
// (docs/MODEL.md Phase 2): embed -> mHC expand -> blocks -> hc_head -> norm -> head, and the MTP block.
#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"
#include "tensor/kv_format.h"

namespace dsv4 {

// Everything one layer keeps between steps. The compressed state is paged: a sequence's
// compressed entries and indexer keys live in pool tensors of fixed-size blocks (block_tokens
// tokens each, so block b holds rows [b * block_tokens / ratio, (b+1) * block_tokens / ratio)),
// addressed through the sequence's block table. Pools may be shared between sequences (the
// engine's prefix cache shares full blocks); a sequence only ever writes rows of its own blocks.
// The window ring and the compressor partial windows are private to the sequence.
// Window keys and compressed entries are stored in the sequence's KvFormat: F32 rows [.., head_dim],
// or with KvFormat::FP8 packed U8 rows [.., kv_row_layout(head_dim, nope).bytes] (tensor/kv_format.h).
struct LayerState {
  Tensor window;           // [W, row]: keys of the last W positions, slot = pos % W
  Tensor entries;          // [blocks * block_tokens / ratio, row]: compressed entries (normed, RoPE'd)
  Tensor index_keys;       // [blocks * block_tokens / ratio, index_head_dim]: Lightning Indexer keys (CSA)
  int64_t num_entries = 0;
  CompressorState compressor, index_compressor;
};

struct SequenceState {
  KvFormat kv = KvFormat::F32;  // storage of window keys and compressed entries (fixed at allocation)
  int64_t num_tokens = 0;       // main model positions processed
  int64_t mtp_tokens = 0;       // MTP positions processed
  int64_t capacity = 0;         // max positions (at most blocks.size() * block_tokens)
  int64_t block_tokens = 0;     // tokens per block: a multiple of every compress ratio
  std::vector<int32_t> blocks;  // block table: logical block i lives in pool block blocks[i]
  std::vector<LayerState> layers, mtp_layers;
};

class Model {
 public:
  Model(const ModelConfig& cfg, const ModelWeights& w, Backend& backend);

  // A self-contained sequence: private pools of one block covering capacity_tokens, in the
  // model's KV format (set_kv_format).
  SequenceState new_sequence(int64_t capacity_tokens) const;
  // The private part of a sequence (window rings, compressor states) with empty pools, for an
  // engine that attaches shared pools (alloc_kv_store) and a block table (docs/ENGINE.md).
  SequenceState new_sequence_tail(bool mtp, KvFormat kv = KvFormat::F32) const;
  // A store of `rows` window keys / compressed entries in format kv (F32 or packed U8 rows).
  Tensor alloc_kv_store(int64_t rows, KvFormat kv) const;
  // Tokens per block must be a multiple of this (the lcm of every compress ratio).
  int64_t block_granularity() const;

  // Feeds tokens at positions state.num_tokens... and returns logits [T, vocab]. When streams is
  // given it receives the final residual streams [T, hc_mult, hidden] (the MTP block's input).
  Tensor forward(SequenceState& state, std::span<const int32_t> tokens, Tensor* streams = nullptr);

  // MTP draft logits [n, vocab] for positions state.mtp_tokens...: row i combines the main
  // streams of that position with the token that follows it (next_tokens[i]).
  Tensor forward_mtp(SequenceState& state, const Tensor& streams, std::span<const int32_t> next_tokens);

  // The KV format of sequences made by new_sequence (--kv). forward() follows the format each
  // sequence was allocated with (SequenceState::kv), so a model serves sequences of any format.
  void set_kv_format(KvFormat f) { kv_format_ = f; }
  void set_kv_fp8(bool on) { kv_format_ = on ? KvFormat::FP8 : KvFormat::F32; }
  KvFormat kv_format() const { return kv_format_; }
  // Official FP8 activation quantisation in FP8/FP4 linears (Backend::set_act_quant), with the
  // checkpoint's scale format.
  void set_fp8_activations(bool on) {
    be_.set_act_quant(!on ? ActQuant::None : cfg_.act_scale_pow2 ? ActQuant::Fp8Pow2 : ActQuant::Fp8);
  }
  const ModelConfig& config() const { return cfg_; }
  Backend& backend() const { return be_; }

 private:
  struct Paging {
    const std::vector<int32_t>& blocks;
    int64_t block_tokens;
  };
  Tensor block(const BlockWeights& b, LayerState& st, const Paging& pg, KvFormat kvf, const Tensor& X,
               const Tensor& tokens, const Tensor& pos, int64_t start);
  Tensor attention(const AttentionWeights& a, LayerState& st, const Paging& pg, KvFormat kvf, const Tensor& x,
                   const Tensor& pos, int64_t start);
  Tensor compress(const CompressorWeights& c, CompressorState& cs, const Tensor& x, int64_t start, int64_t first_entry);
  // Rows [0, n) / [first, first + rows) of a paged store of the given compress ratio. F32 stores:
  // read_paged returns a view (contiguous blocks) or a gather. Packed stores: read_paged_into
  // decodes into out [n, head_dim]; write_paged packs F32 rows into them.
  Tensor read_paged(const Tensor& store, const Paging& pg, int64_t ratio, int64_t n);
  void read_paged_into(const Tensor& store, const Paging& pg, int64_t ratio, int64_t n, const Tensor& out);
  void write_paged(const Tensor& rows, const Tensor& store, const Paging& pg, int64_t ratio, int64_t first);
  // Pool row of each of the rows [0, n); empty when they are contiguous (base: the first).
  std::vector<int32_t> paged_rows(const Paging& pg, int64_t ratio, int64_t n, int64_t& base) const;
  LayerState new_layer_state(int64_t layer, int64_t pool_rows_per_ratio, bool pools, KvFormat kv) const;
  Tensor logits(const Tensor& X, const HyperConn& hc, const TensorData& norm);
  Tensor int_tensor(const std::vector<int32_t>& v, std::vector<int64_t> shape);

  const ModelConfig& cfg_;
  const ModelWeights& w_;
  Backend& be_;
  RopeTable rope_main_, rope_compressed_;
  KvFormat kv_format_ = KvFormat::F32;
};

}  // namespace dsv4

namespace dsv4 {

// Feeds `tokens` in chunks of the given sizes (empty: one chunk) and returns row-major logits:
// main model [T, vocab], or with mtp the MTP block's [T-1, vocab] (row t: streams of position t
// with token t+1). Chunk sizes must be positive and sum to T.
std::vector<float> run_chunked(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> chunks,
                               bool mtp);

}  // namespace dsv4
