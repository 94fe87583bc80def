#include "engine/mtp_drafter.h"

#include <algorithm>

#include "util/error.h"

namespace dsv4 {

namespace {
Tensor upload_rows(Backend& be, const std::vector<int32_t>& v) {
  Tensor t = be.alloc({int64_t(v.size())}, ElemType::I32);
  be.upload(t, v.data());
  return t;
}
}  // namespace

std::vector<MtpDrafter::Drafts> MtpDrafter::run(std::span<Item> items, const Tensor& streams) {
  std::vector<Drafts> result(items.size());
  if (items.empty()) return result;
  Backend& be = model_.backend();
  const ModelConfig& cfg = model_.config();
  const int64_t m = cfg.hc_mult, D = cfg.hidden_size, V = cfg.vocab_size;
  StateStore& store = *items[0].state->store;
  const Tensor flat = streams.reshaped({streams.dim(0), m * D});
  const int64_t stream_rows = flat.dim(0);

  // Pass 0: every item's committed catch-up rows (positions mtp_tokens .. num_tokens - 2), then,
  // for items that draft, row 0 of the chain (position num_tokens - 1, never committed).
  std::vector<ForwardSeq> batch;
  std::vector<size_t> in_batch;  // item of each batch entry
  std::vector<int32_t> pending_dest(size_t(store.num_slots), -1), main_dest(size_t(stream_rows), -1),
      new_pending(size_t(stream_rows), -1);
  int64_t R = 0;
  int32_t max_drafts = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    Item& it = items[i];
    const SequenceState& st = *it.state;
    const int64_t N = st.num_tokens, P0 = st.mtp_tokens, catch_up = N - 1 - P0;
    DSV4_CHECK(catch_up >= 0 && P0 + 1 >= it.pass_start && int64_t(it.next_tokens.size()) >= catch_up);
    if (it.drafts > 0 && int64_t(it.next_tokens.size()) < catch_up + 1) fail("mtp drafter: the next token is unknown");
    max_drafts = std::max(max_drafts, it.drafts);
    // The streams of position N - 1 become the slot's pending row (after it has been read below).
    if (N - 1 >= it.pass_start) new_pending[size_t(it.stream_first + N - 1 - it.pass_start)] = st.slot;
    const int64_t rows = catch_up + (it.drafts > 0 ? 1 : 0);
    if (rows == 0) continue;
    for (int64_t p = P0; p < P0 + rows; ++p, ++R) {
      if (p < it.pass_start) pending_dest[size_t(st.slot)] = int32_t(R);
      else main_dest[size_t(it.stream_first + p - it.pass_start)] = int32_t(R);
    }
    ForwardSeq f;
    f.state = it.state;
    f.tokens = std::span<const int32_t>(it.next_tokens).first(size_t(rows));
    f.logit_rows = it.drafts > 0 ? 1 : 0;
    f.stream_rows = it.drafts > 1 ? 1 : 0;
    f.draft_rows = it.drafts > 0 ? 1 : 0;
    batch.push_back(f);
    in_batch.push_back(i);
  }
  Tensor X;
  if (R) {
    X = be.alloc({R, m * D});
    be.store_rows(store.mtp_stream, upload_rows(be, pending_dest), 0, X);
    be.store_rows(flat, upload_rows(be, main_dest), 0, X);
  }
  be.store_rows(flat, upload_rows(be, new_pending), 0, store.mtp_stream);
  if (batch.empty()) return result;

  // Chain inputs: row c * max_drafts + j holds the streams fed to chain row j of drafting item c.
  std::vector<int64_t> chain_of(items.size(), -1);
  int64_t n_chain = 0;
  std::vector<int32_t> chain_first_dest(size_t(stream_rows), -1);
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].drafts > 1) {
      chain_of[i] = n_chain;
      const int64_t N = items[i].state->num_tokens;
      chain_first_dest[size_t(items[i].stream_first + N - 1 - items[i].pass_start)] = int32_t(n_chain * max_drafts);
      ++n_chain;
    }
  Tensor chain;
  if (n_chain) {
    chain = be.alloc({n_chain * max_drafts, m * D});
    be.store_rows(flat, upload_rows(be, chain_first_dest), 0, chain);
  }
  std::vector<std::vector<int32_t>> chain_tokens(items.size());
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].drafts > 0) {
      const int64_t catch_up = items[i].state->num_tokens - 1 - items[i].state->mtp_tokens;
      chain_tokens[i] = {items[i].next_tokens[size_t(catch_up)]};
    }

  std::vector<float> host;
  for (int32_t j = 0;; ++j) {
    ForwardOutput out = model_.forward_mtp(batch, X.reshaped({X.dim(0), m, D}));
    // Draft j + 1 of every item in the batch that asked for logits.
    std::vector<size_t> drafting;
    for (size_t b = 0; b < batch.size(); ++b)
      if (batch[b].logit_rows) drafting.push_back(in_batch[b]);
    if (drafting.empty()) break;
    host.resize(drafting.size() * size_t(V));
    be.download(out.logits, host.data());
    std::vector<int32_t> out_dest;
    for (size_t d = 0; d < drafting.size(); ++d) {
      Item& it = items[drafting[d]];
      Drafts& r = result[drafting[d]];
      r.probs.emplace_back();
      const int32_t tok = draft_token(std::span(host).subspan(d * size_t(V), size_t(V)), *it.params, *it.sampler,
                                      r.probs.back());
      r.tokens.push_back(tok);
      chain_tokens[drafting[d]].push_back(tok);
      if (it.drafts > j + 1) out_dest.push_back(int32_t(chain_of[drafting[d]] * max_drafts + j + 1));
    }
    if (j + 1 >= max_drafts) break;
    if (!out_dest.empty()) be.store_rows(out.streams.reshaped({out.streams.dim(0), m * D}), upload_rows(be, out_dest), 0, chain);
    // Pass j + 1: chain rows 0 .. j + 1 of the items that want more drafts.
    batch.clear();
    in_batch.clear();
    std::vector<int32_t> rows;
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].drafts <= j + 1) continue;
      ForwardSeq f;
      f.state = items[i].state;
      f.tokens = chain_tokens[i];
      f.logit_rows = 1;
      f.stream_rows = items[i].drafts > j + 2 ? 1 : 0;
      f.draft_rows = int64_t(chain_tokens[i].size());
      batch.push_back(f);
      in_batch.push_back(i);
      for (int64_t k = 0; k <= j + 1; ++k) rows.push_back(int32_t(chain_of[i] * max_drafts + k));
    }
    X = be.alloc({int64_t(rows.size()), m * D});
    be.gather_rows(chain, upload_rows(be, rows), X);
  }
  return result;
}

}  // namespace dsv4
