#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.h"

namespace dsv4 {

namespace {
float eps(double e) { return float(e); }
}  // namespace

Model::Model(const ModelConfig& cfg, const ModelWeights& w, Backend& backend)
    : cfg_(cfg), w_(w), be_(backend), rope_main_(make_rope_table(cfg, false)), rope_compressed_(make_rope_table(cfg, true)) {
  be_.prepare_weights(w_);
}

Tensor Model::alloc_kv_store(int64_t rows, KvFormat kv) const {
  if (kv == KvFormat::FP8) return be_.alloc({rows, kv_row_layout(cfg_.head_dim, cfg_.nope_dim()).bytes}, ElemType::U8);
  return be_.alloc({rows, cfg_.head_dim});
}

LayerState Model::new_layer_state(int64_t layer, int64_t block_tokens, bool pools, KvFormat kv) const {
  LayerState s;
  s.window = alloc_kv_store(cfg_.sliding_window, kv);
  const int64_t ratio = cfg_.compress_ratio(layer);
  if (!ratio) return s;
  auto comp_state = [&](int64_t d, bool overlap) {
    CompressorState c;
    const int64_t coff = overlap ? 2 : 1;
    c.kv = be_.alloc({ratio, coff * d});
    c.gate = be_.alloc({ratio, coff * d});
    if (overlap) {
      c.prev_kv = be_.alloc({ratio, d});
      c.prev_gate = be_.alloc({ratio, d});
    }
    return c;
  };
  const bool csa = cfg_.attn_kind(layer) == AttnKind::CSA;
  if (pools) s.entries = alloc_kv_store(block_tokens / ratio, kv);
  s.compressor = comp_state(cfg_.head_dim, csa);
  if (csa) {
    if (pools) s.index_keys = be_.alloc({block_tokens / ratio, cfg_.index_head_dim});
    s.index_compressor = comp_state(cfg_.index_head_dim, true);
  }
  return s;
}

int64_t Model::block_granularity() const {
  int64_t g = 1;
  for (int64_t l = 0; l < cfg_.total_layers(); ++l)
    if (int64_t r = cfg_.compress_ratio(l)) g = std::lcm(g, r);
  return g;
}

SequenceState Model::new_sequence(int64_t capacity) const {
  if (capacity <= 0) fail("sequence capacity must be positive, got {}", capacity);
  const int64_t g = block_granularity();
  SequenceState s;
  s.kv = kv_format_;
  s.capacity = capacity;
  s.block_tokens = (capacity + g - 1) / g * g;
  s.blocks = {0};
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) s.layers.push_back(new_layer_state(l, s.block_tokens, true, s.kv));
  for (int64_t i = 0; i < cfg_.num_nextn_predict_layers; ++i)
    s.mtp_layers.push_back(new_layer_state(cfg_.num_hidden_layers + i, s.block_tokens, true, s.kv));
  return s;
}

SequenceState Model::new_sequence_tail(bool mtp, KvFormat kv) const {
  SequenceState s;
  s.kv = kv;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) s.layers.push_back(new_layer_state(l, 0, false, kv));
  if (mtp)
    for (int64_t i = 0; i < cfg_.num_nextn_predict_layers; ++i)
      s.mtp_layers.push_back(new_layer_state(cfg_.num_hidden_layers + i, 0, false, kv));
  return s;
}

std::vector<int32_t> Model::paged_rows(const Paging& pg, int64_t ratio, int64_t n, int64_t& base) const {
  const int64_t per = pg.block_tokens / ratio;
  const int64_t nb = (n + per - 1) / per;
  if (nb > int64_t(pg.blocks.size())) fail("sequence longer than its state capacity ({} blocks)", pg.blocks.size());
  bool contiguous = true;
  for (int64_t i = 1; i < nb; ++i) contiguous = contiguous && pg.blocks[i] == pg.blocks[0] + i;
  base = int64_t(pg.blocks[0]) * per;
  if (contiguous) return {};
  std::vector<int32_t> rows(n);
  for (int64_t j = 0; j < n; ++j) rows[j] = int32_t(int64_t(pg.blocks[j / per]) * per + j % per);
  return rows;
}

