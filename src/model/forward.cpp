#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <array>
#include <atomic>
#include <bit>
#include <map>
#include <numeric>

#include "tensor/index_qat.h"
#include "util/error.h"

namespace dsv4 {

namespace {
float eps(double e) { return float(e); }
}  // namespace

Model::Model(const ModelConfig& cfg, const ModelWeights& w, Backend& backend, ModelRank rank)
    : cfg_(cfg),
      w_(w),
      be_(backend),
      rank_(rank),
      rope_main_(make_rope_table(cfg, false)),
      rope_compressed_(make_rope_table(cfg, true)) {
  check_parallel(cfg, rank_.parallel);
  if (rank_.parallel.world() > 1 && (!rank_.comm || rank_.comm->size() != rank_.parallel.world()))
    fail("Model: a {}-rank group needs a communicator of that size", rank_.parallel.world());
  be_.prepare_weights(w_);
}

Tensor Model::alloc_kv_store(int64_t rows, KvFormat kv) const {
  if (kv == KvFormat::FP8) return be_.alloc({rows, kv_row_layout(cfg_.head_dim, cfg_.nope_dim()).bytes}, ElemType::U8);
  return be_.alloc({rows, cfg_.head_dim});
}

LayerStore Model::new_layer_store(int64_t layer, int64_t slots, int64_t blocks, int64_t block_tokens,
                                  KvFormat kv) const {
  LayerStore s;
  s.window = alloc_kv_store(slots * cfg_.sliding_window, kv);
  const int64_t ratio = cfg_.compress_ratio(layer);
  if (!ratio) return s;
  auto comp_slots = [&](int64_t d, bool overlap) {
    CompressorSlots c;
    const int64_t coff = overlap ? 2 : 1;
    c.kv = be_.alloc({slots * ratio, coff * d});
    c.gate = be_.alloc({slots * ratio, coff * d});
    if (overlap) {
      c.prev_kv = be_.alloc({slots * ratio, d});
      c.prev_gate = be_.alloc({slots * ratio, d});
    }
    return c;
  };
  const bool csa = cfg_.attn_kind(layer) == AttnKind::CSA;
  s.entries = alloc_kv_store(blocks * (block_tokens / ratio), kv);
  s.compressor = comp_slots(cfg_.head_dim, csa);
  if (csa) {
    s.index_keys = be_.alloc({blocks * (block_tokens / ratio), cfg_.index_head_dim});
    s.index_compressor = comp_slots(cfg_.index_head_dim, true);
  }
  return s;
}

int64_t Model::block_granularity() const {
  int64_t g = 1;
  for (int64_t l = 0; l < cfg_.total_layers(); ++l)
    if (int64_t r = cfg_.compress_ratio(l)) g = std::lcm(g, r);
  return g;
}

std::shared_ptr<StateStore> Model::new_store(int64_t slots, int64_t blocks, int64_t block_tokens, bool mtp,
                                             KvFormat kv) const {
  if (slots <= 0 || blocks <= 0) fail("state store: {} slots and {} blocks (both must be positive)", slots, blocks);
  if (block_tokens <= 0 || block_tokens % block_granularity())
    fail("--block-size: {} must be a positive multiple of {} (every compress ratio)", block_tokens, block_granularity());
  auto s = std::make_shared<StateStore>();
  s->kv = kv;
  s->block_tokens = block_tokens;
  s->num_slots = slots;
  s->num_blocks = blocks;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    s->layers.push_back(new_layer_store(l, slots, blocks, block_tokens, kv));
  if (mtp && cfg_.num_nextn_predict_layers > 0) {
    for (int64_t i = 0; i < cfg_.num_nextn_predict_layers; ++i)
      s->mtp_layers.push_back(new_layer_store(cfg_.num_hidden_layers + i, slots, blocks, block_tokens, kv));
    s->mtp_stream = be_.alloc({slots, cfg_.hc_mult * cfg_.hidden_size});
  }
  if (!peers_.empty()) {
    s->peers.resize(peers_.size());
    threads_->run([&](int r) {
      if (r) s->peers[size_t(r - 1)] = peers_[size_t(r - 1)]->new_store(slots, blocks, block_tokens, mtp, kv);
    });
  }
  return s;
}

void Model::on_every_rank(const std::function<void(int, Model&)>& fn) {
  if (peers_.empty()) return fn(0, *this);
  threads_->run([&](int r) { fn(r, r ? *peers_[size_t(r - 1)] : *this); });
}

void Model::set_peers(std::vector<Model*> peers, RankThreads* threads) {
  if (int(peers.size()) + 1 != rank_.parallel.world() || !threads || threads->size() != rank_.parallel.world())
    fail("Model::set_peers: {} peers and {} threads for a {}-rank group", peers.size(), threads ? threads->size() : 0,
         rank_.parallel.world());
  peers_ = std::move(peers);
  threads_ = threads;
}

SequenceState Model::new_sequence(int64_t capacity) const {
  if (capacity <= 0) fail("sequence capacity must be positive, got {}", capacity);
  const int64_t g = block_granularity();
  SequenceState s;
  s.store = new_store(1, 1, (capacity + g - 1) / g * g, true, kv_format_);
  s.capacity = capacity;
  s.blocks = {0};
  return s;
}

// Everything the layers need to know about a batch, computed on the host and uploaded in one
// copy before the first layer: positions, the window each query sees, where this step's keys
// and entries are stored, block tables and, per compress ratio, the compressor's per-sequence
// segments and the compressed entries each query may see.
struct Model::Plan {
  StateStore* store = nullptr;
  bool mtp = false;
  int64_t T = 0;
  Tensor ids, pos;     // [T]
  Tensor window_idx;   // [T, W]: rows of [window rings ; this step's keys]
  Tensor window_dest;  // [T]: ring row each key is kept in (-1: slides out within the step)
  Tensor block_table;  // [S, max blocks] (-1 padded)
  Tensor query_seq;    // [T]: the sequence of each row
  struct Ratio {
    int64_t n_new = 0;  // entries completed by this step, all sequences
    int64_t topk = 0;   // indexer top-k width (CSA)
    Tensor seqs;        // [S, kSegCols]
    Tensor entry_dest;  // [n_new]: pool row of each new entry
    Tensor entry_pos;   // [n_new]: position of each new entry's first token (its RoPE position)
    Tensor usable;      // [T]: complete windows each query may see (CSA)
    Tensor visible;     // [T, K]: pool rows of those windows (HCA: every one is attended)
  };
  std::map<int64_t, Ratio> ratios;
  Tensor logit_rows, stream_rows;  // batch rows (empty: every row)
  int64_t n_logits = 0, n_streams = 0;
  Tensor draft_rows;  // [n_drafts]: batch rows of main-pass drafts, whose window keys are held back
  int64_t n_drafts = 0;
  mutable std::vector<Tensor> draft_keys;  // filled per layer by attention()

