#pragma once
// The DeepSeek-V4 forward pass, written once against the Backend interface
// (docs/MODEL.md Phase 2): embed -> mHC expand -> blocks -> hc_head -> norm -> head, and the MTP block.
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/communicator.h"
#include "model/config.h"
#include "model/parallel.h"
#include "model/weights.h"
#include "tensor/kv_format.h"

namespace dsv4 {

// The state of a set of sequences, held in per-layer tensors shared by all of them (docs/ENGINE.md).
// The private part of a sequence (window ring, compressor partial windows and CSA previous-window
// halves) lives in a sequence *slot*: slot s owns rows [s * n, (s + 1) * n) of each slot-indexed
// tensor (n = W for the ring, whose row for position p is s * W + p % W; n = ratio for the
// compressors). The compressed part is paged: entries and indexer keys live in pools of
// fixed-size blocks (block_tokens tokens each, so block b holds rows [b * block_tokens / ratio,
// (b + 1) * block_tokens / ratio)), addressed through each sequence's block table. Blocks may be
// shared between sequences (the engine's prefix cache shares full blocks); a sequence only ever
// writes rows of its own blocks and slot. Window keys and compressed entries are stored in the
// store's KvFormat: F32 rows [.., head_dim], or with KvFormat::FP8 packed U8 rows
// [.., kv_row_layout(head_dim, nope).bytes] (tensor/kv_format.h). Whether a CSA compressor's
// previous window exists and how many entries a layer has follow from the position alone.
struct LayerStore {
  Tensor window;                                // [slots * W, row]
  Tensor entries;                               // [blocks * block_tokens / ratio, row] (compressed layers)
  Tensor index_keys;                            // [blocks * block_tokens / ratio, index_head_dim] (CSA)
  CompressorSlots compressor, index_compressor;  // [slots * ratio, ..] (compressed layers; index: CSA)
};

struct StateStore {
  KvFormat kv = KvFormat::F32;
  int64_t block_tokens = 0;  // a multiple of every compress ratio
  int64_t num_slots = 0, num_blocks = 0;
  std::vector<LayerStore> layers, mtp_layers;
  // With MTP layers: [slots, hc_mult * hidden] F32, slot s's main-model final streams of position
  // mtp_tokens, the next row the MTP block reads (its token, the one after, may not be known yet).
  Tensor mtp_stream;
  // A group leader's store (Model::set_peers): the same store on ranks 1.. (each rank's backend
  // holds a full copy of the state: V4's single key/value head is replicated, model/parallel.h).
  std::vector<std::shared_ptr<StateStore>> peers;
};

// Rows of `slot` in a slot-indexed tensor of `slots` slots (a view).
inline Tensor slot_rows(const Tensor& t, int64_t slots, int64_t slot) {
  const int64_t n = t.rows() / slots;
  return t.rows_view(slot * n, (slot + 1) * n);
}

struct SequenceState {
  std::shared_ptr<StateStore> store;
  int32_t slot = 0;
  int64_t num_tokens = 0;       // main model positions processed
  int64_t mtp_tokens = 0;       // MTP positions processed
  int64_t capacity = 0;         // max positions (at most blocks.size() * block_tokens)
  std::vector<int32_t> blocks;  // block table: logical block i lives in pool block blocks[i]
  KvFormat kv() const { return store->kv; }
  int64_t block_tokens() const { return store->block_tokens; }
};

// One sequence's part of a batched forward pass: `tokens` are fed at positions
// state->num_tokens... Logits are computed for its last `logit_rows` rows only (1 for a decode
// or the end of a prompt, 0 for a prefill chunk that does not reach it) and the final residual
// streams kept for its last `stream_rows` rows (the MTP block's input).
// The last `draft_rows` tokens are unverified drafts (speculative decoding): they are computed
// like the others, but what they write to the sequence's private state is held back or saved
// (DraftCommit) until Model::accept_drafts keeps a prefix of them. In an MTP pass draft rows
// write no state at all and mtp_tokens advances by the other rows only.
struct ForwardSeq {
  SequenceState* state = nullptr;
  std::span<const int32_t> tokens;
  int64_t logit_rows = 1;
  int64_t stream_rows = 0;
  int64_t draft_rows = 0;
};

// What a main-model pass with draft rows did not commit yet (docs/ENGINE.md, "Speculative
// decoding"): the window keys of the draft rows (kept out of the rings) and copies of the
// compressor rows the draft positions overwrote (partial-window rows; the CSA previous-window
// halves when a draft completes a window). Entries and indexer keys a draft writes need no undo:
// they lie beyond every later query's visible range until their window is recomputed.
struct DraftCommit {
  struct Seq {
    SequenceState* state;
    int64_t first_pos, drafts;  // position of the first draft row; number of draft rows
  };
  struct Saved {
    Tensor store;            // the slot-indexed compressor tensor
    Tensor values;           // [n, cols]: its rows before the pass
    std::vector<int32_t> rows;         // store row of each saved row
    std::vector<int32_t> seq, draft;   // restored when draft index `draft` of sequence `seq` is rejected
  };
  std::vector<Seq> seqs;          // sequences with drafts, in batch order
  std::vector<Tensor> keys;       // per main layer: [all draft rows, row width] F32 window keys
  std::vector<Saved> saved;
  // A tensor/expert-parallel group's pass: rank r's own commit (its store's rows) at r - 1, its
  // seqs naming rank 0's states (only their slots are read there).
  std::vector<DraftCommit> peers;
  bool empty() const { return seqs.empty(); }
};

struct ForwardOutput {
  Tensor logits;   // [sum of logit_rows, vocab], in sequence order
  Tensor streams;  // [sum of stream_rows, hc_mult, hidden], in sequence order (empty when none)
  DraftCommit drafts;  // main passes with draft rows: pass to Model::accept_drafts
};

// A Model's place in a tensor/expert-parallel group (model/parallel.h): its weights are the
// rank's WeightShard and `comm` (of size parallel.world()) adds the ranks' partial outputs. The
// default is the unsharded model, which runs no collective.
struct ModelRank {
  ParallelConfig parallel;
  Communicator* comm = nullptr;
};

class Model {
 public:
  Model(const ModelConfig& cfg, const ModelWeights& w, Backend& backend, ModelRank rank = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // A store for `slots` sequences and `blocks` blocks of block_tokens tokens, in format kv, with
  // the MTP layers' state when mtp is set.
  std::shared_ptr<StateStore> new_store(int64_t slots, int64_t blocks, int64_t block_tokens, bool mtp,
                                        KvFormat kv) const;
  // A self-contained sequence: a store of one slot and one block covering capacity_tokens, in the
  // model's KV format (set_kv_format), with MTP state.
  SequenceState new_sequence(int64_t capacity_tokens) const;
  // A store of `rows` window keys / compressed entries in format kv (F32 or packed U8 rows).
  Tensor alloc_kv_store(int64_t rows, KvFormat kv) const;
  // Tokens per block must be a multiple of this (the lcm of every compress ratio).
  int64_t block_granularity() const;

  // One batched forward pass over the sequences of `batch` (distinct sequences of one store;
  // decodes and prefill chunks mixed): one flattened batch of tokens through every layer.
  // Advances each state's num_tokens by its token count.
  ForwardOutput forward(std::span<const ForwardSeq> batch);
  // A batch of one: logits [T, vocab] of every row; streams (when given) receives the final
  // residual streams [T, hc_mult, hidden].
  Tensor forward(SequenceState& state, std::span<const int32_t> tokens, Tensor* streams = nullptr);
  // After a pass with draft rows: sequence i of `drafts` keeps its first accepted[i] draft rows
  // (their window keys enter the rings) and every trace of the others is undone (saved
  // compressor rows restored, num_tokens set back). The state is then what a pass over the
  // kept rows alone would have left.
  void accept_drafts(const DraftCommit& drafts, std::span<const int64_t> accepted);

  // MTP draft logits [n, vocab] for positions state.mtp_tokens...: row i combines the main
  // streams of that position with the token that follows it (next_tokens[i]).
  Tensor forward_mtp(SequenceState& state, const Tensor& streams, std::span<const int32_t> next_tokens);
  // The MTP block over a batch: `streams` [T, hc_mult, hidden] holds, in batch row order, the
  // streams each row combines with its token (the main model's for a real position, the MTP
  // block's own output for a chained draft). Sequences start at their mtp_tokens; logits and
  // output streams (the block's, before hc_head) of the rows ForwardSeq asks for.
  ForwardOutput forward_mtp(std::span<const ForwardSeq> batch, const Tensor& streams);

  // The KV format of sequences made by new_sequence (--kv). forward() follows the format each
  // sequence was allocated with (SequenceState::kv), so a model serves sequences of any format.
  void set_kv_format(KvFormat f) { kv_format_ = f; }
  void set_kv_fp8(bool on) { kv_format_ = on ? KvFormat::FP8 : KvFormat::F32; }
  KvFormat kv_format() const { return kv_format_; }
  // Official FP8 activation quantisation in FP8/FP4 linears (Backend::set_act_quant), with the
  // checkpoint's scale format.
  void set_fp8_activations(bool on) {
    be_.set_act_quant(!on ? ActQuant::None : cfg_.act_scale_pow2 ? ActQuant::Fp8Pow2 : ActQuant::Fp8);
    for (Model* p : peers_) p->set_fp8_activations(on);
  }
  // Decode steps with fixed shapes, replayed as CUDA graphs (docs/ENGINE.md, "Decode steps with
  // fixed shapes"): a main-model batch of one-token rows that all want their logits and no drafts
  // runs a plan padded to a bucket (rows and block-table width rounded up to powers of two, every
  // list as wide as the bucket allows) through Backend::run_graph. The logits are bit-identical
  // to the unpadded plan's on the CPU. Off: every batch takes the unpadded plan.
  void set_decode_graphs(bool on) { decode_graphs_ = on; }
  bool decode_graphs() const { return decode_graphs_; }
  int64_t fixed_decode_steps() const { return fixed_decode_steps_; }  // steps run in a bucket's fixed shape
  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }  // this rank's (its shard in a group)
  Backend& backend() const { return be_; }
  const ModelRank& rank() const { return rank_; }

