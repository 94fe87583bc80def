#include "engine/model_runner.h"

#include "util/error.h"

namespace dsv4 {

ModelRunner::Result ModelRunner::run(std::span<const Item> items, bool with_device_rows) {
  Backend& be = model_.backend();
  const int64_t V = model_.config().vocab_size;
  // Logit rows come out in batch order: device-sampled sequences first, then host-sampled and
  // scored ones, so that each group is one contiguous block of rows.
  std::vector<ForwardSeq> batch;
  batch.reserve(items.size());
  std::vector<float> params, uniforms;
  std::vector<size_t> order;  // item of each batch entry
  for (int pass = 0; pass < 3; ++pass)
    for (const Item& it : items) {
      const int group = it.on_device ? 0 : it.sampled || it.scored ? 1 : 2;
      if (group != pass) continue;
      DSV4_CHECK(!(it.draft_rows && (it.on_device || !it.sampled || it.scored)));
      order.push_back(size_t(&it - items.data()));
      const int64_t len = int64_t(it.tokens.size());
      const int64_t rows = it.scored ? len : it.sampled ? 1 + it.draft_rows : 0;
      batch.push_back({it.state, it.tokens, rows, it.keep_streams ? len : 0, it.draft_rows});
      if (group == 0) {
        params.insert(params.end(), it.params, it.params + kSampleParams);
        uniforms.push_back(it.uniform);
      }
    }
  const int64_t n_dev = int64_t(uniforms.size());
  ForwardOutput out = model_.forward(batch);
  Result r;
  r.streams = out.streams;
  r.drafts = std::move(out.drafts);
  r.stream_first.assign(items.size(), -1);
  for (size_t b = 0, row = 0; b < batch.size(); ++b)
    if (batch[b].stream_rows) {
      r.stream_first[order[b]] = int64_t(row);
      row += size_t(batch[b].stream_rows);
    }
  const int64_t n_rows = out.logits.empty() ? 0 : out.logits.dim(0);
  if (n_dev) {
    Tensor p = be.alloc({n_dev, kSampleParams}), u = be.alloc({n_dev}), t = be.alloc({n_dev}, ElemType::I32);
    be.upload(p, params.data());
    be.upload(u, uniforms.data());
    be.sample(out.logits.rows_view(0, n_dev), p, u, t);
    r.device_tokens.resize(size_t(n_dev));
    be.download(t, r.device_tokens.data());
  }
  const int64_t first = with_device_rows ? 0 : n_dev;
  if (n_rows > first) {
    r.host_logits.resize(size_t((n_rows - first) * V));
    be.download(out.logits.rows_view(first, n_rows), r.host_logits.data());
  }
  return r;
}

}  // namespace dsv4