  const Ratio& ratio(int64_t r) const { return ratios.at(r); }
};

// With `fixed` (a decode step, every sequence one token): the batch is padded to fixed->rows
// sequences of one inactive row each (token 0 at position 0, no window, no compressor rows, no
// visible entries: they write nothing and nothing reads them), block tables to fixed->blocks
// columns; each compressor gets one candidate entry row per sequence (destination -1 unless its
// token completes a window), the indexer top-k and the HCA visible lists are as wide as the
// block tables allow, and logits and streams cover every row. The plan is then uploaded into
// *into (allocated on first use), so its tensors keep their addresses from step to step.
Model::Plan Model::plan(std::span<const ForwardSeq> batch, bool mtp, const DecodeShape* fixed, Tensor* into) {
  if (batch.empty()) fail("forward: empty batch");
  Plan p;
  p.mtp = mtp;
  p.store = batch[0].state->store.get();
  StateStore& store = *p.store;
  const int64_t n_seqs = int64_t(batch.size()), S = fixed ? fixed->rows : n_seqs, W = cfg_.sliding_window,
                B = store.block_tokens;
  DSV4_CHECK(S >= n_seqs);
  const int64_t Nw = store.num_slots * W;
  std::vector<int64_t> first(S), start(S), len(S, 1);
  int64_t max_blocks = 1;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const ForwardSeq& f = batch[size_t(s)];
    const SequenceState& st = *f.state;
    if (st.store.get() != p.store) fail("forward: the sequences of one batch must share a state store");
    for (int64_t o = 0; o < s; ++o)
      if (batch[size_t(o)].state == f.state) fail("forward: a sequence appears twice in one batch");
    first[s] = p.T;
    start[s] = mtp ? st.mtp_tokens : st.num_tokens;
    len[s] = int64_t(f.tokens.size());
    if (len[s] == 0) fail("forward: empty token list");
    if (f.logit_rows < 0 || f.logit_rows > len[s] || f.stream_rows < 0 || f.stream_rows > len[s] ||
        f.draft_rows < 0 || f.draft_rows > len[s])
      fail("forward: {} logit rows / {} stream rows / {} draft rows of a {}-token chunk", f.logit_rows, f.stream_rows,
           f.draft_rows, len[s]);
    // MTP draft rows (chained drafts) may run ahead of the main model: they are never committed.
    if (mtp && start[s] + len[s] - f.draft_rows > st.num_tokens)
      fail("forward_mtp: positions {}..{} have not been run by the main model", start[s],
           start[s] + len[s] - f.draft_rows - 1);
    // (The MTP block is sliding-window only when it has draft rows: they need no blocks.)
    const int64_t last = start[s] + len[s] - (mtp ? f.draft_rows : 0);
    if (last > st.capacity || (!mtp && last > int64_t(st.blocks.size()) * B))
      fail("forward: {} tokens exceed the sequence capacity of {}", start[s] + len[s], st.capacity);
    if (!mtp) p.n_drafts += f.draft_rows;
    if (st.slot < 0 || st.slot >= store.num_slots) fail("forward: slot {} of a {}-slot store", st.slot, store.num_slots);
    for (int64_t t = 0; t < len[s]; ++t)
      if (f.tokens[size_t(t)] < 0 || f.tokens[size_t(t)] >= cfg_.vocab_size)
        fail("token id {} at position {} is out of range (vocab size {})", f.tokens[size_t(t)], start[s] + t,
             cfg_.vocab_size);
    max_blocks = std::max<int64_t>(max_blocks, int64_t(st.blocks.size()));
    p.T += len[s];
    p.n_logits += f.logit_rows;
    p.n_streams += f.stream_rows;
  }
  if (fixed) {
    DSV4_CHECK(max_blocks <= fixed->blocks && p.T == n_seqs);
    max_blocks = fixed->blocks;
    for (int64_t s = n_seqs; s < S; ++s) first[s] = p.T++;
    p.n_logits = p.n_streams = p.T;
  }
  const int64_t T = p.T;