Tensor Model::read_paged(const Tensor& store, const Paging& pg, int64_t ratio, int64_t n) {
  DSV4_CHECK(store.type == ElemType::F32);
  if (n == 0) return store.rows_view(0, 0);
  int64_t base = 0;
  const std::vector<int32_t> rows = paged_rows(pg, ratio, n, base);
  if (rows.empty()) return store.rows_view(base, base + n);
  Tensor out = be_.alloc({n, store.cols()});
  be_.gather_rows(store, int_tensor(rows, {n}), out);
  return out;
}

void Model::read_paged_into(const Tensor& store, const Paging& pg, int64_t ratio, int64_t n, const Tensor& out) {
  DSV4_CHECK(out.rows() == n);
  if (n == 0) return;
  if (store.type != ElemType::U8) {
    be_.copy(read_paged(store, pg, ratio, n), out);
    return;
  }
  int64_t base = 0;
  const std::vector<int32_t> rows = paged_rows(pg, ratio, n, base);
  if (rows.empty()) be_.unpack_kv(store.rows_view(base, base + n), Tensor{}, cfg_.nope_dim(), out);
  else be_.unpack_kv(store, int_tensor(rows, {n}), cfg_.nope_dim(), out);
}

void Model::write_paged(const Tensor& rows, const Tensor& store, const Paging& pg, int64_t ratio, int64_t first) {
  const int64_t per = pg.block_tokens / ratio, n = rows.dim(0);
  for (int64_t j = 0; j < n;) {
    const int64_t b = (first + j) / per, off = (first + j) % per, len = std::min(n - j, per - off);
    if (b >= int64_t(pg.blocks.size())) fail("sequence longer than its state capacity ({} tokens)", pg.blocks.size() * pg.block_tokens);
    const int64_t row = int64_t(pg.blocks[b]) * per + off;
    if (store.type == ElemType::U8) be_.pack_kv(rows.rows_view(j, j + len), cfg_.nope_dim(), store.rows_view(row, row + len));
    else be_.copy(rows.rows_view(j, j + len), store.rows_view(row, row + len));
    j += len;
  }
}

Tensor Model::int_tensor(const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  Tensor t = be_.alloc(std::move(shape), ElemType::I32);
  DSV4_CHECK(t.numel() == int64_t(v.size()));
  if (!v.empty()) be_.upload(t, v.data());
  return t;
}

// Runs one compressor over the chunk and returns its finished entries (normed, RoPE'd at the
// position of each window's first token); the caller stores them.
Tensor Model::compress(const CompressorWeights& c, CompressorState& cs, const Tensor& x, int64_t start,
                       int64_t first_entry) {
  const int64_t T = x.dim(0), width = (c.overlap ? 2 : 1) * c.head_dim;
  Tensor kv = be_.alloc({T, width}), gate = be_.alloc({T, width});
  const Linear wkv = dense_linear(*c.wkv);
  const Linear wgate = dense_linear(*c.wgate);
  be_.linear(x, wkv, kv);
  be_.linear(x, wgate, gate);
  Tensor fresh = be_.alloc({T / c.ratio + 1, c.head_dim});
  const int64_t n = be_.compress(kv, gate, *c.ape, start, c.ratio, c.overlap, cs, fresh);
  if (!n) return {};
  Tensor out = fresh.rows_view(0, n);
  be_.rms_norm(out, c.norm, eps(cfg_.rms_norm_eps), out);
  std::vector<int32_t> pos(n);
  for (int64_t j = 0; j < n; ++j) pos[j] = int32_t((first_entry + j) * c.ratio);
  be_.rope(out.reshaped({n, 1, c.head_dim}), int_tensor(pos, {n}), rope_compressed_, cfg_.rope_dim(), false);
  return out;
}

