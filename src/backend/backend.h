#pragma once
// The operations the DeepSeek-V4 forward pass is written against. The CPU backend is the FP32
// reference; the CUDA backend implements the same ops and is tested op by op against it.
// Activations are F32 (index lists I32, packed KV rows U8); weights are the checkpoint's own tensors.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "backend/sampling.h"
#include "backend/tensor.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

// RoPE frequencies of one layer kind (one per rotated pair).
struct RopeTable {
  std::vector<float> inv_freq;
};
RopeTable make_rope_table(const ModelConfig& cfg, bool compressed_layer);

// Pending-window state of one compressor for every sequence slot of a state store (see
// docs/MODEL.md §2.6 and §2.10): slot s owns rows [s * ratio, (s + 1) * ratio) of each tensor.
struct CompressorSlots {
  Tensor kv, gate;            // [slots * ratio, coff*d]: rows of the current, incomplete window (ape added)
  Tensor prev_kv, prev_gate;  // [slots * ratio, d]: first halves of the last complete window (CSA only)
};

// Columns of the per-sequence table [S, kSegCols] (I32) that the attention-family ops read for a
// flattened batch: sequence s owns batch rows [first_row, first_row + rows) at positions
// start, start + 1, ...; its private state is slot `slot` of the store; out_first is the first
// output row of what an op produces for it (compressed entries of a compressor).
enum SegCol : int64_t { kSegFirstRow, kSegRows, kSegStart, kSegSlot, kSegOutFirst, kSegCols };

// What linears with FP8 or FP4 weights do with their input (docs/MODEL.md §2.9).
enum class ActQuant : uint8_t {
  None,     // FP32 activations: the HF-faithful reference ("exact mode")
  Fp8,      // the official kernels: each row quantised to E4M3 in 1x128 blocks with FP32 scales
  Fp8Pow2,  // the same with power-of-two (ue8m0) scales, as V4 checkpoints' scale_fmt asks
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  virtual Tensor alloc(std::vector<int64_t> shape, ElemType type = ElemType::F32) = 0;
  virtual void upload(const Tensor& dst, const void* src) = 0;    // numel elements
  virtual void download(const Tensor& src, void* dst) = 0;        // numel elements
  virtual void fill(const Tensor& t, float value) = 0;
  virtual void copy(const Tensor& src, const Tensor& dst) = 0;    // same numel
  virtual void synchronize() {}
  // Device backends: the device memory free now, and the size of the arena that activations and
  // state tensors are allocated from (before its first allocation; the engine sizes it for its
  // state pool). Host backends have neither.
  virtual std::optional<size_t> device_free_bytes() { return std::nullopt; }
  virtual void set_arena_bytes(size_t) {}
  // Called once by Model's constructor: a device backend uploads every weight tensor here
  // (the CPU backend reads the mmapped checkpoint directly and does nothing).
  virtual void prepare_weights(const ModelWeights&) {}
  // Before the weights are placed (prepare_weights, or the CUDA random weights): these tensors
  // stay in pinned host memory (model/placement.h: the token embedding, read a row per token over
  // the bus, and routed experts of whole layers when the model does not fit). Host-resident
  // routed experts are used from a device cache of expert_cache_bytes (LRU; at least one expert):
  // only the experts a step selects and the cache lacks cross the bus. Host backends have nothing
  // to do.
  virtual void set_host_resident(std::vector<const TensorData*>, size_t /*expert_cache_bytes*/) {}

  // A fixed-shape step (Model's decode steps): `record` enqueues the step's ops, reading its
  // inputs from tensors that keep their addresses between calls (rewritten before each call), and
  // neither uploads nor downloads. Every call with the same key must enqueue the same ops on the
  // same state and weights. A backend with graphs (CUDA) runs record() eagerly the first time,
  // captures it the second time into a graph with memory of its own and from then on replays the
  // graph without calling record(): the tensors record() allocated keep their addresses and are
  // rewritten by every replay. Other backends just call record().
  virtual void run_graph(uint64_t key, const std::function<void()>& record) {
    (void)key;
    record();
  }
  // Frees the graph of `key` (its owner will not run that step again).
  virtual void drop_graph(uint64_t key) { (void)key; }