  // Every list is staged in one host vector, uploaded once, and handed out as views.
  std::vector<int32_t> host;
  struct Staged {
    Tensor* dst;
    size_t offset;
    std::vector<int64_t> shape;
  };
  std::vector<Staged> staged;
  auto stage = [&](Tensor& dst, std::vector<int64_t> shape, int32_t fill) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const size_t off = host.size();
    host.resize(off + size_t(n), fill);
    staged.push_back({&dst, off, std::move(shape)});
    return off;
  };
  const size_t ids = stage(p.ids, {T}, 0), pos = stage(p.pos, {T}, 0), widx = stage(p.window_idx, {T, W}, -1);
  const size_t wdest = stage(p.window_dest, {T}, -1), table = stage(p.block_table, {S, max_blocks}, -1);
  const size_t qseq = stage(p.query_seq, {T}, 0);
  for (int64_t s = n_seqs; s < S; ++s) host[qseq + size_t(first[s])] = int32_t(s);
  for (int64_t s = 0; s < n_seqs; ++s) {
    const SequenceState& st = *batch[size_t(s)].state;
    std::copy(st.blocks.begin(), st.blocks.end(), host.begin() + long(table + size_t(s * max_blocks)));
    for (int64_t t = 0; t < len[s]; ++t) {
      const int64_t row = first[s] + t, at = start[s] + t, lo = std::max<int64_t>(0, at - W + 1);
      host[ids + size_t(row)] = batch[size_t(s)].tokens[size_t(t)];
      host[pos + size_t(row)] = int32_t(at);
      host[qseq + size_t(row)] = int32_t(s);
      for (int64_t j = lo; j <= at; ++j)
        host[widx + size_t(row * W + j - lo)] =
            int32_t(j < start[s] ? st.slot * W + j % W : Nw + first[s] + (j - start[s]));
      // The last W committed keys enter the ring; draft keys wait for accept_drafts (MTP: never).
      const int64_t committed = len[s] - batch[size_t(s)].draft_rows;
      if (t >= committed - W && t < committed) host[wdest + size_t(row)] = int32_t(st.slot * W + at % W);
    }
  }

  // Per compress ratio of the layers this pass runs.
  const int64_t l0 = mtp ? cfg_.num_hidden_layers : 0;
  const int64_t l1 = mtp ? cfg_.num_hidden_layers + cfg_.num_nextn_predict_layers : cfg_.num_hidden_layers;
  std::map<int64_t, std::pair<bool, bool>> kinds;  // ratio -> (has CSA layers, has HCA layers)
  for (int64_t l = l0; l < l1; ++l)
    if (int64_t r = cfg_.compress_ratio(l)) {
      auto& k = kinds[r];
      (cfg_.attn_kind(l) == AttnKind::CSA ? k.first : k.second) = true;
    }
  std::map<int64_t, std::array<size_t, 5>> offsets;
  if (mtp && !kinds.empty())
    for (const ForwardSeq& f : batch)
      if (f.draft_rows) fail("forward_mtp: draft rows need a sliding-window-only MTP block (compress ratio 0)");
  for (auto& [r, kind] : kinds) {
    Plan::Ratio& pr = p.ratios[r];
    const int64_t per = B / r;
    int64_t max_usable = 0;
    for (int64_t s = 0; s < n_seqs; ++s) {
      pr.n_new += (start[s] + len[s]) / r - start[s] / r;
      max_usable = std::max(max_usable, (start[s] + len[s]) / r);
    }
    // Fixed: every entry the block tables can address (max_usable never exceeds it).
    if (fixed) {
      pr.n_new = S;
      max_usable = max_blocks * per;
    }
    pr.topk = std::min<int64_t>(cfg_.index_topk, std::max<int64_t>(max_usable, 1));
    const int64_t K = kind.second ? std::max<int64_t>(max_usable, 1) : 0;
    auto& o = offsets[r];
    o[0] = stage(pr.seqs, {S, kSegCols}, 0);
    o[1] = stage(pr.entry_dest, {pr.n_new}, -1);
    o[2] = stage(pr.entry_pos, {pr.n_new}, 0);
    o[3] = kind.first ? stage(pr.usable, {T}, 0) : 0;
    o[4] = kind.second ? stage(pr.visible, {T, K}, -1) : 0;
    int64_t out = 0;
    for (int64_t s = n_seqs; s < S; ++s) {  // padding: no rows fed, candidate entry s unused
      int32_t* seg = host.data() + o[0] + size_t(s * kSegCols);
      seg[kSegFirstRow] = int32_t(first[s]);
      seg[kSegOutFirst] = int32_t(s);
    }
    for (int64_t s = 0; s < n_seqs; ++s) {
      const SequenceState& st = *batch[size_t(s)].state;
      auto pool_row = [&](int64_t j) { return int32_t(int64_t(st.blocks[size_t(j / per)]) * per + j % per); };
      int32_t* seg = host.data() + o[0] + size_t(s * kSegCols);
      if (fixed) out = s;  // candidate row s: written only when the token completes a window
      seg[kSegFirstRow] = int32_t(first[s]);
      seg[kSegRows] = int32_t(len[s]);
      seg[kSegStart] = int32_t(start[s]);
      seg[kSegSlot] = st.slot;
      seg[kSegOutFirst] = int32_t(out);
      for (int64_t j = start[s] / r; j < (start[s] + len[s]) / r; ++j, ++out) {
        host[o[1] + size_t(out)] = pool_row(j);
        host[o[2] + size_t(out)] = int32_t(j * r);
      }
      for (int64_t t = 0; t < len[s]; ++t) {
        const int64_t row = first[s] + t, usable = (start[s] + t + 1) / r;
        if (kind.first) host[o[3] + size_t(row)] = int32_t(usable);
        if (kind.second)
          for (int64_t j = 0; j < usable; ++j) host[o[4] + size_t(row * K + j)] = pool_row(j);
      }
    }
  }

  // Rows whose logits / streams leave the pass (gathers are skipped when that is every row).
  const bool all_logits = p.n_logits == T, all_streams = p.n_streams == T;
  const size_t lrows = all_logits ? 0 : stage(p.logit_rows, {p.n_logits}, 0);
  const size_t srows = all_streams ? 0 : stage(p.stream_rows, {p.n_streams}, 0);
  const size_t drows = p.n_drafts ? stage(p.draft_rows, {p.n_drafts}, 0) : 0;
  for (int64_t s = 0, li = 0, si = 0, di = 0; s < n_seqs; ++s) {
    const ForwardSeq& f = batch[size_t(s)];
    for (int64_t t = len[s] - f.logit_rows; !all_logits && t < len[s]; ++t) host[lrows + size_t(li++)] = int32_t(first[s] + t);
    for (int64_t t = len[s] - f.stream_rows; !all_streams && t < len[s]; ++t)
      host[srows + size_t(si++)] = int32_t(first[s] + t);
    for (int64_t t = len[s] - f.draft_rows; p.n_drafts && t < len[s]; ++t) host[drows + size_t(di++)] = int32_t(first[s] + t);
  }

  Tensor flat;
  if (into) {
    if (into->empty()) *into = be_.alloc({int64_t(host.size())}, ElemType::I32);
    DSV4_CHECK(into->numel() == int64_t(host.size()));
    flat = *into;
  } else {
    flat = be_.alloc({int64_t(host.size())}, ElemType::I32);
  }
  be_.upload(flat, host.data());
  for (const Staged& st : staged) {
    int64_t n = 1;
    for (int64_t d : st.shape) n *= d;
    *st.dst = flat.rows_view(int64_t(st.offset), int64_t(st.offset) + n).reshaped(st.shape);
  }
  return p;
}

