#include "engine/state_manager.h"

#include <algorithm>
#include <limits>

#include <xxhash.h>

#include "model/memory.h"
#include "util/error.h"

namespace dsv4 {

StateLayout state_layout(const ModelConfig& c, int64_t B, KvFormat kv, bool mtp) {
  StateLayout L;
  L.kv = kv;
  L.block_tokens = B;
  L.kv_row_bytes = kv_row_bytes(c, kv);
  const int64_t eb = 4;  // indexer keys, compressor states and streams are F32
  const bool with_mtp = mtp && c.num_nextn_predict_layers > 0;
  if (with_mtp) {
    L.tail_bytes += c.hc_mult * c.hidden_size * eb;  // the MTP block's next input stream
    L.snapshot_bytes += c.hc_mult * c.hidden_size * eb;
  }
  for (int64_t l = 0; l < (with_mtp ? c.total_layers() : c.num_hidden_layers); ++l) {
    const int64_t window = c.sliding_window * L.kv_row_bytes;
    L.tail_bytes += window;
    L.snapshot_bytes += window;
    const int64_t r = c.compress_ratio(l);
    if (!r) continue;
    if (B % r) fail("--block-size: {} is not a multiple of compress ratio {} (layer {})", B, r, l);
    const bool csa = c.attn_kind(l) == AttnKind::CSA;
    const int64_t coff = csa ? 2 : 1;
    L.block_bytes += (B / r) * L.kv_row_bytes;
    L.tail_bytes += 2 * r * coff * c.head_dim * eb;  // partial kv + gate
    if (csa) {
      L.tail_bytes += 2 * r * c.head_dim * eb;        // previous-window halves
      L.snapshot_bytes += 2 * r * c.head_dim * eb;
      L.block_bytes += (B / r) * c.index_head_dim * eb;
      L.tail_bytes += 2 * r * 2 * c.index_head_dim * eb + 2 * r * c.index_head_dim * eb;
      L.snapshot_bytes += 2 * r * c.index_head_dim * eb;
    }
  }
  return L;
}

StatePlan plan_state(const StateLayout& L, int64_t budget, int64_t num_slots, double snapshot_fraction) {
  StatePlan p;
  p.num_slots = num_slots;
  const int64_t rest = budget - num_slots * L.tail_bytes;
  if (rest < L.block_bytes)
    fail("--kv-memory: {} bytes cannot hold {} running sequences ({} bytes each) and one block ({} bytes)", budget,
         num_slots, L.tail_bytes, L.block_bytes);
  p.num_snapshots = L.snapshot_bytes ? int64_t(double(rest) * snapshot_fraction) / L.snapshot_bytes : 0;
  p.num_blocks = L.block_bytes ? (rest - p.num_snapshots * L.snapshot_bytes) / L.block_bytes : 1 << 30;
  return p;
}

StateManager::StateManager(Model& model, int64_t B, int64_t num_blocks, int64_t num_slots, int64_t num_snapshots,
                           KvFormat kv, bool mtp)
    : model_(model), layout_(state_layout(model.config(), B, kv, mtp)), num_blocks_(num_blocks) {
  if (num_blocks <= 0 || num_blocks > std::numeric_limits<int32_t>::max()) fail("state pool: {} blocks", num_blocks);
  if (num_slots <= 0) fail("--max-running-requests must be positive, got {}", num_slots);
  store_ = model.new_store(num_slots, num_blocks, B, mtp, kv);
  for (int i = int(num_slots) - 1; i >= 0; --i) free_slots_.push_back(i);
  refs_.assign(size_t(num_blocks), 0);
  block_node_.assign(size_t(num_blocks), -1);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_blocks_.push_back(int32_t(b));
  for (int64_t i = 0; i < num_snapshots; ++i) {
    Snapshot snap;
    snap.parts.resize(store_->peers.size() + 1);
    model_.on_every_rank([&](int r, Model& m) {
      Backend& be = m.backend();
      StateStore& st = Model::rank_store(*store_, r);
      for (const Tensor& part : snapshot_parts(st, 0)) snap.parts[size_t(r)].push_back(be.alloc(part.shape, part.type));
    });
    snapshots_.push_back(std::move(snap));
  }
  snapshot_node_.assign(size_t(num_snapshots), -1);
  for (int64_t i = num_snapshots - 1; i >= 0; --i) free_snapshots_.push_back(int32_t(i));
}

int64_t StateManager::evictable_blocks() const {
  int64_t n = 0;
  for (const Node& nd : nodes_)
    if (nd.live && refs_[size_t(nd.block)] == 0 && block_node_[size_t(nd.block)] >= 0) ++n;
  return n;
}

StateManager::Seq StateManager::acquire() {
  DSV4_CHECK(!free_slots_.empty());
  Seq s;
  s.slot = free_slots_.back();
  free_slots_.pop_back();
  s.st.store = store_;
  s.st.slot = s.slot;
  return s;
}

void StateManager::release(Seq& s) {
  if (s.slot < 0) return;
  // Touch cached blocks tail first so that the deepest ones are evicted first.
  for (size_t i = s.st.blocks.size(); i-- > 0;) {
    const int32_t b = s.st.blocks[i];
    if (block_node_[size_t(b)] >= 0) nodes_[size_t(block_node_[size_t(b)])].tick = ++tick_;
    unref(b);
  }
  s.st.blocks.clear();
  s.hashes.clear();
  s.nodes.clear();
  free_slots_.push_back(s.slot);
  s.slot = -1;
}

void StateManager::unref(int32_t b) {
  DSV4_CHECK(refs_[size_t(b)] > 0);
  if (--refs_[size_t(b)] == 0 && block_node_[size_t(b)] < 0) free_blocks_.push_back(b);
}

int32_t StateManager::take_block() {
  if (free_blocks_.empty()) {
    int32_t victim = -1;
    for (size_t i = 0; i < nodes_.size(); ++i) {
      const Node& nd = nodes_[i];
      if (!nd.live || refs_[size_t(nd.block)] != 0 || block_node_[size_t(nd.block)] != int32_t(i)) continue;
      if (victim < 0 || nd.tick < nodes_[size_t(victim)].tick) victim = int32_t(i);
    }
    if (victim < 0) return -1;
    evict_node(victim);
    if (free_blocks_.empty()) return -1;
  }
  const int32_t b = free_blocks_.back();
  free_blocks_.pop_back();
  DSV4_CHECK(refs_[size_t(b)] == 0 && block_node_[size_t(b)] < 0);
  refs_[size_t(b)] = 1;
  return b;
}

void StateManager::evict_node(int32_t id) {
  Node& nd = nodes_[size_t(id)];
  DSV4_CHECK(nd.live);
  // Descendants can no longer be reached.
  const std::vector<int32_t> children = std::move(nd.children);
  for (int32_t c : children) evict_node(c);
  Node& n = nodes_[size_t(id)];
  if (n.parent >= 0) {
    auto& sib = nodes_[size_t(n.parent)].children;
    sib.erase(std::remove(sib.begin(), sib.end(), id), sib.end());
  }
  by_hash_.erase(n.hash);
  if (block_node_[size_t(n.block)] == id) {
    block_node_[size_t(n.block)] = -1;
    if (refs_[size_t(n.block)] == 0) free_blocks_.push_back(n.block);
  }
  if (n.snapshot >= 0) {
    snapshot_node_[size_t(n.snapshot)] = -1;
    free_snapshots_.push_back(n.snapshot);
  }
  n = Node{};
  free_nodes_.push_back(id);
}

int64_t StateManager::blocks_needed(const Seq& s, int64_t tokens) const {
  const int64_t B = layout_.block_tokens, want = (tokens + B - 1) / B;
  return std::max<int64_t>(0, want - int64_t(s.st.blocks.size()));
}

bool StateManager::reserve(Seq& s, int64_t tokens) {
  const int64_t need = blocks_needed(s, tokens);
  if (need == 0) return true;  // most calls (decodes within a block): skip the evictable scan below
  if (need > available_blocks()) return false;
  for (int64_t i = 0; i < need; ++i) {
    const int32_t b = take_block();
    DSV4_CHECK(b >= 0);
    s.st.blocks.push_back(b);
  }
  s.st.capacity = int64_t(s.st.blocks.size()) * layout_.block_tokens;
  return true;
}

uint64_t StateManager::chain_hash(uint64_t parent, std::span<const int32_t> block) const {
  return XXH3_64bits_withSeed(block.data(), block.size_bytes(), parent ^ 0x5eed0f0dd5ee4bull);
}

int64_t StateManager::lookup(std::span<const int32_t> tokens, int64_t max_blocks) const {
  if (!caching_) return 0;
  const int64_t B = layout_.block_tokens;
  uint64_t h = 0;
  int32_t parent = -1;
  int64_t best = 0;
  for (int64_t k = 0; k < max_blocks && (k + 1) * B <= int64_t(tokens.size()); ++k) {
    auto blk = tokens.subspan(size_t(k * B), size_t(B));
    h = chain_hash(h, blk);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    const Node& nd = nodes_[size_t(it->second)];
    if (nd.parent != parent || !std::equal(blk.begin(), blk.end(), nd.tokens.begin())) break;
    if (block_node_[size_t(nd.block)] != it->second) break;  // detached block
    parent = it->second;
    if (nd.snapshot >= 0) best = k + 1;
  }
  return best;
}

void StateManager::attach(Seq& s, std::span<const int32_t> tokens, int64_t blocks) {
  DSV4_CHECK(s.st.blocks.empty() && s.st.num_tokens == 0);
  if (blocks == 0) return;
  const int64_t B = layout_.block_tokens;
  uint64_t h = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    h = chain_hash(h, tokens.subspan(size_t(k * B), size_t(B)));
    const int32_t id = by_hash_.at(h);
    const int32_t b = nodes_[size_t(id)].block;
    ++refs_[size_t(b)];
    s.st.blocks.push_back(b);
    s.hashes.push_back(h);
    s.nodes.push_back(id);
  }
  for (int64_t k = blocks; k-- > 0;) nodes_[size_t(s.nodes[size_t(k)])].tick = ++tick_;
  const Node& last = nodes_[size_t(s.nodes.back())];
  DSV4_CHECK(last.snapshot >= 0);
  load_snapshot(snapshots_[size_t(last.snapshot)], s.st);
  s.st.num_tokens = blocks * B;
  if (!store_->mtp_layers.empty()) s.st.mtp_tokens = blocks * B - 1;  // the snapshot holds stream kB - 1
  s.st.capacity = blocks * B;
}