Tensor Model::attention(const AttentionWeights& a, LayerState& st, const Paging& pg, KvFormat kvf, const Tensor& x,
                        const Tensor& pos, int64_t start) {
  const int64_t T = x.dim(0), H = cfg_.num_attention_heads, hd = cfg_.head_dim, W = cfg_.sliding_window;
  const RopeTable& rope = a.has_compressor ? rope_compressed_ : rope_main_;
  const bool packed = kvf == KvFormat::FP8, simulated = kvf == KvFormat::FP8Simulated;
  DSV4_CHECK((st.window.type == ElemType::U8) == packed);

  // Queries: low-rank latent, per-head unweighted RMSNorm, RoPE on the last rope dims.
  Tensor cq = be_.alloc({T, cfg_.q_lora_rank});
  be_.linear(x, a.wq_a, cq);
  be_.rms_norm(cq, a.q_norm, eps(cfg_.rms_norm_eps), cq);
  Tensor q = be_.alloc({T, H, hd});
  be_.linear(cq, a.wq_b, q.reshaped({T, H * hd}));
  be_.rms_norm(q, nullptr, eps(cfg_.rms_norm_eps), q);
  be_.rope(q, pos, rope, cfg_.rope_dim(), false);

  // The single shared key/value head.
  Tensor kv = be_.alloc({T, hd});
  be_.linear(x, a.wkv, kv);
  be_.rms_norm(kv, a.kv_norm, eps(cfg_.rms_norm_eps), kv);
  be_.rope(kv.reshaped({T, 1, hd}), pos, rope, cfg_.rope_dim(), false);
  // FP8: this chunk's rows as stored; attention (this chunk included) reads what they decode to.
  Tensor kv_rows;
  if (packed) {
    kv_rows = alloc_kv_store(T, kvf);
    be_.pack_kv(kv, cfg_.nope_dim(), kv_rows);
    be_.unpack_kv(kv_rows, Tensor{}, cfg_.nope_dim(), kv);
  } else if (simulated) {
    be_.quantize_kv(kv, cfg_.nope_dim());
  }

  // Compressed entries completed by this chunk; the indexer picks among them per query.
  const int64_t n_before = st.num_entries;
  Tensor compressed_idx;
  if (a.has_compressor) {
    const int64_t ratio = a.compressor.ratio;
    Tensor fresh = compress(a.compressor, st.compressor, x, start, n_before);
    const int64_t n_new = fresh.empty() ? 0 : fresh.dim(0);
    if (simulated && n_new) be_.quantize_kv(fresh, cfg_.nope_dim());
    if (n_new) write_paged(fresh, st.entries, pg, ratio, n_before);
    if (a.has_indexer) {
      const auto& ix = a.indexer;
      Tensor fresh_keys = compress(ix.compressor, st.index_compressor, x, start, n_before);
      DSV4_CHECK((fresh_keys.empty() ? 0 : fresh_keys.dim(0)) == n_new);
      if (n_new) write_paged(fresh_keys, st.index_keys, pg, ratio, n_before);
      const int64_t Hi = cfg_.index_n_heads, di = cfg_.index_head_dim;
      Tensor qi = be_.alloc({T, Hi, di});
      be_.linear(cq, ix.wq_b, qi.reshaped({T, Hi * di}));
      be_.rope(qi, pos, rope_compressed_, cfg_.rope_dim(), false);
      Tensor wi = be_.alloc({T, Hi});
      be_.linear(x, dense_linear(*ix.weights_proj), wi);
      std::vector<int32_t> usable(T);
      for (int64_t t = 0; t < T; ++t) usable[t] = int32_t((start + t + 1) / a.compressor.ratio);
      const int64_t k = std::min<int64_t>(cfg_.index_topk, std::max<int64_t>(usable.back(), 1));
      compressed_idx = be_.alloc({T, k}, ElemType::I32);
      const float w_scale = 1.f / std::sqrt(float(Hi)) / std::sqrt(float(di));
      be_.index_topk(qi, wi, w_scale, read_paged(st.index_keys, pg, ratio, n_before + n_new),
                     int_tensor(usable, {T}), compressed_idx);
    } else {
      // HCA: every complete window is visible.
      const int64_t total = n_before + n_new;
      std::vector<int32_t> idx(T * std::max<int64_t>(total, 1), -1);
      const int64_t K = std::max<int64_t>(total, 1);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t usable = (start + t + 1) / a.compressor.ratio;
        for (int64_t j = 0; j < usable; ++j) idx[t * K + j] = int32_t(j);
      }
      compressed_idx = int_tensor(idx, {T, K});
    }
    st.num_entries = n_before + n_new;
  }

  // Key pool: [compressed entries | window keys before this chunk | this chunk's keys].
  const int64_t n_entries = st.num_entries, prior = std::min(start, W - 1);
  Tensor pool = be_.alloc({n_entries + prior + T, hd});
  if (n_entries) read_paged_into(st.entries, pg, a.compressor.ratio, n_entries, pool.rows_view(0, n_entries));
  if (prior) {
    std::vector<int32_t> slots(prior);
    for (int64_t i = 0; i < prior; ++i) slots[i] = int32_t((start - prior + i) % W);
    const Tensor dst = pool.rows_view(n_entries, n_entries + prior);
    if (packed) be_.unpack_kv(st.window, int_tensor(slots, {prior}), cfg_.nope_dim(), dst);
    else be_.gather_rows(st.window, int_tensor(slots, {prior}), dst);
  }
  be_.copy(kv, pool.rows_view(n_entries + prior, n_entries + prior + T));
  // Window: positions max(0, p - W + 1) .. p, the current token included.
  std::vector<int32_t> widx(T * W, -1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = start + t, lo = std::max<int64_t>(0, p - W + 1);
    for (int64_t s = lo; s <= p; ++s) widx[t * W + (s - lo)] = int32_t(n_entries + (s - (start - prior)));
  }
  Tensor o = be_.alloc({T, H, hd});
  be_.attend(q, pool, int_tensor(widx, {T, W}), compressed_idx, *a.attn_sink, 1.f / std::sqrt(float(hd)), o);

  // Keep the last W keys for the next chunk (as stored: the packed rows in FP8), in at most two
  // runs of ring slots.
  const Tensor& keep = packed ? kv_rows : kv;
  for (int64_t t = std::max<int64_t>(0, T - W); t < T;) {
    const int64_t slot = (start + t) % W, len = std::min(T - t, W - slot);
    be_.copy(keep.rows_view(t, t + len), st.window.rows_view(slot, slot + len));
    t += len;
  }

  // Undo the rotation of the values' RoPE dims at the query position, then the grouped projection.
  be_.rope(o, pos, rope, cfg_.rope_dim(), true);
  const int64_t G = cfg_.o_groups;
  Tensor z = be_.alloc({T, G, cfg_.o_lora_rank});
  be_.grouped_linear(o.reshaped({T, G, H / G * hd}), a.wo_a, G, z);
  Tensor out = be_.alloc({T, cfg_.hidden_size});
  be_.linear(z.reshaped({T, G * cfg_.o_lora_rank}), a.wo_b, out);
  return out;
}