// Runs one compressor over the batch and returns the entries it completed (normed, RoPE'd at the
// position of each window's first token); the caller stores them.
Tensor Model::compress(const CompressorWeights& c, const CompressorSlots& cs, const Tensor& x, const Plan& p) {
  const int64_t T = x.dim(0), width = (c.overlap ? 2 : 1) * c.head_dim;
  const Plan::Ratio& pr = p.ratio(c.ratio);
  Tensor kv = be_.alloc({T, width}), gate = be_.alloc({T, width});
  be_.linear(x, dense_linear(*c.wkv), kv);
  be_.linear(x, dense_linear(*c.wgate), gate);
  Tensor out = be_.alloc({std::max<int64_t>(pr.n_new, 1), c.head_dim}).rows_view(0, pr.n_new);
  be_.compress(kv, gate, *c.ape, pr.seqs, c.ratio, c.overlap, cs, out);
  if (!pr.n_new) return out;
  be_.rms_norm(out, c.norm, eps(cfg_.rms_norm_eps), out);
  be_.rope(out.reshaped({pr.n_new, 1, c.head_dim}), pr.entry_pos, rope_compressed_, cfg_.rope_dim(), false);
  return out;
}

Tensor Model::attention(const AttentionWeights& a, LayerStore& ls, const Plan& p, const Tensor& x) {
  // This rank's heads and output groups (tensor parallelism splits both).
  const int64_t T = x.dim(0), H = cfg_.num_attention_heads / rank_.parallel.tp, hd = cfg_.head_dim;
  const int64_t nope = cfg_.nope_dim();
  const RopeTable& rope = a.has_compressor ? rope_compressed_ : rope_main_;
  const KvFormat kvf = p.store->kv;

  // Queries: low-rank latent, per-head unweighted RMSNorm, RoPE on the last rope dims.
  Tensor cq = be_.alloc({T, cfg_.q_lora_rank});
  be_.linear(x, a.wq_a, cq);
  be_.rms_norm(cq, a.q_norm, eps(cfg_.rms_norm_eps), cq);
  Tensor q = be_.alloc({T, H, hd});
  be_.linear(cq, a.wq_b, q.reshaped({T, H * hd}));
  be_.rms_norm(q, nullptr, eps(cfg_.rms_norm_eps), q);
  be_.rope(q, p.pos, rope, cfg_.rope_dim(), false);

  // The single shared key/value head. With FP8 KV, attention (this step's keys included) reads
  // what the stored rows decode to.
  Tensor kv = be_.alloc({T, hd});
  be_.linear(x, a.wkv, kv);
  be_.rms_norm(kv, a.kv_norm, eps(cfg_.rms_norm_eps), kv);
  be_.rope(kv.reshaped({T, 1, hd}), p.pos, rope, cfg_.rope_dim(), false);
  if (kvf != KvFormat::F32) be_.quantize_kv(kv, nope);

  // Compressed entries completed by this step are stored first: its queries may see them. The
  // indexer then picks among each sequence's entries per query (CSA); HCA sees every one.
  Tensor compressed_idx;
  if (a.has_compressor) {
    const Plan::Ratio& pr = p.ratio(a.compressor.ratio);
    Tensor fresh = compress(a.compressor, ls.compressor, x, p);
    if (kvf == KvFormat::FP8Simulated && pr.n_new) be_.quantize_kv(fresh, nope);
    if (pr.n_new) be_.store_rows(fresh, pr.entry_dest, nope, ls.entries);
    if (a.has_indexer) {
      const auto& ix = a.indexer;
      // With the official activation quantisation (--gemm fp8) index keys and queries go through
      // the indexer's Hadamard + FP4 simulation (tensor/index_qat.h) where its width allows.
      const int64_t Hi = cfg_.index_n_heads, di = cfg_.index_head_dim;
      const bool index_qat = be_.act_quant() != ActQuant::None && index_qat_applies(di);
      Tensor fresh_keys = compress(ix.compressor, ls.index_compressor, x, p);
      if (index_qat && pr.n_new) be_.index_qat(fresh_keys);
      if (pr.n_new) be_.store_rows(fresh_keys, pr.entry_dest, cfg_.index_head_dim, ls.index_keys);
      Tensor qi = be_.alloc({T, Hi, di});
      be_.linear(cq, ix.wq_b, qi.reshaped({T, Hi * di}));
      be_.rope(qi, p.pos, rope_compressed_, cfg_.rope_dim(), false);
      if (index_qat) be_.index_qat(qi);
      Tensor wi = be_.alloc({T, Hi});
      be_.linear(x, dense_linear(*ix.weights_proj), wi);
      compressed_idx = be_.alloc({T, pr.topk}, ElemType::I32);
      const float w_scale = 1.f / std::sqrt(float(Hi)) / std::sqrt(float(di));
      be_.index_topk(qi, wi, w_scale, ls.index_keys, p.block_table, p.store->block_tokens / a.compressor.ratio,
                     p.query_seq, pr.usable, compressed_idx, index_qat);
    } else {
      compressed_idx = pr.visible;
    }
  }

  // Window: positions max(0, p - W + 1) .. p, the current token included, from the ring (earlier
  // steps) and this step's keys; then this step's last W keys of each sequence enter its ring.
  Tensor o = be_.alloc({T, H, hd});
  be_.attend(q, ls.window, kv, p.window_idx, a.has_compressor ? ls.entries : Tensor{}, compressed_idx, nope,
             *a.attn_sink, 1.f / std::sqrt(float(hd)), o);
  be_.store_rows(kv, p.window_dest, nope, ls.window);
  if (p.n_drafts) {
    Tensor keys = be_.alloc({p.n_drafts, hd});
    be_.gather_rows(kv, p.draft_rows, keys);
    p.draft_keys.push_back(keys);
  }

  // Undo the rotation of the values' RoPE dims at the query position, then the grouped projection.
  be_.rope(o, p.pos, rope, cfg_.rope_dim(), true);
  const int64_t G = cfg_.o_groups / rank_.parallel.tp;
  Tensor z = be_.alloc({T, G, cfg_.o_lora_rank});
  be_.grouped_linear(o.reshaped({T, G, H / G * hd}), a.wo_a, G, z);
  Tensor out = be_.alloc({T, cfg_.hidden_size});
  be_.linear(z.reshaped({T, G * cfg_.o_lora_rank}), a.wo_b, out);
  if (rank_.parallel.tp > 1) rank_.comm->all_reduce_sum(out);  // each rank's groups give a partial sum
  return out;
}