int32_t StateManager::take_snapshot_slot() {
  if (snapshots_.empty()) return -1;
  if (free_snapshots_.empty()) {
    int32_t victim = -1;
    for (size_t i = 0; i < snapshot_node_.size(); ++i) {
      const int32_t n = snapshot_node_[i];
      if (n >= 0 && (victim < 0 || nodes_[size_t(n)].tick < nodes_[size_t(snapshot_node_[size_t(victim)])].tick))
        victim = int32_t(i);
    }
    if (victim < 0) return -1;
    nodes_[size_t(snapshot_node_[size_t(victim)])].snapshot = -1;
    snapshot_node_[size_t(victim)] = -1;
    return victim;
  }
  const int32_t s = free_snapshots_.back();
  free_snapshots_.pop_back();
  return s;
}

void StateManager::register_blocks(Seq& s, std::span<const int32_t> tokens) {
  if (!caching_) return;
  const int64_t B = layout_.block_tokens, full = s.st.num_tokens / B;
  while (int64_t(s.hashes.size()) < full) {
    const int64_t k = int64_t(s.hashes.size());
    auto blk = tokens.subspan(size_t(k * B), size_t(B));
    const uint64_t h = chain_hash(k ? s.hashes.back() : 0, blk);
    const int32_t parent = k ? s.nodes.back() : -1;
    s.hashes.push_back(h);
    int32_t id = -1;
    if (k == 0 || (parent >= 0 && nodes_[size_t(parent)].live && nodes_[size_t(parent)].hash == s.hashes[size_t(k - 1)])) {
      auto it = by_hash_.find(h);
      if (it != by_hash_.end()) {
        const Node& nd = nodes_[size_t(it->second)];
        if (nd.parent == parent && std::equal(blk.begin(), blk.end(), nd.tokens.begin())) id = it->second;
      } else {
        const int32_t b = s.st.blocks[size_t(k)];
        if (block_node_[size_t(b)] < 0) {
          if (free_nodes_.empty()) {
            free_nodes_.push_back(int32_t(nodes_.size()));
            nodes_.emplace_back();
          }
          id = free_nodes_.back();
          free_nodes_.pop_back();
          Node& nd = nodes_[size_t(id)];
          nd.live = true;
          nd.hash = h;
          nd.parent = parent;
          nd.block = b;
          nd.tokens.assign(blk.begin(), blk.end());
          nd.tick = ++tick_;
          if (parent >= 0) nodes_[size_t(parent)].children.push_back(id);
          by_hash_[h] = id;
          block_node_[size_t(b)] = id;
        }
      }
    }
    s.nodes.push_back(id);
  }
  // A snapshot for the boundary the sequence sits on.
  if (full > 0 && s.st.num_tokens == full * B) {
    const int32_t id = s.nodes[size_t(full - 1)];
    if (id >= 0 && nodes_[size_t(id)].snapshot < 0) {
      const int32_t slot = take_snapshot_slot();
      if (slot >= 0) {
        save_snapshot(s.st, snapshots_[size_t(slot)]);
        nodes_[size_t(id)].snapshot = slot;
        snapshot_node_[size_t(slot)] = id;
      }
    }
  }
}

