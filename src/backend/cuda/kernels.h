#pragma once
// Launchers of the CUDA backend's kernels, one .cu file per op family. Plain types only, so that
// the backend class (cuda_backend.cpp, host compiler) never includes device code and the kernels
// never include the model headers. Every launcher enqueues on `stream` and does not synchronise.
#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

// ---- weights -------------------------------------------------------------------------------
enum WFmt : int32_t { kFP8 = 0, kFP4 = 1, kBF16 = 2, kF32 = 3 };

// A weight matrix [out, in] in device memory in its checkpoint format.
//  kFP8: e4m3 [out, in], scales [ceil(out/128), ceil(in/128)];  kFP4: packed e2m1 [out, in/2],
//  scales [out, in/32];  kBF16 / kF32: plain. Scales are ue8m0 bytes or (scale_f32) float32.
struct WeightDesc {
  const uint8_t* w = nullptr;
  const uint8_t* s = nullptr;
  int32_t fmt = kF32;
  int32_t scale_f32 = 0;
  int64_t out = 0, in = 0;
};

// ---- GEMM: y = x W^T with the weight dequantised in-kernel, FP32 accumulation ---------------
// Z independent problems (blockIdx.z). Problem z multiplies rows r in [0, rows_z) where
// rows_z = counts ? counts[z] : M and the row base is base_z = offsets ? offsets[z] : 0:
//   x row  = x + z*x_z_off + (x_rows ? x_rows[base_z + r] : base_z + r) * ldx
//   y row  = y + z*y_z_off + (base_z + r) * ldy
//   weight = descs ? descs[z] : wd, rows w_z_row_off*z .. + N of it.
struct GemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0, x_z_off = 0;
  const int32_t* x_rows = nullptr;
  float* y = nullptr;
  int64_t ldy = 0, y_z_off = 0;
  int64_t M = 0, N = 0, K = 0;
  const int32_t* counts = nullptr;
  const int32_t* offsets = nullptr;
  int64_t max_rows = 0;  // upper bound of rows_z (grid size)
  const WeightDesc* descs = nullptr;
  WeightDesc wd;
  int64_t w_z_row_off = 0;
  int Z = 1;
  // Optional: problem z is zmap[z] (descs/counts/offsets index); -1 = no work (MoE: only the
  // experts that received tokens get grid slices).
  const int32_t* zmap = nullptr;
  // Use the GEMV kernel with one row-loop per warp whatever max_rows is (MoE decode: rows per
  // expert are few on average although the bound is large).
  bool force_gemv = false;
  // Expected rows per problem (0: max_rows): the GEMV passes one activation row at a time when
  // it is 1 (MoE decode: about one row per active expert although the bound is larger).
  int64_t typical_rows = 0;
  __host__ __device__ int64_t expected_rows() const { return typical_rows ? typical_rows : max_rows; }
  // FP8 activations (act_quant output). When xq is set, x is unused and the tensor-core kernel
  // runs (FP8 or FP4 weights, K % 32 == 0, x_z_off == 0): activation row i (after x_rows) is
  // xq + i * ldxq with the scale of K-block kb at xs[kb * xs_ld + i].
  const uint8_t* xq = nullptr;
  int64_t ldxq = 0;
  const float* xs = nullptr;
  int64_t xs_ld = 0;
  // gemm_swiglu: the second weight of each problem (descs3 ? descs3[z] : wd3, same shape and
  // format) and the clamp of the clamped SwiGLU (<= 0: none).
  const WeightDesc* descs3 = nullptr;
  WeightDesc wd3;
  float swiglu_limit = 0.f;
  // FP32 x whose 1x128 E4M3 round trip (act_quant's, scales amax / 448 or, with kPow2, powers of
  // two) the kernel computes itself while staging x: one launch fewer per FP8 linear of one row.
  // Only where gemm_rounds_x() says so.
  enum class XRoundTrip : int8_t { None, Amax, Pow2 } x_roundtrip = XRoundTrip::None;
  // With xq and power-of-two activation scales: the sm_90a warpgroup-MMA kernels where
  // wgmma_available(): for FP4 weights with E8M0 scales where xb is given (BF16 operands with the
  // scales folded in, exact products, FP32 accumulation), for FP8 weights where K % 128 == 0 (E4M3
  // operands, partials promoted every 128 columns); else the mma.sync kernel.
  bool warpgroup_mma = false;
  // The rows of xq as BF16 values (E4M3 times the power-of-two scale, exact; act_quant's bf16
  // output, columns in wgmma_bf16_column order), row i at xb + i * ldxb: the warpgroup kernel's
  // activation operand.
  const uint16_t* xb = nullptr;
  int64_t ldxb = 0;
};
// Whether this device runs the sm_90a warpgroup-MMA GEMM kernel (compiled for sm_90a, an SM 9.x GPU).
bool wgmma_available();
// Whether the warpgroup kernel takes this weight at K columns: FP4 with E8M0 scales (E2M1 x scale
// is then a BF16 value), whole 128-column chunks (act_quant's BF16 rows are permuted per chunk).
bool wgmma_weight_fits(const WeightDesc& w, int64_t K);
// Launches of the warpgroup-MMA kernels so far (tests check that the path they mean ran): the FP4
// kernel plain and with the SwiGLU of gemm_swiglu fused, and the FP8-weight kernel.
uint64_t wgmma_launch_count();
uint64_t wgmma_swiglu_launch_count();
uint64_t wgmma_fp8_launch_count();
void gemm(const GemmArgs& a, cudaStream_t stream);
// Whether gemm() and gemm_swiglu() take the one-row stream GEMV for these arguments, the kernel
// that applies x_roundtrip (any other path aborts when it is set).
bool gemm_rounds_x(const GemmArgs& a);
// y = silu(min(x W1^T, L)) * clamp(x W3^T, -L, L) (no clamp when L <= 0), W1 = the problem's
// weight, W3 = its descs3/wd3 twin; y holds dense rows [y_rows, N] (ldy == N, y_z_off == 0).
// One pass streaming both weights where the one-row GEMV applies (decode) or the sm_90a warpgroup
// kernel does (prefill with FP4 weights); otherwise two GEMMs and the SwiGLU kernel, with h3
// (y_rows x N floats) as the second product's scratch.
void gemm_swiglu(const GemmArgs& a, int64_t y_rows, float* h3, cudaStream_t stream);
// Which path gemm() takes: rows per problem <= this use the weight-streaming GEMV kernel, or
// with FP8 activations (xq) its tensor-core twin when K is a multiple of skinny_stage_k.
constexpr int64_t kGemvMaxRows = 16;
// K covered by one pipeline stage of the weight-streaming tensor-core kernel (gemm_fp8.cu): one
// 128-block of FP8 weights, eight 32-groups of FP4 ones (both with FP8 activations), 64 columns
// of BF16 weights (FP32 activations); 0: no such kernel for the format.
constexpr int64_t skinny_stage_k(int32_t fmt) { return fmt == kFP8 ? 128 : fmt == kFP4 ? 256 : fmt == kBF16 ? 64 : 0; }
constexpr bool skinny_fits(int32_t fmt, int64_t K) { return skinny_stage_k(fmt) > 0 && K % skinny_stage_k(fmt) == 0; }
// FP8-weight linears with FP8 activations and at least this many rows take the tensor cores
// (cuBLASLt on sm_90 when offered, else the mma kernel) instead of the FP32 GEMV, which is
// compute-bound there (H200, 2026-12-02: wq_b 4 rows 86 us vs cuBLASLt FP8 21 us; wo_b 16 rows
// 181 vs 20 us; at 4 rows the 4 MB wq_a is even, 16.2 vs 17.8 us).
constexpr int64_t kFp8TensorCoreMinRows = 4;