Tensor Model::block(const BlockWeights& b, LayerStore& ls, const Plan& p, const Tensor& X) {
  const int64_t T = X.dim(0), m = cfg_.hc_mult, D = cfg_.hidden_size;
  const float ne = eps(cfg_.rms_norm_eps), he = eps(cfg_.hc_eps);
  Tensor u = be_.alloc({T, D}), post = be_.alloc({T, m}), comb = be_.alloc({T, m, m});
  be_.hc_pre(X, b.hc_attn, cfg_.hc_sinkhorn_iters, he, ne, u, post, comb);
  be_.rms_norm(u, b.attn_norm, ne, u);
  Tensor y = attention(b.attn, ls, p, u);
  Tensor X1 = be_.alloc({T, m, D});
  be_.hc_post(y, X, post, comb, X1);

  be_.hc_pre(X1, b.hc_ffn, cfg_.hc_sinkhorn_iters, he, ne, u, post, comb);
  be_.rms_norm(u, b.ffn_norm, ne, u);
  const int64_t k = cfg_.num_experts_per_tok;
  Tensor gw = be_.alloc({T, k}), ge = be_.alloc({T, k}, ElemType::I32);
  be_.route(u, b.ffn, p.ids, cfg_, gw, ge);
  Tensor f = be_.alloc({T, D});
  be_.moe(u, b.ffn, gw, ge, float(cfg_.swiglu_limit), f);
  if (rank_.parallel.world() > 1) rank_.comm->all_reduce_sum(f);  // the combine: every rank's experts and shard
  Tensor X2 = be_.alloc({T, m, D});
  be_.hc_post(f, X1, post, comb, X2);
  return X2;
}

Tensor Model::logits(const Tensor& X, const HyperConn& hc, const TensorData& norm) {
  const int64_t T = X.dim(0);
  Tensor u = be_.alloc({T, cfg_.hidden_size});
  be_.hc_head(X, hc, eps(cfg_.hc_eps), eps(cfg_.rms_norm_eps), u);
  be_.rms_norm(u, &norm, eps(cfg_.rms_norm_eps), u);
  Tensor out = be_.alloc({T, cfg_.vocab_size});
  be_.linear(u, dense_linear(*w_.head), out);
  return out;
}

namespace {
// Rows `rows` of x [T, ...] (x itself when rows is empty: every row is wanted).
Tensor select_rows(Backend& be, const Tensor& x, const Tensor& rows, int64_t n) {
  if (rows.empty()) return x;
  std::vector<int64_t> shape = x.shape;
  shape[0] = n;
  Tensor out = be.alloc(shape);
  if (n) be.gather_rows(x.reshaped({x.dim(0), x.numel() / x.dim(0)}), rows, out.reshaped({n, x.numel() / x.dim(0)}));
  return out;
}
}  // namespace

