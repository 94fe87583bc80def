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
  for (int pass = 0; pass < 3; ++pass)
    for (const Item& it : items) {
      const int group = it.on_device ? 0 : it.sampled || it.scored ? 1 : 2;
      if (group != pass) continue;
      const int64_t rows = it.scored ? int64_t(it.tokens.size()) : it.sampled ? 1 : 0;
      batch.push_back({it.state, it.tokens, rows, 0});
      if (group == 0) {
        params.insert(params.end(), it.params, it.params + kSampleParams);
        uniforms.push_back(it.uniform);
      }
    }
  const int64_t n_dev = int64_t(uniforms.size());
  ForwardOutput out = model_.forward(batch);
  Result r;
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