// x [n] as three BF16 planes that sum to it exactly (parts[p * n + i], p = 0 the high part): BF16
// tensor-core products of the parts with a BF16 weight are exact FP32 products.
void split_bf16_planes(const float* x, int64_t n, uint16_t* parts, cudaStream_t stream);
// An FP8 weight with E8M0 (power-of-two) block scales dequantised to BF16 bit patterns [out, in]
// (in % 16 == 0): exact, E4M3 values times powers of two are BF16 values.
void fp8_weight_to_bf16(const WeightDesc& w, uint16_t* out, cudaStream_t stream);

// Dynamic FP8 activation quantisation (tensor/quant.h fp8_dynamic_quant) of x [M, K] (row stride
// ldx) in 1x128 blocks: q [M, ldq] E4M3, scales [ceil(K/128), M] (row index fastest, the layout
// of cuBLASLt's VEC128 scales), roundtrip [M, K] = q * scale, bf16 [M, ldq] = q * scale as BF16
// bits (exact with pow2 scales) in the warpgroup kernel's column order (wgmma_bf16_column). Any
// output may be null.
void act_quant(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q, int64_t ldq, float* scales,
               float* roundtrip, uint16_t* bf16, cudaStream_t stream);
// Where column k of a row of K columns sits in act_quant's BF16 rows: in each whole 128-column
// block, column 32 t + 4 j + 2 h + e moves to 16 j + 8 h + 2 t + e, the order in which the
// warpgroup kernel's register-held weight fragments meet the columns (gemm_fp8.cu); a partial
// last block keeps its order.
__host__ __device__ constexpr int64_t wgmma_bf16_column(int64_t k, int64_t K) {
  const int64_t block = k - k % 128, c = k % 128;
  if (block + 128 > K) return k;
  return block + 16 * ((c >> 2) & 7) + 8 * ((c >> 1) & 1) + 2 * (c >> 5) + (c & 1);
}