Tensor Model::main_layers(const Plan& p) {
  Tensor e = be_.alloc({p.T, cfg_.hidden_size});
  be_.embed(*w_.embed, p.ids, e);
  Tensor X = be_.alloc({p.T, cfg_.hc_mult, cfg_.hidden_size});
  be_.broadcast_streams(e, X, false);
  for (size_t l = 0; l < w_.layers.size(); ++l) X = block(w_.layers[l], p.store->layers[l], p, X);
  return X;
}

void Model::run_on_ranks(std::span<const ForwardSeq> batch,
                         const std::function<void(int, Model&, std::span<const ForwardSeq>)>& fn) {
  // Each peer runs the batch on its copy of the states with its own store; only rank 0's states
  // advance for real. (A peer copies them before its first collective, so before rank 0 can
  // advance them.)
  threads_->run([&](int r) {
    if (r == 0) return fn(0, *this, batch);
    std::vector<SequenceState> states;
    states.reserve(batch.size());
    std::vector<ForwardSeq> rebased(batch.begin(), batch.end());
    for (ForwardSeq& f : rebased) {
      states.push_back(*f.state);
      states.back().store = f.state->store->peers.at(size_t(r - 1));
      f.state = &states.back();
    }
    fn(r, *peers_[size_t(r - 1)], rebased);
  });
}

ForwardOutput Model::forward(std::span<const ForwardSeq> batch) {
  if (peers_.empty()) return forward_rank(batch);
  ForwardOutput out;
  std::vector<DraftCommit> peer_drafts(peers_.size());
  run_on_ranks(batch, [&](int r, Model& m, std::span<const ForwardSeq> b) {
    ForwardOutput o = m.forward_rank(b);
    if (r == 0) {
      out = std::move(o);
      return;
    }
    // The peer's commit names rank 0's states (its own copies end with this call).
    for (DraftCommit::Seq& d : o.drafts.seqs)
      for (size_t i = 0; i < b.size(); ++i)
        if (d.state == b[i].state) d.state = batch[i].state;
    peer_drafts[size_t(r - 1)] = std::move(o.drafts);
  });
  if (!out.drafts.empty()) out.drafts.peers = std::move(peer_drafts);
  return out;
}

ForwardOutput Model::forward_rank(std::span<const ForwardSeq> batch) {
  if (is_fixed_shape_decode(batch)) return forward_decode(batch);
  Plan p = plan(batch, false);
  ForwardOutput out;
  if (p.n_drafts) out.drafts = save_draft_state(batch);
  Tensor X = main_layers(p);
  for (const ForwardSeq& f : batch) f.state->num_tokens += int64_t(f.tokens.size());
  out.drafts.keys = std::move(p.draft_keys);
  if (p.n_streams) out.streams = select_rows(be_, X, p.stream_rows, p.n_streams);
  if (p.n_logits) out.logits = logits(select_rows(be_, X, p.logit_rows, p.n_logits), w_.hc_head, *w_.norm);
  return out;
}

Model::~Model() {
  for (const DecodeStep& d : decode_steps_) be_.drop_graph(d.key);
}

bool Model::is_fixed_shape_decode(std::span<const ForwardSeq> batch) const {
  // (Not yet for a tensor/expert-parallel group: its ranks' graphs would hold the collectives.)
  if (!decode_graphs_ || batch.empty() || rank_.parallel.world() > 1) return false;
  for (const ForwardSeq& f : batch)
    if (f.tokens.size() != 1 || f.logit_rows != 1 || f.draft_rows != 0 || f.stream_rows != batch[0].stream_rows)
      return false;
  return true;
}

Model::DecodeStep& Model::decode_step(const SequenceState& st, const DecodeShape& shape) {
  for (DecodeStep& d : decode_steps_)
    if (d.store.lock() == st.store && d.shape == shape && d.act == be_.act_quant()) return d;
  // A new step replaces those of freed stores (their graphs hold the stores' addresses) and the
  // one of the same rows with another block-table width (one graph's memory per row bucket).
  std::erase_if(decode_steps_, [&](const DecodeStep& d) {
    if (!d.store.expired() && !(d.store.lock() == st.store && d.shape.rows == shape.rows && d.act == be_.act_quant()))
      return false;
    be_.drop_graph(d.key);
    return true;
  });
  static std::atomic<uint64_t> next_key{1};  // graph keys are unique across models sharing a backend
  DecodeStep& d = decode_steps_.emplace_back();
  d.store = st.store;
  d.shape = shape;
  d.act = be_.act_quant();
  d.key = next_key++;
  return d;
}

// A decode step in its bucket's fixed shape: the plan goes into the bucket's persistent buffer,
// then the layers and the logits of every row run as one recorded step (a graph replay on CUDA
// after the first steps); the real sequences' rows are copied out of the step's outputs, which
// the next step of the bucket overwrites.
ForwardOutput Model::forward_decode(std::span<const ForwardSeq> batch) {
  const int64_t n = int64_t(batch.size());
  int64_t blocks = 1;
  for (const ForwardSeq& f : batch) blocks = std::max<int64_t>(blocks, int64_t(f.state->blocks.size()));
  const DecodeShape shape{int64_t(std::bit_ceil(uint64_t(n))), int64_t(std::bit_ceil(uint64_t(blocks)))};
  DecodeStep& step = decode_step(*batch[0].state, shape);
  const Plan p = plan(batch, false, &shape, &step.plan);
  be_.run_graph(step.key, [&] {
    step.X = main_layers(p);
    step.logits = logits(step.X, w_.hc_head, *w_.norm);
  });
  for (const ForwardSeq& f : batch) f.state->num_tokens += 1;
  ++fixed_decode_steps_;
  ForwardOutput out;
  auto copy_rows = [&](const Tensor& t) {
    std::vector<int64_t> shape = t.shape;
    shape[0] = n;
    Tensor c = be_.alloc(shape);
    be_.copy(t.rows_view(0, n), c);
    return c;
  };
  out.logits = copy_rows(step.logits);
  if (batch[0].stream_rows) out.streams = copy_rows(step.X);
  return out;
}