  // out[t] = table[ids[t]]
  virtual void embed(const TensorData& table, const Tensor& ids, const Tensor& out) = 0;
  // Row-wise RMSNorm over the last dim; weight may be null (unweighted). In place allowed.
  virtual void rms_norm(const Tensor& x, const TensorData* weight, float eps, const Tensor& out) = 0;
  // Applies to linear() and moe() (grouped_linear is the official BF16 wo_a: never quantised).
  void set_act_quant(ActQuant q) { act_quant_ = q; }
  ActQuant act_quant() const { return act_quant_; }

  // out[r] = W x[r] for any weight format (FP8 blocks, FP4 groups, BF16/F32); with act_quant set,
  // x rows go through fp8_dynamic_quant first when W is FP8 or FP4.
  virtual void linear(const Tensor& x, const Linear& w, const Tensor& out) = 0;
  // Grouped projection: x [T, G, in], w [G*R, in] -> out [T, G, R] (group g uses rows gR..gR+R).
  virtual void grouped_linear(const Tensor& x, const Linear& w, int64_t groups, const Tensor& out) = 0;
  // In-place interleaved RoPE on the last rope_dim columns of each row of x [T, heads, dim],
  // row t rotated by positions[t] (inverse: by -positions[t]).
  virtual void rope(const Tensor& x, const Tensor& positions, const RopeTable& table, int64_t rope_dim, bool inverse) = 0;
  // mHC pre: X [T, m, D] -> u [T, D], post [T, m], comb [T, m, m] (Sinkhorn-normalised).
  virtual void hc_pre(const Tensor& X, const HyperConn& hc, int64_t iters, float hc_eps, float norm_eps,
                      const Tensor& u, const Tensor& post, const Tensor& comb) = 0;
  // mHC post: out[t, k] = post[t, k] * y[t] + sum_j comb[t, j, k] * X[t, j].
  virtual void hc_post(const Tensor& y, const Tensor& X, const Tensor& post, const Tensor& comb, const Tensor& out) = 0;
  // Final collapse: u[t] = sum_k (sigmoid(scale * mu_k + base_k) + eps) X[t, k].
  virtual void hc_head(const Tensor& X, const HyperConn& hc, float hc_eps, float norm_eps, const Tensor& u) = 0;
  // Shared-KV attention with sinks over stored rows, for a flattened batch. Keys = values.
  // Query t attends to the rows listed in idx_a[t] and idx_b[t] (-1 = none; idx_b may be empty):
  // an idx_a entry v < window.rows() is row v of `window` (the sequences' window rings), else row
  // v - window.rows() of `fresh` (this step's keys, F32); an idx_b entry is a row of `entries`
  // (the paged compressed entries). Stores are F32 rows or packed U8 rows (tensor/kv_format.h,
  // decoded with nope_dims); either may be empty when nothing indexes it. With packed stores the
  // fresh rows hold what quantize_kv leaves (what they decode to once stored; the CUDA tensor-core
  // kernel packs them). One softmax over the listed rows plus the per-head sink logit (whose
  // value is zero) -> out [T, H, d].
  virtual void attend(const Tensor& q, const Tensor& window, const Tensor& fresh, const Tensor& idx_a,
                      const Tensor& entries, const Tensor& idx_b, int64_t nope_dims, const TensorData& sinks,
                      float scale, const Tensor& out) = 0;
  // Compressor over a flattened batch: for each sequence of seqs [S, kSegCols], feeds its rows of
  // the projected kv/gate [T, coff*d] (positions start..) into its slot of `state`; every window
  // the rows complete is pooled (before norm/RoPE) into entries[out_first + i], i-th completed.
  // A window w > 0 of an overlapping (CSA) compressor also pools the previous window's first
  // halves (prev_kv/prev_gate, valid for every w > 0 because the state is saved when w - 1 ends).
  virtual void compress(const Tensor& kv, const Tensor& gate, const TensorData& ape, const Tensor& seqs,
                        int64_t ratio, bool overlap, const CompressorSlots& state, const Tensor& entries) = 0;
  // Lightning Indexer over paged keys: query t of sequence query_seq[t] scores the sequence's
  // first usable[t] keys j (logical order; key j lives in keys row
  // block_table[seq, j / rows_per_block] * rows_per_block + j % rows_per_block):
  // score[t, j] = w_scale * sum_h w[t, h] * relu(q[t, h] . key_j); idx[t] = the pool rows of
  // the top-k j by score (ties: lower j first), padded with -1. block_table [S, max_blocks] I32.
  // qat_operands: q and keys are the index QAT's values (E2M1 times powers of two, BF16 exactly),
  // so a backend may take the products on BF16 tensor cores without loss.
  virtual void index_topk(const Tensor& q, const Tensor& w, float w_scale, const Tensor& keys,
                          const Tensor& block_table, int64_t rows_per_block, const Tensor& query_seq,
                          const Tensor& usable, const Tensor& idx, bool qat_operands) = 0;
  // Router: expert weights [T, k] and ids [T, k] (hash layers read tid2eid[token]).
  virtual void route(const Tensor& x, const MoEWeights& moe, const Tensor& tokens, const ModelConfig& cfg,
                     const Tensor& weights, const Tensor& experts) = 0;
  // out[t] = sum_i weights[t,i] * expert_{experts[t,i]}(x[t]) + shared(x[t]) (clamped SwiGLU).
  // Expert parallelism: moe.experts holds experts first_expert.. only; assignments to the others
  // (held by other ranks) add nothing here.
  virtual void moe(const Tensor& x, const MoEWeights& moe, const Tensor& weights, const Tensor& experts,
                   float swiglu_limit, const Tensor& out) = 0;
  // out[i] = src[rows[i]]
  virtual void gather_rows(const Tensor& src, const Tensor& rows, const Tensor& out) = 0;
  // X[t, k] = v[t] (accumulate: X[t, k] += v[t]) for every stream k of X [T, m, D].
  virtual void broadcast_streams(const Tensor& v, const Tensor& X, bool accumulate) = 0;
  // Production KV format (tensor/kv_format.h) in place on F32 rows x [rows, dim]: every value
  // becomes what its packed row decodes to, i.e. unpack(pack(x)) bit for bit: the first nope_dims
  // values through E4M3 in blocks of 64 with a power-of-two scale 2^ceil(log2(amax/448))
  // (amax >= 1e-4), the remaining (RoPE) dims through BF16 (RNE).
  virtual void quantize_kv(const Tensor& x, int64_t nope_dims) = 0;
  // The official indexer QAT (tensor/index_qat.h) in place on every row of x [..., d],
  // index_qat_applies(d): Walsh-Hadamard rotation, then FP4 in blocks of 32.
  virtual void index_qat(const Tensor& x) = 0;
  // packed[r] = the production row of x[r]: x F32 [rows, dim], packed U8 [rows, kv_row_layout(dim,
  // nope_dims).bytes] (padding zeroed).
  virtual void pack_kv(const Tensor& x, int64_t nope_dims, const Tensor& packed) = 0;
  // out[i] = decode(packed[rows[i]]): packed U8 [N, row bytes], rows I32 [n] (empty: rows 0..n-1),
  // out F32 [n, dim].
  virtual void unpack_kv(const Tensor& packed, const Tensor& rows, int64_t nope_dims, const Tensor& out) = 0;