// ---- elementwise / norms / mHC (norm.cu) -------------------------------------------------
// Small parameter tensors arrive as device pointers with their dtype: 0 = f32, 1 = bf16.
struct Vec {
  const void* p = nullptr;
  int32_t bf16 = 0;
};
void fill(float* x, int64_t n, float v, cudaStream_t s);
void embed(Vec table, int64_t d, const int32_t* ids, int64_t n, float* out, cudaStream_t s);
void rms_norm(const float* x, Vec w, float eps, int64_t rows, int64_t d, float* out, cudaStream_t s);
void rope(float* x, const int32_t* pos, const float* inv_freq, int64_t T, int64_t heads, int64_t dim,
          int64_t rope_dim, bool inverse, cudaStream_t s);
// mHC pre/head: scratch holds hc_scratch_floats(T, m, D) floats (per-chunk partial mixes).
int64_t hc_scratch_floats(int64_t T, int64_t m, int64_t D);
void hc_pre(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
            int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb, float* scratch,
            cudaStream_t s);
void hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t m, int64_t D,
             float* out, cudaStream_t s);
void hc_head(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
             float hc_eps, float norm_eps, float* u, float* scratch, cudaStream_t s);
void gather_rows(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n, float* out,
                 cudaStream_t s);
void broadcast_streams(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool accumulate, cudaStream_t s);

// ---- production KV rows (kv.cu; layout in tensor/kv_format.h) -----------------------------
// In place x [rows, d] -> the values its packed rows decode to.
void quantize_kv(float* x, int64_t rows, int64_t d, int64_t nope, cudaStream_t s);
// Backend::index_qat on x [rows, d] in place (index_qat_applies(d)).
void index_qat(float* x, int64_t rows, int64_t d, cudaStream_t s);
// Backend::store_rows: store row rows[i] (rows null: i) gets x[i] for i < n, x [n, d]; F32 values
// (packed false, store [N, d]) or the packed row (store [N, kv_row_layout(d, nope).bytes]).
// Indices < 0 or >= N are skipped.
void store_rows(const float* x, const int32_t* rows, int64_t n, int64_t d, int64_t nope, void* store, int64_t N,
                bool packed, cudaStream_t s);