// The compressor rows that the draft positions of `batch` will overwrite, copied before the pass.
// A position p writes partial-window row p % r of its slot and, completing a window, replaces the
// CSA previous-window halves (all r rows). A sequence with drafts feeds at most r rows, so no two
// of its positions share a row and at most one completes a window: restoring a rejected draft's
// rows to their value before the pass undoes exactly that draft.
DraftCommit Model::save_draft_state(std::span<const ForwardSeq> batch) {
  DraftCommit dc;
  for (const ForwardSeq& f : batch) {
    if (!f.draft_rows) continue;
    const int64_t len = int64_t(f.tokens.size());
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      if (const int64_t r = cfg_.compress_ratio(l); r && len > r)
        fail("forward: {} rows with drafts exceed compress ratio {} (a draft would overwrite a kept row)", len, r);
    if (len > cfg_.sliding_window) fail("forward: {} rows with drafts exceed the window of {}", len, cfg_.sliding_window);
    dc.seqs.push_back({f.state, f.state->num_tokens + len - f.draft_rows, f.draft_rows});
  }
  StateStore& store = *batch[0].state->store;
  for (size_t l = 0; l < store.layers.size(); ++l) {
    const int64_t r = cfg_.compress_ratio(int64_t(l));
    if (!r) continue;
    for (const CompressorSlots* cs : {&store.layers[l].compressor, &store.layers[l].index_compressor}) {
      if (cs->kv.empty()) continue;
      DraftCommit::Saved partial, prev;
      for (size_t i = 0; i < dc.seqs.size(); ++i) {
        const DraftCommit::Seq& d = dc.seqs[i];
        for (int64_t j = 0; j < d.drafts; ++j) {
          const int64_t pos = d.first_pos + j;
          partial.rows.push_back(int32_t(d.state->slot * r + pos % r));
          partial.seq.push_back(int32_t(i));
          partial.draft.push_back(int32_t(j));
          if (pos % r == r - 1 && !cs->prev_kv.empty())
            for (int64_t k = 0; k < r; ++k) {
              prev.rows.push_back(int32_t(d.state->slot * r + k));
              prev.seq.push_back(int32_t(i));
              prev.draft.push_back(int32_t(j));
            }
        }
      }
      auto save = [&](const Tensor& t, const DraftCommit::Saved& like) {
        if (like.rows.empty()) return;
        DraftCommit::Saved sv = like;
        sv.store = t;
        const int64_t n = int64_t(sv.rows.size());
        Tensor idx = be_.alloc({n}, ElemType::I32);
        be_.upload(idx, sv.rows.data());
        sv.values = be_.alloc({n, t.cols()});
        be_.gather_rows(t, idx, sv.values);
        dc.saved.push_back(std::move(sv));
      };
      save(cs->kv, partial);
      save(cs->gate, partial);
      save(cs->prev_kv, prev);
      save(cs->prev_gate, prev);
    }
  }
  return dc;
}

void Model::accept_drafts(const DraftCommit& dc, std::span<const int64_t> accepted) {
  if (accepted.size() != dc.seqs.size()) fail("accept_drafts: {} counts for {} sequences", accepted.size(), dc.seqs.size());
  if (dc.empty()) return;
  for (size_t i = 0; i < dc.seqs.size(); ++i)
    if (accepted[i] < 0 || accepted[i] > dc.seqs[i].drafts)
      fail("accept_drafts: {} of {} drafts accepted", accepted[i], dc.seqs[i].drafts);
  StateStore& store = *dc.seqs[0].state->store;
  if (peers_.empty()) return accept_rank(dc, accepted, store, true);
  if (dc.peers.size() != peers_.size()) fail("accept_drafts: the commit of a pass without this model's ranks");
  threads_->run([&](int r) {
    if (r == 0) accept_rank(dc, accepted, store, true);
    else peers_[size_t(r - 1)]->accept_rank(dc.peers[size_t(r - 1)], accepted, *store.peers.at(size_t(r - 1)), false);
  });
}

void Model::accept_rank(const DraftCommit& dc, std::span<const int64_t> accepted, StateStore& store, bool advance) {
  const int64_t W = cfg_.sliding_window;
  std::vector<int32_t> ring_dest;
  for (size_t i = 0; i < dc.seqs.size(); ++i) {
    const DraftCommit::Seq& d = dc.seqs[i];
    for (int64_t j = 0; j < d.drafts; ++j)
      ring_dest.push_back(j < accepted[i] ? int32_t(d.state->slot * W + (d.first_pos + j) % W) : -1);
    if (advance) d.state->num_tokens -= d.drafts - accepted[i];
  }
  auto upload = [&](const std::vector<int32_t>& v) {
    Tensor t = be_.alloc({int64_t(v.size())}, ElemType::I32);
    be_.upload(t, v.data());
    return t;
  };
  const Tensor ring_rows = upload(ring_dest);
  DSV4_CHECK(dc.keys.size() == store.layers.size());
  for (size_t l = 0; l < store.layers.size(); ++l) be_.store_rows(dc.keys[l], ring_rows, cfg_.nope_dim(), store.layers[l].window);
  for (const DraftCommit::Saved& sv : dc.saved) {
    std::vector<int32_t> dest(sv.rows.size(), -1);
    for (size_t i = 0; i < sv.rows.size(); ++i)
      if (sv.draft[i] >= accepted[size_t(sv.seq[i])]) dest[i] = sv.rows[i];
    be_.store_rows(sv.values, upload(dest), 0, sv.store);
  }
}