// The slot-private tensors a snapshot holds, as views of slot `slot`, in the order of
// Snapshot::parts: per layer (main, then MTP) the window ring and the CSA previous-window halves;
// with MTP, the MTP block's next input stream (the main streams of position kB - 1: MTP position
// kB - 1 also reads token kB, which the block's hash does not cover, so it is not run yet).
std::vector<Tensor> StateManager::snapshot_parts(const StateStore& store, int32_t slot) const {
  const int64_t n = store.num_slots;
  std::vector<Tensor> v;
  for (const auto* layers : {&store.layers, &store.mtp_layers})
    for (const LayerStore& ls : *layers) {
      v.push_back(slot_rows(ls.window, n, slot));
      for (const CompressorSlots* c : {&ls.compressor, &ls.index_compressor})
        if (!c->prev_kv.empty()) {
          v.push_back(slot_rows(c->prev_kv, n, slot));
          v.push_back(slot_rows(c->prev_gate, n, slot));
        }
    }
  if (!store.mtp_stream.empty()) v.push_back(slot_rows(store.mtp_stream, n, slot));
  return v;
}

void StateManager::save_snapshot(const SequenceState& st, Snapshot& snap) {
  model_.on_every_rank([&](int r, Model& m) {
    Backend& be = m.backend();
    StateStore& store = Model::rank_store(*store_, r);
    const std::vector<Tensor> src = snapshot_parts(store, st.slot);
    for (size_t i = 0; i < src.size(); ++i) be.copy(src[i], snap.parts[size_t(r)][i]);
  });
}