Tensor Model::block(const BlockWeights& b, LayerState& st, const Paging& pg, KvFormat kvf, const Tensor& X,
                    const Tensor& tokens, const Tensor& pos, int64_t start) {
  const int64_t T = X.dim(0), m = cfg_.hc_mult, D = cfg_.hidden_size;
  const float ne = eps(cfg_.rms_norm_eps), he = eps(cfg_.hc_eps);
  Tensor u = be_.alloc({T, D}), post = be_.alloc({T, m}), comb = be_.alloc({T, m, m});
  be_.hc_pre(X, b.hc_attn, cfg_.hc_sinkhorn_iters, he, ne, u, post, comb);
  be_.rms_norm(u, b.attn_norm, ne, u);
  Tensor y = attention(b.attn, st, pg, kvf, u, pos, start);
  Tensor X1 = be_.alloc({T, m, D});
  be_.hc_post(y, X, post, comb, X1);

  be_.hc_pre(X1, b.hc_ffn, cfg_.hc_sinkhorn_iters, he, ne, u, post, comb);
  be_.rms_norm(u, b.ffn_norm, ne, u);
  const int64_t k = cfg_.num_experts_per_tok;
  Tensor gw = be_.alloc({T, k}), ge = be_.alloc({T, k}, ElemType::I32);
  be_.route(u, b.ffn, tokens, cfg_, gw, ge);
  Tensor f = be_.alloc({T, D});
  be_.moe(u, b.ffn, gw, ge, float(cfg_.swiglu_limit), f);
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

Tensor Model::forward(SequenceState& st, std::span<const int32_t> tokens, Tensor* streams) {
  const int64_t T = int64_t(tokens.size()), start = st.num_tokens;
  if (T == 0) fail("forward: empty token list");
  if (start + T > st.capacity) fail("forward: {} tokens exceed the sequence capacity of {}", start + T, st.capacity);
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= cfg_.vocab_size)
      fail("token id {} at position {} is out of range (vocab size {})", tokens[t], start + t, cfg_.vocab_size);
  Tensor ids = int_tensor(std::vector<int32_t>(tokens.begin(), tokens.end()), {T});
  std::vector<int32_t> p(T);
  for (int64_t t = 0; t < T; ++t) p[t] = int32_t(start + t);
  Tensor pos = int_tensor(p, {T});

  Tensor e = be_.alloc({T, cfg_.hidden_size});
  be_.embed(*w_.embed, ids, e);
  Tensor X = be_.alloc({T, cfg_.hc_mult, cfg_.hidden_size});
  be_.broadcast_streams(e, X, false);
  const Paging pg{st.blocks, st.block_tokens};
  for (size_t l = 0; l < w_.layers.size(); ++l) X = block(w_.layers[l], st.layers[l], pg, st.kv, X, ids, pos, start);
  st.num_tokens += T;
  if (streams) *streams = X;
  return logits(X, w_.hc_head, *w_.norm);
}