Tensor Model::forward(SequenceState& st, std::span<const int32_t> tokens, Tensor* streams) {
  const int64_t T = int64_t(tokens.size());
  const ForwardSeq one{&st, tokens, T, streams ? T : 0};
  ForwardOutput out = forward(std::span(&one, 1));
  if (streams) *streams = out.streams;
  return out.logits;
}

Tensor Model::forward_mtp(SequenceState& st, const Tensor& streams, std::span<const int32_t> next_tokens) {
  const int64_t n = int64_t(next_tokens.size());
  const ForwardSeq one{&st, next_tokens, n, 0};
  return forward_mtp(std::span(&one, 1), streams).logits;
}

ForwardOutput Model::forward_mtp(std::span<const ForwardSeq> batch, const Tensor& streams) {
  if (w_.mtp.empty()) fail("this model has no MTP block (num_nextn_predict_layers = 0)");
  for (const ForwardSeq& f : batch)
    if (f.state->store->mtp_layers.empty()) fail("forward_mtp: this sequence's state store has no MTP layers");
  if (peers_.empty()) return forward_mtp_rank(batch, streams);
  // The input streams live in rank 0's backend (the drafter assembles them there); every rank
  // holds the same replicated streams, so each peer gets a copy of rank 0's.
  std::vector<float> host(size_t(streams.numel()));
  be_.download(streams, host.data());
  ForwardOutput out;
  run_on_ranks(batch, [&](int r, Model& m, std::span<const ForwardSeq> b) {
    if (r == 0) {
      out = forward_mtp_rank(b, streams);
      return;
    }
    Tensor own = m.be_.alloc(streams.shape);
    m.be_.upload(own, host.data());
    m.forward_mtp_rank(b, own);
  });
  return out;
}

ForwardOutput Model::forward_mtp_rank(std::span<const ForwardSeq> batch, const Tensor& streams) {
  Plan p = plan(batch, true);
  const int64_t n = p.T, m = cfg_.hc_mult, D = cfg_.hidden_size;
  DSV4_CHECK(streams.dim(0) == n);
  const MtpWeights& mw = w_.mtp[0];
  const float ne = eps(cfg_.rms_norm_eps);

  // X_k = e_proj(enorm(embed(next))) + h_proj(hnorm(streams_k)).
  Tensor e = be_.alloc({n, D}), ep = be_.alloc({n, D});
  be_.embed(*w_.embed, p.ids, e);
  be_.rms_norm(e, mw.enorm, ne, e);
  be_.linear(e, mw.e_proj, ep);
  Tensor h = be_.alloc({n * m, D}), X = be_.alloc({n, m, D});
  be_.rms_norm(streams.reshaped({n * m, D}), mw.hnorm, ne, h);
  be_.linear(h, mw.h_proj, X.reshaped({n * m, D}));
  be_.broadcast_streams(ep, X, true);
  X = block(mw.block, p.store->mtp_layers[0], p, X);
  for (const ForwardSeq& f : batch) f.state->mtp_tokens += int64_t(f.tokens.size()) - f.draft_rows;
  ForwardOutput out;
  if (p.n_streams) out.streams = select_rows(be_, X, p.stream_rows, p.n_streams);
  if (p.n_logits) out.logits = logits(select_rows(be_, X, p.logit_rows, p.n_logits), mw.hc_head, *mw.norm);
  return out;
}

}  // namespace dsv4

namespace dsv4 {

std::vector<float> run_chunked(Model& model, std::span<const int32_t> tokens, std::span<const int64_t> chunks,
                               bool mtp) {
  const int64_t T = int64_t(tokens.size()), V = model.config().vocab_size;
  if (T == 0) fail("--tokens: the token list is empty");
  std::vector<int64_t> sizes(chunks.begin(), chunks.end());
  if (sizes.empty()) sizes.push_back(T);
  int64_t sum = 0;
  for (auto c : sizes) {
    if (c <= 0) fail("--chunks: chunk sizes must be positive, got {}", c);
    sum += c;
  }
  if (sum != T) fail("--chunks: chunk sizes sum to {} but there are {} tokens", sum, T);
  if (mtp && T < 2) fail("--mtp needs at least 2 tokens (the MTP block reads the token after each position)");
  Backend& be = model.backend();
  SequenceState st = model.new_sequence(T);
  std::vector<float> out(size_t((mtp ? T - 1 : T) * V));
  std::vector<Tensor> streams;
  int64_t at = 0;
  for (auto c : sizes) {
    Tensor X;
    Tensor lg = model.forward(st, tokens.subspan(at, c), mtp ? &X : nullptr);
    if (!mtp) be.download(lg, out.data() + at * V);
    else streams.push_back(X);
    at += c;
  }
  if (!mtp) return out;
  // The MTP block runs on the same chunk boundaries, one position behind the main model.
  at = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = std::min(sizes[i], T - 1 - at);
    if (n <= 0) break;
    Tensor lg = model.forward_mtp(st, streams[i].rows_view(0, n), tokens.subspan(at + 1, n));
    be.download(lg, out.data() + at * V);
    at += n;
  }
  return out;
}

}  // namespace dsv4
