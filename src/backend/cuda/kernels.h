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
  // FP8 activations (act_quant output). When xq is set, x is unused and the tensor-core kernel
  // runs (FP8 or FP4 weights, K % 32 == 0, x_z_off == 0): activation row i (after x_rows) is
  // xq + i * ldxq with the scale of K-block kb at xs[kb * xs_ld + i].
  const uint8_t* xq = nullptr;
  int64_t ldxq = 0;
  const float* xs = nullptr;
  int64_t xs_ld = 0;
};
void gemm(const GemmArgs& a, cudaStream_t stream);
// Which path gemm() takes: rows per problem <= this use the weight-streaming GEMV kernel.
constexpr int64_t kGemvMaxRows = 16;

// Dynamic FP8 activation quantisation (tensor/quant.h fp8_dynamic_quant) of x [M, K] (row stride
// ldx) in 1x128 blocks: q [M, ldq] E4M3, scales [ceil(K/128), M] (row index fastest, the layout
// of cuBLASLt's VEC128 scales), roundtrip [M, K] = q * scale. Any output may be null.
void act_quant(const float* x, int64_t M, int64_t K, int64_t ldx, bool pow2, uint8_t* q, int64_t ldq, float* scales,
               float* roundtrip, cudaStream_t stream);

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
void hc_pre(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
            int64_t iters, float hc_eps, float norm_eps, float* u, float* post, float* comb, cudaStream_t s);
void hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t m, int64_t D,
             float* out, cudaStream_t s);
void hc_head(const float* X, int64_t T, int64_t m, int64_t D, const float* fn, const float* base, const float* scale,
             float hc_eps, float norm_eps, float* u, cudaStream_t s);
void gather_rows(const float* src, int64_t src_rows, int64_t d, const int32_t* rows, int64_t n, float* out,
                 cudaStream_t s);
void broadcast_streams(const float* v, float* X, int64_t T, int64_t m, int64_t D, bool accumulate, cudaStream_t s);

// ---- production KV rows (kv.cu; layout in tensor/kv_format.h) -----------------------------
// In place x [rows, d] -> the values its packed rows decode to.
void quantize_kv(float* x, int64_t rows, int64_t d, int64_t nope, cudaStream_t s);
// x [rows, d] -> packed [rows, kv_row_layout(d, nope).bytes].
void pack_kv(const float* x, int64_t rows, int64_t d, int64_t nope, uint8_t* packed, cudaStream_t s);
// out[i] = decode(packed[rows ? rows[i] : i]) for i < n, out [n, d]; NaN rows for indices outside [0, N).
void unpack_kv(const uint8_t* packed, int64_t N, const int32_t* rows, int64_t n, int64_t d, int64_t nope, float* out,
               cudaStream_t s);

// ---- attention family (attention.cu) -------------------------------------------------------
void attend(const float* q, int64_t T, int64_t H, int64_t d, const float* pool, int64_t N, const int32_t* idx_a,
            int64_t Ka, const int32_t* idx_b, int64_t Kb, Vec sinks, float scale, float* out, cudaStream_t s);
// Compressor (see CpuBackend::compress): writes n entries [n, d]; updates the state tensors.
struct CompressArgs {
  const float* kv;
  const float* gate;
  Vec ape;
  int64_t T, start, ratio, d;
  bool overlap, has_prev;
  float *st_kv, *st_gate, *st_prev_kv, *st_prev_gate;
  float* entries;
  int64_t n;  // windows completed in this chunk
};
void compress(const CompressArgs& a, cudaStream_t s);
// Indexer: scores [T, N] scratch, then top-k per row into idx [T, K].
void index_topk(const float* q, const float* w, float w_scale, int64_t T, int64_t H, int64_t d, const float* keys,
                int64_t N, const int32_t* usable, int64_t K, float* scratch, int32_t* idx, cudaStream_t s);
// Largest N index_topk can sort per row.
constexpr int64_t kTopkMaxKeys = 16384;

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
// Groups the T*k assignments by expert: counts[E], offsets[E] (exclusive scan), perm[T*k]
// (token of each grouped row), slot[T*k] (grouped row of assignment t*k+i). cursor: E ints scratch.
// active[0..zmax): the experts with tokens in ascending order, then -1.
void moe_group(const int32_t* experts, int64_t T, int64_t k, int64_t E, int32_t* counts, int32_t* offsets,
               int32_t* cursor, int32_t* perm, int32_t* slot, int32_t* active, int64_t zmax, cudaStream_t s);
// h1 <- silu(min(h1, L)) * clamp(h3, -L, L) (no clamp when L <= 0), rows*F elements.
void swiglu(float* h1, const float* h3, int64_t n, float limit, cudaStream_t s);
// out[t] = sum_i weights[t,i] * Y[slot[t*k+i]] (+ shared[t] when non-null).
void moe_combine(const float* Y, const int32_t* slot, const float* weights, const float* shared, int64_t T,
                 int64_t k, int64_t D, float* out, cudaStream_t s);

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

}  // namespace dsv4::cuda
