// The FP32 reference backend: every op written plainly, parallel over rows with OpenMP.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "tensor/index_qat.h"
#include "tensor/kv_format.h"
#include "tensor/numeric.h"
#include "tensor/quant.h"

namespace dsv4 {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

// Element i of a tensor that may sit at any byte offset of a mapped checkpoint (no alignment).
template <class T>
T unaligned_at(const void* data, int64_t i) {
  T v;
  std::memcpy(&v, static_cast<const char*>(data) + i * int64_t(sizeof(T)), sizeof(T));
  return v;
}

// A weight row as float32, whatever the storage format.
void weight_row(const Linear& w, int64_t r, float* out) {
  switch (w.format) {
    case WeightFormat::FP8:
      dequant_fp8_rows(w.weight->data, w.scale->dtype, w.scale->data, w.out, w.in, r, r + 1, out);
      break;
    case WeightFormat::FP4:
      dequant_fp4_rows(w.weight->data, w.scale->dtype, w.scale->data, w.in, r, r + 1, out);
      break;
    case WeightFormat::BF16:
      if (w.weight->dtype == DType::F32) {
        std::memcpy(out, w.weight->data + r * w.in * 4, w.in * 4);
      } else {
        for (int64_t i = 0; i < w.in; ++i) out[i] = bf16_to_f32(unaligned_at<uint16_t>(w.weight->data, r * w.in + i));
      }
      break;
  }
}

float tensor_value(const TensorData& t, int64_t i) {
  switch (t.dtype) {
    case DType::F32: return unaligned_at<float>(t.data, i);
    case DType::BF16: return bf16_to_f32(unaligned_at<uint16_t>(t.data, i));
    default: fail("tensor '{}': expected F32 or BF16, got {}", t.name, dtype_name(t.dtype));
  }
}

int64_t tensor_int(const TensorData& t, int64_t i) {
  switch (t.dtype) {
    case DType::I32: return unaligned_at<int32_t>(t.data, i);
    case DType::I64: return unaligned_at<int64_t>(t.data, i);
    default: fail("tensor '{}': expected I32 or I64, got {}", t.name, dtype_name(t.dtype));
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// y[r] = W x[r] for rows r; W dequantised row by row (each output row once). With quantise, x
// rows are first replaced by their FP8 round trip: the products of E4M3 (or E2M1) weights and
// E4M3 activations are exact in FP32, so this is the official FP8 GEMM up to summation order.
void matmul(const float* x, int64_t rows, const Linear& w, float* y, int64_t y_stride, bool quantise = false,
            bool pow2 = false) {
  std::vector<float> xq;
  if (quantise) {
    xq.resize(size_t(rows * w.in));
#pragma omp parallel for if (rows > 1)
    for (int64_t r = 0; r < rows; ++r)
      fp8_dynamic_quant(x + r * w.in, w.in, kActBlock, pow2, nullptr, nullptr, xq.data() + r * w.in);
    x = xq.data();
  }
#pragma omp parallel if (rows * w.out * w.in > kParallelWork)
  {
    std::vector<float> wr(w.in);
#pragma omp for schedule(static)
    for (int64_t o = 0; o < w.out; ++o) {
      weight_row(w, o, wr.data());
      for (int64_t r = 0; r < rows; ++r) y[r * y_stride + o] = dot(x + r * w.in, wr.data(), w.in);
    }
  }
}

// Mixing logits mu = rsqrt(mean(x^2) + eps) * (fn x) for the flattened streams of one token.
void hc_mix(const float* x, int64_t n, const HyperConn& hc, int64_t mix, float norm_eps, float* mu) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float rs = 1.f / std::sqrt(float(ss / double(n)) + norm_eps);
  for (int64_t j = 0; j < mix; ++j) {  // fn (F32) may sit at any offset of the checkpoint
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += unaligned_at<float>(hc.fn->data, j * n + i) * x[i];
    mu[j] = s * rs;
  }
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  Tensor alloc(std::vector<int64_t> shape, ElemType type) override {
    Tensor t;
    t.type = type;
    t.shape = std::move(shape);
    const size_t bytes = size_t(std::max<int64_t>(t.numel(), 1) * elem_size(type));
    t.storage = std::shared_ptr<uint8_t>(new uint8_t[bytes], std::default_delete<uint8_t[]>());
    // Poison: any element an op forgets to write shows up as NaN (or a wild index).
    std::memset(t.storage.get(), 0xff, bytes);
    return t;
  }
  void upload(const Tensor& dst, const void* src) override { std::memcpy(dst.storage.get() + dst.offset, src, size_t(dst.nbytes())); }
  void download(const Tensor& src, void* dst) override { std::memcpy(dst, src.storage.get() + src.offset, size_t(src.nbytes())); }
  void fill(const Tensor& t, float v) override { std::fill_n(t.f32(), t.numel(), v); }
  void copy(const Tensor& src, const Tensor& dst) override {
    DSV4_CHECK(src.numel() == dst.numel() && elem_size(src.type) == elem_size(dst.type));
    std::memmove(dst.storage.get() + dst.offset, src.storage.get() + src.offset, size_t(src.nbytes()));
  }

  void embed(const TensorData& table, const Tensor& ids, const Tensor& out) override {
    const int64_t d = table.shape[1], n = ids.numel();
#pragma omp parallel for
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < d; ++i) out.f32()[t * d + i] = tensor_value(table, int64_t(ids.i32()[t]) * d + i);
  }

  void rms_norm(const Tensor& x, const TensorData* w, float eps, const Tensor& out) override {
    const int64_t d = x.cols(), rows = x.rows();
#pragma omp parallel for
    for (int64_t r = 0; r < rows; ++r) {
      const float* xi = x.f32() + r * d;
      float* yo = out.f32() + r * d;
      float ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += xi[i] * xi[i];
      const float rs = 1.f / std::sqrt(ss / float(d) + eps);
      for (int64_t i = 0; i < d; ++i) yo[i] = xi[i] * rs * (w ? tensor_value(*w, i) : 1.f);
    }
  }

  void linear(const Tensor& x, const Linear& w, const Tensor& out) override {
    DSV4_CHECK(x.cols() == w.in && out.cols() == w.out && x.rows() == out.rows());
    matmul(x.f32(), x.rows(), w, out.f32(), w.out, quantises_input(w), pow2_scales());
  }

  void grouped_linear(const Tensor& x, const Linear& w, int64_t groups, const Tensor& out) override {
    const int64_t T = x.dim(0), in = w.in, R = w.out / groups;
    DSV4_CHECK(x.numel() == T * groups * in && out.numel() == T * groups * R);
#pragma omp parallel
    {
      std::vector<float> wr(in);
#pragma omp for schedule(static)
      for (int64_t o = 0; o < w.out; ++o) {
        weight_row(w, o, wr.data());
        const int64_t g = o / R, r = o % R;
        for (int64_t t = 0; t < T; ++t)
          out.f32()[(t * groups + g) * R + r] = dot(x.f32() + (t * groups + g) * in, wr.data(), in);
      }
    }
  }

  void rope(const Tensor& x, const Tensor& pos, const RopeTable& table, int64_t rope_dim, bool inverse) override {
    const int64_t T = x.dim(0), heads = x.shape.size() == 3 ? x.dim(1) : 1, dim = x.cols();
    const int64_t off = dim - rope_dim;
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      const float p = float(pos.i32()[t]);
      for (int64_t i = 0; i < rope_dim / 2; ++i) {
        const float theta = p * table.inv_freq[i];
        const float c = std::cos(theta), s = inverse ? -std::sin(theta) : std::sin(theta);
        for (int64_t h = 0; h < heads; ++h) {
          float* v = x.f32() + (t * heads + h) * dim + off + 2 * i;
          const float a = v[0], b = v[1];
          v[0] = a * c - b * s;
          v[1] = a * s + b * c;
        }
      }
    }
  }