// x [rows, d] -> packed [rows, kv_row_layout(d, nope).bytes] (store_rows with identity rows).
void pack_kv(const float* x, int64_t rows, int64_t d, int64_t nope, uint8_t* packed, cudaStream_t s);
// out[i] = decode(packed[rows ? rows[i] : i]) for i < n, out [n, d]; NaN rows for indices outside [0, N).
void unpack_kv(const uint8_t* packed, int64_t N, const int32_t* rows, int64_t n, int64_t d, int64_t nope, float* out,
               cudaStream_t s);

// ---- attention family (attention.cu) -------------------------------------------------------
// Columns of the per-sequence table [S, kSegCols] (I32): the twin of dsv4::SegCol (backend.h,
// checked by static_asserts in cuda_backend.cpp).
inline constexpr int64_t kSegFirstRow = 0, kSegRows = 1, kSegStart = 2, kSegSlot = 3, kSegOutFirst = 4,
                         kSegCols = 5;

// A KV store read by attend: n rows of d F32 values, or n packed rows (tensor/kv_format.h).
struct KvStore {
  const void* p = nullptr;
  int64_t n = 0;
};
// Backend::attend: q [T, H, d]; idx_a [T, Ka] entries v < window.n are window rows, others rows
// v - window.n of fresh [n_fresh, d] (F32; with packed stores on the KV grid, as quantize_kv
// leaves it); idx_b [T, Kb] (may be null with Kb 0) rows of entries. packed: window and entries
// hold packed rows with nope no-RoPE dims. An index past its store makes the query's outputs NaN.
struct AttendArgs {
  const float* q = nullptr;
  int64_t T = 0, H = 0, d = 0, nope = 0;
  bool packed = false;
  KvStore window, entries;
  const float* fresh = nullptr;
  int64_t n_fresh = 0;
  const int32_t *idx_a = nullptr, *idx_b = nullptr;
  int64_t Ka = 0, Kb = 0;
  Vec sinks;
  float scale = 1.f;
  float* out = nullptr;
  float* scratch = nullptr;  // attend_scratch_floats(*this) floats: split-K partials or packed fresh rows
};
// Key splits per (token, head group) block: decode (few rows) spreads the keys over the chip.
int64_t attend_splits(int64_t T, int64_t H, int64_t Ka, int64_t Kb);
int64_t attend_scratch_floats(const AttendArgs& a);
void attend(const AttendArgs& a, cudaStream_t s);
// Backend::compress over S sequences (seqs [S, kSegCols] device table; T rows of kv/gate in
// all); state tensors hold ratio rows per slot (prev_* only with overlap, whose ratio is at most
// kCompressMaxRatio: the model's CSA layers use 4).
inline constexpr int kCompressMaxRatio = 8;
struct CompressArgs {
  const float *kv = nullptr, *gate = nullptr;
  Vec ape;
  const int32_t* seqs = nullptr;
  int64_t T = 0, S = 0, ratio = 0, d = 0;
  bool overlap = false;
  float *st_kv = nullptr, *st_gate = nullptr, *st_prev_kv = nullptr, *st_prev_gate = nullptr;
  float* entries = nullptr;
};
void compress(const CompressArgs& a, cudaStream_t s);
// Backend::index_topk: scores of score_rows query rows at a time ([score_rows, n_max] scratch,
// n_max = max_blocks * per_block keys, any number), then the top K <= kTopkMaxK per row into
// idx [T, K] as pool rows of keys [N, d], best first, ties to the lower logical index.
struct IndexArgs {
  const float *q = nullptr, *w = nullptr;
  float w_scale = 1.f;
  int64_t T = 0, H = 0, d = 0;
  const float* keys = nullptr;
  int64_t N = 0;
  const int32_t* block_table = nullptr;  // [S, max_blocks]
  int64_t S = 0, max_blocks = 0, per_block = 0, n_max = 0;
  const int32_t *query_seq = nullptr, *usable = nullptr;
  float* scores = nullptr;
  int64_t score_rows = 0;
  int32_t* idx = nullptr;
  int64_t K = 0;
  bool qat_operands = false;  // q and keys hold index-QAT values (BF16-exact): tensor-core scoring
};
void index_topk(const IndexArgs& a, cudaStream_t s);
constexpr int64_t kTopkMaxK = 4096;                 // selected keys per row (the model: 512)
constexpr int64_t kIndexScoreBytes = int64_t(64) << 20;  // the scores scratch of one call