void StateManager::load_snapshot(const Snapshot& snap, SequenceState& st) {
  model_.on_every_rank([&](int r, Model& m) {
    Backend& be = m.backend();
    StateStore& store = Model::rank_store(*store_, r);
    const std::vector<Tensor> dst = snapshot_parts(store, st.slot);
    for (size_t i = 0; i < dst.size(); ++i) be.copy(snap.parts[size_t(r)][i], dst[i]);
  });
}

bool StateManager::fork(const Seq& parent, Seq& child) {
  const int64_t B = layout_.block_tokens, n = parent.st.num_tokens;
  const int64_t full = n / B, partial = (n % B) ? 1 : 0;
  if (partial && available_blocks() < 1) return false;
  child = acquire();
  const SequenceState& ps = parent.st;
  SequenceState& cs = child.st;
  const int64_t slots = store_->num_slots;
  model_.on_every_rank([&](int r, Model& m) {
    Backend& be = m.backend();
    StateStore& store = Model::rank_store(*store_, r);
    for (const auto* layers : {&store.layers, &store.mtp_layers})
      for (const LayerStore& ls : *layers) {
        std::vector<const Tensor*> slot_tensors{&ls.window};
        for (const CompressorSlots* c : {&ls.compressor, &ls.index_compressor})
          for (const Tensor* t : {&c->kv, &c->gate, &c->prev_kv, &c->prev_gate})
            if (!t->empty()) slot_tensors.push_back(t);
        for (const Tensor* t : slot_tensors) be.copy(slot_rows(*t, slots, ps.slot), slot_rows(*t, slots, cs.slot));
      }
    if (!store.mtp_stream.empty())
      be.copy(slot_rows(store.mtp_stream, slots, ps.slot), slot_rows(store.mtp_stream, slots, cs.slot));
  });
  for (int64_t k = 0; k < full; ++k) {
    ++refs_[size_t(ps.blocks[size_t(k)])];
    cs.blocks.push_back(ps.blocks[size_t(k)]);
  }
  child.hashes.assign(parent.hashes.begin(), parent.hashes.begin() + std::min<int64_t>(full, int64_t(parent.hashes.size())));
  child.nodes.assign(parent.nodes.begin(), parent.nodes.begin() + std::min<int64_t>(full, int64_t(parent.nodes.size())));
  if (partial) {
    const int32_t src = ps.blocks[size_t(full)], dst = take_block();
    DSV4_CHECK(dst >= 0);
    const ModelConfig& c = model_.config();
    model_.on_every_rank([&](int r, Model& m) {
      Backend& be = m.backend();
      StateStore& store = Model::rank_store(*store_, r);
      for (size_t l = 0; l < store.layers.size(); ++l) {
        const int64_t r = c.compress_ratio(int64_t(l));
        if (!r) continue;
        const int64_t per = B / r;
        for (const Tensor* pool : {&store.layers[l].entries, &store.layers[l].index_keys})
          if (!pool->empty())
            be.copy(pool->rows_view(src * per, (src + 1) * per), pool->rows_view(dst * per, (dst + 1) * per));
      }
    });
    cs.blocks.push_back(dst);
  }
  cs.num_tokens = n;
  cs.mtp_tokens = ps.mtp_tokens;
  cs.capacity = int64_t(cs.blocks.size()) * B;
  return true;
}

void StateManager::clear_cache() {
  for (size_t i = 0; i < nodes_.size(); ++i)
    if (nodes_[i].live && nodes_[i].parent < 0) {
      // Only drop chains no sequence references anywhere.
      bool referenced = false;
      std::vector<int32_t> stack{int32_t(i)};
      while (!stack.empty()) {
        const Node& nd = nodes_[size_t(stack.back())];
        stack.pop_back();
        if (refs_[size_t(nd.block)] > 0) referenced = true;
        for (int32_t c : nd.children) stack.push_back(c);
      }
      if (!referenced) evict_node(int32_t(i));
    }
}

}  // namespace dsv4