  void hc_pre(const Tensor& X, const HyperConn& hc, int64_t iters, float hc_eps, float norm_eps, const Tensor& u,
              const Tensor& post, const Tensor& comb) override {
    const int64_t T = X.dim(0), m = X.dim(1), D = X.dim(2), mix = (2 + m) * m;
    const float scale[3] = {tensor_value(*hc.scale, 0), tensor_value(*hc.scale, 1), tensor_value(*hc.scale, 2)};
    std::vector<float> base(static_cast<size_t>(mix));
    for (int64_t k = 0; k < mix; ++k) base[size_t(k)] = tensor_value(*hc.base, k);
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      const float* x = X.f32() + t * m * D;
      std::vector<float> mu(mix), C(m * m);
      hc_mix(x, m * D, hc, mix, norm_eps, mu.data());
      std::vector<float> pre(m);
      for (int64_t k = 0; k < m; ++k) {
        pre[k] = sigmoid(scale[0] * mu[k] + base[k]) + hc_eps;
        post.f32()[t * m + k] = 2.f * sigmoid(scale[1] * mu[m + k] + base[m + k]);
      }
      for (int64_t i = 0; i < m * m; ++i) C[i] = scale[2] * mu[2 * m + i] + base[2 * m + i];
      // Sinkhorn: row softmax (+eps), column normalise, then (row, column) iters-1 times.
      for (int64_t j = 0; j < m; ++j) {
        float mx = kNegInf, s = 0;
        for (int64_t k = 0; k < m; ++k) mx = std::max(mx, C[j * m + k]);
        for (int64_t k = 0; k < m; ++k) s += (C[j * m + k] = std::exp(C[j * m + k] - mx));
        for (int64_t k = 0; k < m; ++k) C[j * m + k] = C[j * m + k] / s + hc_eps;
      }
      auto col_norm = [&] {
        for (int64_t k = 0; k < m; ++k) {
          float s = 0;
          for (int64_t j = 0; j < m; ++j) s += C[j * m + k];
          for (int64_t j = 0; j < m; ++j) C[j * m + k] /= s + hc_eps;
        }
      };
      auto row_norm = [&] {
        for (int64_t j = 0; j < m; ++j) {
          float s = 0;
          for (int64_t k = 0; k < m; ++k) s += C[j * m + k];
          for (int64_t k = 0; k < m; ++k) C[j * m + k] /= s + hc_eps;
        }
      };
      col_norm();
      for (int64_t it = 1; it < iters; ++it) {
        row_norm();
        col_norm();
      }
      std::copy(C.begin(), C.end(), comb.f32() + t * m * m);
      float* uo = u.f32() + t * D;
      for (int64_t d = 0; d < D; ++d) {
        float s = 0;
        for (int64_t k = 0; k < m; ++k) s += pre[k] * x[k * D + d];
        uo[d] = s;
      }
    }
  }

  void hc_post(const Tensor& y, const Tensor& X, const Tensor& post, const Tensor& comb, const Tensor& out) override {
    const int64_t T = X.dim(0), m = X.dim(1), D = X.dim(2);
    DSV4_CHECK(out.storage != X.storage || out.offset != X.offset);
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < m; ++k)
        for (int64_t d = 0; d < D; ++d) {
          float s = post.f32()[t * m + k] * y.f32()[t * D + d];
          for (int64_t j = 0; j < m; ++j) s += comb.f32()[(t * m + j) * m + k] * X.f32()[(t * m + j) * D + d];
          out.f32()[(t * m + k) * D + d] = s;
        }
  }

  void hc_head(const Tensor& X, const HyperConn& hc, float hc_eps, float norm_eps, const Tensor& u) override {
    const int64_t T = X.dim(0), m = X.dim(1), D = X.dim(2);
    const float scale = tensor_value(*hc.scale, 0);
    std::vector<float> base(static_cast<size_t>(m));
    for (int64_t k = 0; k < m; ++k) base[size_t(k)] = tensor_value(*hc.base, k);
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      const float* x = X.f32() + t * m * D;
      std::vector<float> mu(m);
      hc_mix(x, m * D, hc, m, norm_eps, mu.data());
      for (int64_t k = 0; k < m; ++k) mu[k] = sigmoid(scale * mu[k] + base[k]) + hc_eps;
      for (int64_t d = 0; d < D; ++d) {
        float s = 0;
        for (int64_t k = 0; k < m; ++k) s += mu[k] * x[k * D + d];
        u.f32()[t * D + d] = s;
      }
    }
  }

  // F32 rows of a key store for attention: F32 stores are read in place; the rows of a packed store
  // that the index lists reference are decoded once (O(rows read), not O(store)).
  struct KeyRows {
    const float* base = nullptr;    // F32 store
    std::vector<float> decoded;     // packed store: referenced rows, in order of first reference
    std::unordered_map<int32_t, int64_t> at;
    const float* row(int32_t r, int64_t d) const { return base ? base + int64_t(r) * d : decoded.data() + at.at(r) * d; }
  };
  static KeyRows key_rows(const Tensor& store, int64_t d, int64_t nope, const std::vector<int32_t>& refs) {
    KeyRows k;
    if (store.empty()) return k;
    for (int32_t r : refs) DSV4_CHECK(r >= 0 && r < store.rows());
    if (store.type == ElemType::F32) {
      DSV4_CHECK(store.cols() == d);
      k.base = store.f32();
      return k;
    }
    const KvRowLayout L = kv_row_layout(d, nope);
    DSV4_CHECK(store.cols() == L.bytes);
    std::vector<int32_t> order;
    for (int32_t r : refs)
      if (k.at.emplace(r, int64_t(order.size())).second) order.push_back(r);
    k.decoded.resize(order.size() * size_t(d));
#pragma omp parallel for if (int64_t(order.size()) * d > kParallelWork)
    for (size_t i = 0; i < order.size(); ++i) unpack_kv_row(store.u8() + int64_t(order[i]) * L.bytes, L, k.decoded.data() + i * size_t(d));
    return k;
  }

  void attend(const Tensor& q, const Tensor& window, const Tensor& fresh, const Tensor& idx_a, const Tensor& entries,
              const Tensor& idx_b, int64_t nope, const TensorData& sinks, float scale, const Tensor& out) override {
    const int64_t T = q.dim(0), H = q.dim(1), d = q.dim(2), Nw = window.empty() ? 0 : window.rows();
    const int64_t Ka = idx_a.cols(), Kb = idx_b.empty() ? 0 : idx_b.cols(), K = Ka + Kb;
    std::vector<int32_t> refs_w, refs_f, refs_e;
    for (int64_t i = 0; i < T * Ka; ++i)
      if (const int32_t v = idx_a.i32()[i]; v >= 0) (v < Nw ? refs_w : refs_f).push_back(v < Nw ? v : v - int32_t(Nw));
    for (int64_t i = 0; i < T * Kb; ++i)
      if (const int32_t v = idx_b.i32()[i]; v >= 0) refs_e.push_back(v);
    const KeyRows win = key_rows(window, d, nope, refs_w), fr = key_rows(fresh, d, nope, refs_f),
                  ent = key_rows(entries, d, nope, refs_e);
#pragma omp parallel for collapse(2) if (T * H * K * d > kParallelWork)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        auto key = [&](int64_t k) -> const float* {
          const int32_t v = k < Ka ? idx_a.i32()[t * Ka + k] : idx_b.i32()[t * Kb + (k - Ka)];
          if (v < 0) return nullptr;
          if (k >= Ka) return ent.row(v, d);
          return v < Nw ? win.row(v, d) : fr.row(v - int32_t(Nw), d);
        };
        const float* qh = q.f32() + (t * H + h) * d;
        std::vector<float> s(size_t(K), kNegInf);
        float mx = tensor_value(sinks, h);
        for (int64_t k = 0; k < K; ++k)
          if (const float* row = key(k)) {
            s[size_t(k)] = dot(qh, row, d) * scale;
            mx = std::max(mx, s[size_t(k)]);
          }
        float denom = std::exp(tensor_value(sinks, h) - mx);
        float* o = out.f32() + (t * H + h) * d;
        std::fill_n(o, d, 0.f);
        for (int64_t k = 0; k < K; ++k)
          if (const float* v = key(k)) {
            const float p = std::exp(s[size_t(k)] - mx);
            denom += p;
            for (int64_t i = 0; i < d; ++i) o[i] += p * v[i];
          }
        for (int64_t i = 0; i < d; ++i) o[i] /= denom;
      }
  }

  void compress(const Tensor& kv, const Tensor& gate, const TensorData& ape, const Tensor& seqs, int64_t ratio,
                bool overlap, const CompressorSlots& st, const Tensor& entries) override {
    const int64_t width = kv.cols(), coff = overlap ? 2 : 1, d = width / coff, S = seqs.rows();
    DSV4_CHECK(seqs.cols() == kSegCols);
#pragma omp parallel for
    for (int64_t s = 0; s < S; ++s) {
      const int32_t* seg = seqs.i32() + s * kSegCols;
      const int64_t first = seg[kSegFirstRow], rows = seg[kSegRows], start = seg[kSegStart], base = seg[kSegSlot] * ratio;
      int64_t produced = seg[kSegOutFirst];
      std::vector<float> win_kv(size_t(2 * ratio)), win_g(size_t(2 * ratio));
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t pos = start + t, r = pos % ratio;
        float* skv = st.kv.f32() + (base + r) * width;
        float* sg = st.gate.f32() + (base + r) * width;
        for (int64_t i = 0; i < width; ++i) {
          skv[i] = kv.f32()[(first + t) * width + i];
          sg[i] = gate.f32()[(first + t) * width + i] + tensor_value(ape, r * width + i);
        }
        if (r != ratio - 1) continue;
        // Window complete: per channel softmax over [previous window's first halves | own second halves].
        const bool has_prev = overlap && pos / ratio > 0;
        float* e = entries.f32() + produced * d;
        for (int64_t n = 0; n < d; ++n) {
          int64_t m = 0;
          if (has_prev)
            for (int64_t j = 0; j < ratio; ++j) {
              win_kv[size_t(m)] = st.prev_kv.f32()[(base + j) * d + n];
              win_g[size_t(m++)] = st.prev_gate.f32()[(base + j) * d + n];
            }
          const int64_t own = overlap ? d : 0;
          for (int64_t j = 0; j < ratio; ++j) {
            win_kv[size_t(m)] = st.kv.f32()[(base + j) * width + own + n];
            win_g[size_t(m++)] = st.gate.f32()[(base + j) * width + own + n];
          }
          float mx = kNegInf, den = 0, acc = 0;
          for (int64_t j = 0; j < m; ++j) mx = std::max(mx, win_g[size_t(j)]);
          for (int64_t j = 0; j < m; ++j) {
            const float p = std::exp(win_g[size_t(j)] - mx);
            den += p;
            acc += p * win_kv[size_t(j)];
          }
          e[n] = acc / den;
        }
        if (overlap)
          for (int64_t j = 0; j < ratio; ++j)
            for (int64_t n = 0; n < d; ++n) {
              st.prev_kv.f32()[(base + j) * d + n] = st.kv.f32()[(base + j) * width + n];
              st.prev_gate.f32()[(base + j) * d + n] = st.gate.f32()[(base + j) * width + n];
            }
        ++produced;
      }
    }
  }

  void index_topk(const Tensor& q, const Tensor& w, float w_scale, const Tensor& keys, const Tensor& block_table,
                  int64_t per_block, const Tensor& query_seq, const Tensor& usable, const Tensor& idx,
                  bool /*qat_operands: FP32 products are exact either way*/) override {
    const int64_t T = q.dim(0), H = q.dim(1), d = q.dim(2), K = idx.cols(), max_blocks = block_table.cols();
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = usable.i32()[t];
      const int32_t* table = block_table.i32() + int64_t(query_seq.i32()[t]) * max_blocks;
      DSV4_CHECK(n <= max_blocks * per_block);
      auto row_of = [&](int64_t j) { return int64_t(table[j / per_block]) * per_block + j % per_block; };
      std::vector<float> score(static_cast<size_t>(n), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = row_of(j);
        DSV4_CHECK(r >= 0 && r < keys.rows());
        const float* kj = keys.f32() + r * d;
        float s = 0;
        for (int64_t h = 0; h < H; ++h) s += w.f32()[t * H + h] * std::max(0.f, dot(q.f32() + (t * H + h) * d, kj, d));
        score[size_t(j)] = s * w_scale;
      }
      std::vector<int32_t> order(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      const int64_t k = std::min(K, n);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
        return score[size_t(a)] > score[size_t(b)] || (score[size_t(a)] == score[size_t(b)] && a < b);
      });
      for (int64_t i = 0; i < K; ++i) idx.i32()[t * K + i] = i < k ? int32_t(row_of(order[size_t(i)])) : -1;
    }
  }

  void route(const Tensor& x, const MoEWeights& moe, const Tensor& tokens, const ModelConfig& cfg,
             const Tensor& weights, const Tensor& experts) override {
    const int64_t T = x.dim(0), E = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
    const Linear gate = dense_linear(*moe.gate);
    std::vector<float> logits(T * E);
    matmul(x.f32(), T, gate, logits.data(), E);
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      std::vector<float> score(E), biased(E);
      const float* l = logits.data() + t * E;
      if (cfg.scoring_func == "softmax") {
        float mx = *std::max_element(l, l + E), s = 0;
        for (int64_t e = 0; e < E; ++e) s += (score[e] = std::exp(l[e] - mx));
        for (auto& v : score) v /= s;
      } else {
        for (int64_t e = 0; e < E; ++e)
          score[e] = cfg.scoring_func == "sigmoid" ? sigmoid(l[e])
                                                   : std::sqrt(l[e] > 20.f ? l[e] : std::log1p(std::exp(l[e])));
      }
      std::vector<int32_t> chosen(k);
      if (moe.hash_routed) {
        for (int64_t i = 0; i < k; ++i) chosen[i] = int32_t(tensor_int(*moe.tid2eid, int64_t(tokens.i32()[t]) * k + i));
      } else {
        for (int64_t e = 0; e < E; ++e) biased[e] = score[e] + (moe.bias ? tensor_value(*moe.bias, e) : 0.f);
        std::vector<int32_t> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          return biased[a] > biased[b] || (biased[a] == biased[b] && a < b);
        });
        std::copy_n(order.begin(), k, chosen.begin());
      }
      float sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += score[chosen[i]];
      for (int64_t i = 0; i < k; ++i) {
        float g = score[chosen[i]];
        if (cfg.scoring_func != "softmax" && cfg.norm_topk_prob) g /= (sum + 1e-20f);
        weights.f32()[t * k + i] = g * float(cfg.routed_scaling_factor);
        experts.i32()[t * k + i] = chosen[i];
      }
    }
  }

  void moe(const Tensor& x, const MoEWeights& moe, const Tensor& weights, const Tensor& experts, float limit,
           const Tensor& out) override {
    const int64_t T = x.dim(0), D = x.cols(), k = experts.cols();
    std::vector<float> acc(T * D, 0.f);
    // Every expert's w1 and w3 read the same rows: with FP8 activations, quantise them once.
    std::vector<float> xq;
    if (act_quant_ != ActQuant::None) {
      xq.resize(size_t(T * D));
#pragma omp parallel for if (T > 1)
      for (int64_t t = 0; t < T; ++t)
        fp8_dynamic_quant(x.f32() + t * D, D, kActBlock, pow2_scales(), nullptr, nullptr, xq.data() + t * D);
    }
    auto run_expert = [&](const ExpertWeights& e, const std::vector<int64_t>& toks, const std::vector<float>& g) {
      const int64_t n = int64_t(toks.size()), F = e.w1.out;
      DSV4_CHECK(quantises_input(e.w1) == quantises_input(e.w3));  // one expert, one weight format
      const float* src = quantises_input(e.w1) ? xq.data() : x.f32();
      std::vector<float> xin(n * D), h1(n * F), h3(n * F), y(n * D);
      for (int64_t i = 0; i < n; ++i) std::copy_n(src + toks[i] * D, D, xin.data() + i * D);
      matmul(xin.data(), n, e.w1, h1.data(), F);
      matmul(xin.data(), n, e.w3, h3.data(), F);
      for (int64_t i = 0; i < n * F; ++i) {
        float gt = h1[i], up = h3[i];
        if (limit > 0) {
          gt = std::min(gt, limit);
          up = std::clamp(up, -limit, limit);
        }
        h1[i] = gt / (1.f + std::exp(-gt)) * up;
      }
      matmul(h1.data(), n, e.w2, y.data(), D, quantises_input(e.w2), pow2_scales());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < D; ++c) acc[toks[i] * D + c] += g[i] * y[i * D + c];
    };
    // Group tokens by expert so each expert's weights are read once per call.
    std::vector<std::vector<int64_t>> toks(moe.experts.size());
    std::vector<std::vector<float>> gates(moe.experts.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i) {
        const int32_t id = experts.i32()[t * k + i];
        DSV4_CHECK(id >= 0 && id < moe.routed_experts());
        const int64_t e = id - moe.first_expert;
        if (e < 0 || e >= int64_t(moe.experts.size())) continue;  // held by another rank
        toks[e].push_back(t);
        gates[e].push_back(weights.f32()[t * k + i]);
      }
    for (size_t e = 0; e < moe.experts.size(); ++e)
      if (!toks[e].empty()) run_expert(moe.experts[e], toks[e], gates[e]);
    if (moe.has_shared) {
      std::vector<int64_t> all(T);
      std::iota(all.begin(), all.end(), 0);
      run_expert(moe.shared, all, std::vector<float>(T, 1.f));
    }
    std::copy(acc.begin(), acc.end(), out.f32());
  }

  void gather_rows(const Tensor& src, const Tensor& rows, const Tensor& out) override {
    const int64_t d = src.cols(), n = rows.numel();
    for (int64_t i = 0; i < n; ++i) {
      DSV4_CHECK(rows.i32()[i] >= 0 && rows.i32()[i] < src.rows());
      std::copy_n(src.f32() + int64_t(rows.i32()[i]) * d, d, out.f32() + i * d);
    }
  }

  void broadcast_streams(const Tensor& v, const Tensor& X, bool accumulate) override {
    const int64_t T = X.dim(0), m = X.dim(1), D = X.dim(2);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < m; ++k)
        for (int64_t i = 0; i < D; ++i) {
          float& x = X.f32()[(t * m + k) * D + i];
          x = (accumulate ? x : 0.f) + v.f32()[t * D + i];
        }
  }

  void quantize_kv(const Tensor& x, int64_t nope) override {
    const int64_t d = x.cols(), rows = x.rows();
    DSV4_CHECK(nope >= 0 && nope <= d);
    const KvRowLayout L = kv_row_layout(d, nope);
#pragma omp parallel if (rows * d > kParallelWork)
    {
      std::vector<uint8_t> row(size_t(L.bytes));
#pragma omp for
      for (int64_t r = 0; r < rows; ++r) {
        pack_kv_row(x.f32() + r * d, L, row.data());
        unpack_kv_row(row.data(), L, x.f32() + r * d);
      }
    }
  }

  void index_qat(const Tensor& x) override {
    const int64_t d = x.cols(), rows = x.rows();
    DSV4_CHECK(index_qat_applies(d));
#pragma omp parallel for if (rows * d > kParallelWork)
    for (int64_t r = 0; r < rows; ++r) index_qat_row(x.f32() + r * d, int(d));
  }

  void pack_kv(const Tensor& x, int64_t nope, const Tensor& packed) override {
    const int64_t d = x.cols(), rows = x.rows();
    DSV4_CHECK(nope >= 0 && nope <= d);
    const KvRowLayout L = kv_row_layout(d, nope);
    DSV4_CHECK(packed.cols() == L.bytes && packed.rows() == rows);
    uint8_t* out = packed.u8();
#pragma omp parallel for if (rows * d > kParallelWork)
    for (int64_t r = 0; r < rows; ++r) pack_kv_row(x.f32() + r * d, L, out + r * L.bytes);
  }

  void unpack_kv(const Tensor& packed, const Tensor& rows, int64_t nope, const Tensor& out) override {
    const int64_t d = out.cols(), n = out.rows(), N = packed.rows();
    DSV4_CHECK(nope >= 0 && nope <= d);
    const KvRowLayout L = kv_row_layout(d, nope);
    DSV4_CHECK(packed.cols() == L.bytes);
    DSV4_CHECK(rows.empty() ? n <= N : rows.numel() == n);
    const uint8_t* in = packed.u8();
    const int32_t* idx = rows.empty() ? nullptr : rows.i32();
    for (int64_t i = 0; idx && i < n; ++i) DSV4_CHECK(idx[i] >= 0 && idx[i] < N);  // not inside OpenMP: it throws
#pragma omp parallel for if (n * d > kParallelWork)
    for (int64_t i = 0; i < n; ++i) unpack_kv_row(in + (idx ? idx[i] : i) * L.bytes, L, out.f32() + i * d);
  }
  void store_rows(const Tensor& x, const Tensor& rows, int64_t nope, const Tensor& store) override {
    const int64_t n = x.rows(), d = x.cols();
    DSV4_CHECK(rows.numel() == n);
    const bool packed = store.type == ElemType::U8;
    const KvRowLayout L = kv_row_layout(d, nope);
    DSV4_CHECK(packed ? store.cols() == L.bytes : store.cols() == d);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows.i32()[i];
      if (r < 0) continue;
      DSV4_CHECK(r < store.rows());
      if (packed) pack_kv_row(x.f32() + i * d, L, store.u8() + r * L.bytes);
      else std::copy_n(x.f32() + i * d, d, store.f32() + r * d);
    }
  }


  void sample(const Tensor& logits, const Tensor& params, const Tensor& uniforms, const Tensor& tokens) override {
    const int64_t B = logits.rows(), V = logits.cols();
    DSV4_CHECK(params.rows() == B && params.cols() == kSampleParams && uniforms.numel() == B && tokens.numel() == B);
    const float *z = logits.f32(), *pr = params.f32(), *u = uniforms.f32();
    int32_t* out = tokens.i32();
#pragma omp parallel for schedule(dynamic) if (B > 1)
    for (int64_t b = 0; b < B; ++b)
      out[b] = sample_row(std::span(z + b * V, size_t(V)), read_sample_params(pr + b * kSampleParams), u[b]);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace dsv4

#ifndef DSV4_HAVE_CUDA
namespace dsv4 {
bool cuda_device_available() { return false; }
}  // namespace dsv4
#endif