Tensor Model::forward_mtp(SequenceState& st, const Tensor& streams, std::span<const int32_t> next_tokens) {
  if (w_.mtp.empty()) fail("this model has no MTP block (num_nextn_predict_layers = 0)");
  const int64_t n = int64_t(next_tokens.size()), start = st.mtp_tokens, m = cfg_.hc_mult, D = cfg_.hidden_size;
  DSV4_CHECK(streams.dim(0) == n);
  if (start + n > st.num_tokens) fail("forward_mtp: positions {}..{} have not been run by the main model", start, start + n - 1);
  for (int64_t t = 0; t < n; ++t)
    if (next_tokens[t] < 0 || next_tokens[t] >= cfg_.vocab_size)
      fail("token id {} is out of range (vocab size {})", next_tokens[t], cfg_.vocab_size);
  const MtpWeights& mw = w_.mtp[0];
  const float ne = eps(cfg_.rms_norm_eps);
  Tensor ids = int_tensor(std::vector<int32_t>(next_tokens.begin(), next_tokens.end()), {n});
  std::vector<int32_t> p(n);
  for (int64_t t = 0; t < n; ++t) p[t] = int32_t(start + t);
  Tensor pos = int_tensor(p, {n});

  // X_k = e_proj(enorm(embed(next))) + h_proj(hnorm(streams_k)).
  Tensor e = be_.alloc({n, D}), ep = be_.alloc({n, D});
  be_.embed(*w_.embed, ids, e);
  be_.rms_norm(e, mw.enorm, ne, e);
  be_.linear(e, mw.e_proj, ep);
  Tensor h = be_.alloc({n * m, D}), X = be_.alloc({n, m, D});
  be_.rms_norm(streams.reshaped({n * m, D}), mw.hnorm, ne, h);
  be_.linear(h, mw.h_proj, X.reshaped({n * m, D}));
  be_.broadcast_streams(ep, X, true);
  const Paging pg{st.blocks, st.block_tokens};
  X = block(mw.block, st.mtp_layers[0], pg, st.kv, X, ids, pos, start);
  st.mtp_tokens += n;
  return logits(X, mw.hc_head, *mw.norm);
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