// ---- MoE family (moe.cu) -------------------------------------------------------------------
// scoring: 0 softmax, 1 sigmoid, 2 sqrtsoftplus. tid2eid: I32 (tid_i64 = 0) or I64.
struct RouteArgs {
  const float* logits = nullptr;  // [T, E]
  int64_t T = 0, E = 0, k = 0;
  int32_t scoring = 2;
  bool norm_topk = true;
  float routed_scale = 1.f;
  Vec bias;                         // may be null
  const void* tid2eid = nullptr;    // hash-routed when non-null
  int32_t tid_i64 = 0;
  const int32_t* tokens = nullptr;
  float* weights = nullptr;
  int32_t* experts = nullptr;
};
void route(const RouteArgs& a, cudaStream_t s);
// Groups the T*k assignments by expert: the E local experts are ids first..first+E-1 (expert
// parallelism; first = 0 and E = total otherwise). counts[E], offsets[E] (exclusive scan),
// perm[T*k] (token of each grouped row), slot[T*k] (grouped row of assignment t*k+i; kRemoteSlot
// for an expert of another rank, -1 for an id outside [0, total)). cursor: E ints scratch.
// active[0..zmax): the local experts with tokens in ascending order, then -1.
inline constexpr int32_t kRemoteSlot = -2;
void moe_group(const int32_t* experts, int64_t T, int64_t k, int64_t first, int64_t E, int64_t total, int32_t* counts,
               int32_t* offsets, int32_t* cursor, int32_t* perm, int32_t* slot, int32_t* active, int64_t zmax,
               cudaStream_t s);
// h1 <- silu(min(h1, L)) * clamp(h3, -L, L) (no clamp when L <= 0), rows*F elements.
void swiglu(float* h1, const float* h3, int64_t n, float limit, cudaStream_t s);
// out[t] = sum_i weights[t,i] * Y[slot[t*k+i]] (+ shared[t] when non-null); kRemoteSlot adds 0, -1 NaN.
void moe_combine(const float* Y, const int32_t* slot, const float* weights, const float* shared, int64_t T,
                 int64_t k, int64_t D, float* out, cudaStream_t s);