  // store[rows[i]] = x[i] for every i with rows[i] >= 0: F32 stores get the values, packed U8
  // stores the production row of them (as pack_kv). x F32 [n, dim], rows I32 [n].
  virtual void store_rows(const Tensor& x, const Tensor& rows, int64_t nope_dims, const Tensor& store) = 0;

  // One token per row of logits [B, V]: tokens[b] = sample_row(logits[b], filter b, uniforms[b])
  // (backend/sampling.h). params [B, kSampleParams] F32 rows (temperature, top_k, top_p, min_p);
  // uniforms [B] F32 in [0, 1) (unused for greedy rows); tokens [B] I32. Greedy when
  // temperature <= 0 (lowest id among the maxima); else softmax(logits / T) in double, top-k,
  // top-p, min-p over (probability desc, id asc), renormalised, and the first token in id order
  // whose running probability sum exceeds the uniform. Logits must not be NaN or +inf.
  virtual void sample(const Tensor& logits, const Tensor& params, const Tensor& uniforms, const Tensor& tokens) = 0;

 protected:
  ActQuant act_quant_ = ActQuant::None;
  // Whether linear inputs for this weight are quantised, and with which scale rounding.
  bool quantises_input(const Linear& w) const {
    return act_quant_ != ActQuant::None && (w.format == WeightFormat::FP8 || w.format == WeightFormat::FP4);
  }
  bool pow2_scales() const { return act_quant_ == ActQuant::Fp8Pow2; }
};

std::unique_ptr<Backend> make_cpu_backend();

// True when the CUDA backend is compiled in and a CUDA device can be used.
bool cuda_device_available();
#ifdef DSV4_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device = 0);  // see backend/cuda/cuda_backend.h for options
#endif

}  // namespace dsv4
