#pragma once
// Paged sequence state and the prefix cache (docs/ENGINE.md).
//
//  * Block pool: every compressed layer owns one pool tensor of entries (and, for CSA, one of
//    indexer keys) holding num_blocks blocks of block_tokens tokens (block_tokens / ratio rows).
//    A sequence's block table maps its logical blocks to pool blocks. Blocks are ref-counted:
//    full blocks are shared by prefix-cache hits and by the samples of an n > 1 request.
//  * Sequence slots: the private, fixed-size part of a running sequence (window rings and
//    compressor partial windows of every layer), one per running sequence.
//  * Snapshots: the private part at a block boundary (window rings and the CSA compressors'
//    previous-window halves; partial windows are empty at a boundary because block_tokens is a
//    multiple of every ratio). A prefix-cache hit at boundary k restores the snapshot of k and
//    shares blocks 0..k-1: the state is then bit-identical to having computed the prefix.
//  * Prefix cache: nodes keyed by the chained XXH3 hash of each full block's token ids (checked
//    against the stored ids), each holding its pool block and optionally a snapshot. Nodes whose
//    block no sequence references are evictable, least recently used first (a released chain
//    is touched tail first, so its deepest blocks go first).
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "model/forward.h"

namespace dsv4 {

struct StateLayout {
  KvFormat kv = KvFormat::F32;
  int64_t block_tokens = 0;
  int64_t block_bytes = 0;     // compressed entries + indexer keys of one block, all layers
  int64_t tail_bytes = 0;      // private state of one running sequence
  int64_t snapshot_bytes = 0;  // one boundary snapshot
  int64_t kv_row_bytes = 0;    // one window key / compressed entry in format kv (model/memory.h)
  double bytes_per_token() const { return double(block_bytes) / double(block_tokens); }
};
// Exact bytes of what StateManager allocates: the main layers, and with mtp (speculative
// decoding) the MTP layers and the slot's MTP input stream row.
StateLayout state_layout(const ModelConfig& cfg, int64_t block_tokens, KvFormat kv = KvFormat::F32, bool mtp = false);

struct StatePlan {
  int64_t num_blocks = 0, num_slots = 0, num_snapshots = 0;
};
// Splits a memory budget: slots first, then a share for snapshots, the rest in blocks.
// Throws an Error naming --kv-memory when the budget cannot hold the slots and one block.
StatePlan plan_state(const StateLayout& layout, int64_t budget_bytes, int64_t num_slots, double snapshot_fraction);

class StateManager {
 public:
  // Window rings, entry pools and snapshots are stored in format kv (indexer keys and
  // compressor states in F32). mtp: the store also holds the MTP layers' state (speculative
  // decoding), and snapshots and forks carry it.
  StateManager(Model& model, int64_t block_tokens, int64_t num_blocks, int64_t num_slots, int64_t num_snapshots,
               KvFormat kv = KvFormat::F32, bool mtp = false);

  const StateLayout& layout() const { return layout_; }
  int64_t block_tokens() const { return layout_.block_tokens; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_slots() const { return store_->num_slots; }
  int64_t free_blocks() const { return int64_t(free_blocks_.size()); }
  int64_t evictable_blocks() const;    // cached and unreferenced
  int64_t available_blocks() const { return free_blocks() + evictable_blocks(); }
  int64_t free_slots() const { return int64_t(free_slots_.size()); }
  int64_t cached_nodes() const { return int64_t(by_hash_.size()); }

  // A running sequence: a slot's private state plus the shared pools and its block table.
  struct Seq {
    int slot = -1;
    SequenceState st;
    std::vector<uint64_t> hashes;  // chained hash of each full block computed or hit
    std::vector<int32_t> nodes;    // prefix-cache node of each full block (-1: none)
  };
  // Takes a free slot (call only when free_slots() > 0) and resets it to an empty sequence.
  Seq acquire();
  // Returns every block and the slot.
  void release(Seq& s);
  // Makes s hold blocks for `tokens` positions, evicting cached blocks when needed; false
  // (nothing changed) when the pool cannot provide them.
  bool reserve(Seq& s, int64_t tokens);
  // Blocks still needed to hold `tokens` positions.
  int64_t blocks_needed(const Seq& s, int64_t tokens) const;

  // Prefix cache. lookup() returns how many leading full blocks of `tokens` (at most
  // max_blocks) can be restored; attach() makes the fresh sequence s hold them.
  int64_t lookup(std::span<const int32_t> tokens, int64_t max_blocks) const;
  void attach(Seq& s, std::span<const int32_t> tokens, int64_t blocks);
  // Called after s has computed its first `s.st.num_tokens` positions (tokens = all of its ids):
  // registers every newly completed block, with a snapshot when s sits exactly on its boundary.
  void register_blocks(Seq& s, std::span<const int32_t> tokens);
  void set_caching(bool on) { caching_ = on; }

  // A copy of parent's state in a new slot (call only when free_slots() > 0): full blocks are
  // shared, a partial last block is copied. False when no block is available for the copy.
  bool fork(const Seq& parent, Seq& child);

  // Drops every unreferenced cached block (tests; "pool back to full").
  void clear_cache();

 private:
  struct Snapshot {
    std::vector<std::vector<Tensor>> parts;  // per rank (ranks()): copies of snapshot_parts()
  };
  struct Node {
    uint64_t hash = 0;
    int32_t parent = -1, block = -1, snapshot = -1;
    uint64_t tick = 0;
    std::vector<int32_t> tokens;
    std::vector<int32_t> children;
    bool live = false;
  };

  int32_t take_block();  // -1 when none even after eviction
  void unref(int32_t block);
  void evict_node(int32_t node);
  int32_t take_snapshot_slot();
  // (Every state copy is made on each rank of the model's group: Model::on_every_rank.)
  std::vector<Tensor> snapshot_parts(const StateStore& store, int32_t slot) const;
  void save_snapshot(const SequenceState& st, Snapshot& snap);
  void load_snapshot(const Snapshot& snap, SequenceState& st);
  uint64_t chain_hash(uint64_t parent, std::span<const int32_t> block) const;

  Model& model_;
  StateLayout layout_;
  int64_t num_blocks_;
  bool caching_ = true;
  std::shared_ptr<StateStore> store_;  // main layers of every slot and block
  std::vector<int> free_slots_;
  std::vector<int32_t> free_blocks_;
  std::vector<int32_t> refs_, block_node_;
  std::vector<Snapshot> snapshots_;
  std::vector<int32_t> snapshot_node_, free_snapshots_;
  std::vector<Node> nodes_;
  std::vector<int32_t> free_nodes_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  uint64_t tick_ = 0;
};

}  // namespace dsv4