  // Makes this model (rank 0 of an in-process group) the leader of `peers` (ranks 1.., same
  // config, own backends): its stores get a copy on every peer (StateStore::peers) and forward()
  // runs every rank in lock step on `threads`, returning rank 0's output. Speculative decoding
  // (draft rows, the MTP block) is not supported in a group yet.
  void set_peers(std::vector<Model*> peers, RankThreads* threads);
  const std::vector<Model*>& peers() const { return peers_; }
  // fn(r, model of rank r) for every rank of the group, each on its own thread (a device backend
  // takes calls only from its rank's thread); without peers fn(0, *this) here.
  void on_every_rank(const std::function<void(int, Model&)>& fn);
  // Rank r's copy of a store of the group leader (r = 0: the store itself).
  static StateStore& rank_store(StateStore& s, int r) { return r ? *s.peers.at(size_t(r - 1)) : s; }

 private:
  struct Plan;
  // The bucket of a fixed-shape decode step: batch rows (sequences, then inactive padding rows)
  // and block-table columns.
  struct DecodeShape {
    int64_t rows = 0, blocks = 0;
    bool operator==(const DecodeShape&) const = default;
  };
  // One bucket's persistent step of one state store: the plan's device buffer (rewritten each
  // step, same address) and the outputs of the recorded step; `key` names its graph in the backend.
  struct DecodeStep {
    std::weak_ptr<StateStore> store;
    DecodeShape shape;
    ActQuant act = ActQuant::None;
    uint64_t key = 0;
    Tensor plan, X, logits;
  };
  Plan plan(std::span<const ForwardSeq> batch, bool mtp, const DecodeShape* fixed = nullptr, Tensor* into = nullptr);
  bool is_fixed_shape_decode(std::span<const ForwardSeq> batch) const;
  ForwardOutput forward_decode(std::span<const ForwardSeq> batch);
  DecodeStep& decode_step(const SequenceState& st, const DecodeShape& shape);
  Tensor main_layers(const Plan& p);
  ForwardOutput forward_rank(std::span<const ForwardSeq> batch);
  ForwardOutput forward_mtp_rank(std::span<const ForwardSeq> batch, const Tensor& streams);
  // Runs fn on every rank of the group on its own thread with rank r's copy of the batch: the
  // states of rank 0 with the rank's store (rank 0 gets the batch itself).
  void run_on_ranks(std::span<const ForwardSeq> batch, const std::function<void(int, Model&, std::span<const ForwardSeq>)>& fn);
  // accept_drafts on one rank: `store` is the rank's; advance: set the states' num_tokens back
  // (rank 0 only: the peers' states are copies of rank 0's).
  void accept_rank(const DraftCommit& dc, std::span<const int64_t> accepted, StateStore& store, bool advance);
  Tensor block(const BlockWeights& b, LayerStore& ls, const Plan& p, const Tensor& X);
  DraftCommit save_draft_state(std::span<const ForwardSeq> batch);
  Tensor attention(const AttentionWeights& a, LayerStore& ls, const Plan& p, const Tensor& x);
  Tensor compress(const CompressorWeights& c, const CompressorSlots& cs, const Tensor& x, const Plan& p);
  LayerStore new_layer_store(int64_t layer, int64_t slots, int64_t blocks, int64_t block_tokens, KvFormat kv) const;
  Tensor logits(const Tensor& X, const HyperConn& hc, const TensorData& norm);

  const ModelConfig& cfg_;
  const ModelWeights& w_;
  Backend& be_;
  ModelRank rank_;
  std::vector<Model*> peers_;
  RankThreads* threads_ = nullptr;
  RopeTable rope_main_, rope_compressed_;
  KvFormat kv_format_ = KvFormat::F32;
  bool decode_graphs_ = true;
  int64_t fixed_decode_steps_ = 0;
  std::vector<DecodeStep> decode_steps_;
};

}  // namespace dsv4

namespace dsv4 {

// Feeds `tokens` in chunks of the given sizes (empty: one chunk) and returns row-major logits:
// main model [T, vocab], or with mtp the MTP block's [T-1, vocab] (row t: streams of position t
// with token t+1). Chunk sizes must be positive and sum to T.
std::vector<float> run_chunked(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> chunks,
                               bool mtp);

}  // namespace dsv4