// ---- Expert cache (expert_cache.cu): routed experts in host memory, used from device slots ---
// A layer's experts live in pinned host memory (--offload-experts); before its expert GEMMs run,
// the experts they need are copied into slots of a device pool shared by all such layers (LRU),
// and the layer's descriptor table is pointed at them. Everything is decided on the device: no
// host synchronisation, so a cached layer still runs inside a CUDA graph.
// Slot layout: parts w1.w, w1.s, w2.w, w2.s, w3.w, w3.s of one expert at offsets off[] (bytes[]
// each, 0 for an absent scale), in the order of the layer tables (w1 | w2 | w3, E each).
struct ExpertSlotLayout {
  int64_t off[6] = {}, bytes[6] = {};
  int64_t slot_bytes = 0;
};
struct ExpertCacheArgs {
  const int32_t* active = nullptr;  // moe_group's active experts of the layer (ascending, then -1)
  int64_t zmax = 0;
  int32_t lo = 0, hi = 0;            // this pass: active[lo..hi) (at most S experts)
  int32_t E = 0;                     // experts of the layer
  int32_t* map = nullptr;            // [E] the layer's slot of each expert, -1 when not cached
  int32_t** owner = nullptr;         // [S] the map entry of the expert in each slot (null: empty)
  uint32_t* stamp = nullptr;         // [S] the pass that last used each slot (LRU)
  uint32_t* tick = nullptr;          // passes so far
  int32_t S = 0;
  const WeightDesc* home = nullptr;  // [3E] where the experts live (host memory)
  WeightDesc* live = nullptr;        // [3E] the table the GEMMs read
  uint8_t* slots = nullptr;
  ExpertSlotLayout layout;
  int32_t* zmap = nullptr;           // out [zmax]: active[i] for i in [lo, hi), else -1
  int32_t* order = nullptr;          // scratch [S]
  int32_t* job_slot = nullptr;       // out [S]: slots to fill, and the expert for each
  int32_t* job_expert = nullptr;
  int32_t* n_jobs = nullptr;
  unsigned long long* stats = nullptr;  // hits, misses, overflows (a pass needing more than S slots)
};
// Most slots one pool may have (the plan kernel sorts them in one block).
inline constexpr int64_t kExpertCacheMaxSlots = 4096;
// The plan (one block: hits refresh their stamp, misses take the least recently used slots not
// needed by this pass) and the copies of the missed experts over the bus (every SM).
void expert_cache_fetch(const ExpertCacheArgs& a, cudaStream_t s);

// ---- sampling (sample.cu) ------------------------------------------------------------------
// Backend::sample: one token per row of logits [B, V]; params [B, kSampleParams] (temperature,
// top_k, top_p, min_p), uniforms [B]. One block per row; no scratch memory.
void sample(const float* logits, int64_t B, int64_t V, const float* params, const float* uniforms, int32_t* tokens,
            cudaStream_t s);

// ---- random weights for the benchmark (random.cu) -----------------------------------------
// kind: 0 dense (uniform +-a), 1 constant a, 2 ids in [0, a) (int32 or int64 when bytes8).
void random_fill_f32(float* x, int64_t n, int kind, float a, uint64_t seed, cudaStream_t s);
void random_fill_bf16(uint16_t* x, int64_t n, int kind, float a, uint64_t seed, cudaStream_t s);
void random_fill_bytes(uint8_t* x, int64_t n, int fmt, uint64_t seed, cudaStream_t s);  // fmt: 0 e4m3, 1 packed e2m1
void fill_u8(uint8_t* x, int64_t n, uint8_t v, cudaStream_t s);
void random_ids(void* x, int64_t n, bool i64, int64_t below, uint64_t seed, cudaStream_t s);
// Holds the stream for `cycles` SM clocks (benchmarks queue timed work behind it).
void spin(int64_t cycles, cudaStream_t s);

// One call of the one-shot all-reduce (PeerAllReduce, peer_allreduce.h) on one rank: data[0, n)
// = the sum over ranks of their data, in rank order, through the ranks' buffers.
constexpr int kPeerMaxRanks = 8;
constexpr int kPeerMaxBlocks = 32;  // blocks of a call: each copies, flags and sums its own slice
struct PeerAllReduceArgs {
  float* buf[kPeerMaxRanks][2];   // rank q's buffers (two: calls alternate between them)
  uint64_t* flag[kPeerMaxRanks];  // rank q's flags, one a block: the last epoch its slice was copied
  int rank = 0, size = 0;
  uint64_t epoch = 0;  // this call's number (from 1), the same on every rank
};
void peer_all_reduce(const PeerAllReduceArgs& a, float* data, int64_t n, cudaStream_t s);

}  // namespace dsv4::cuda
