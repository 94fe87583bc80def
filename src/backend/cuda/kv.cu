// Production KV rows (layout: tensor/kv_format.h): store F32 rows into F32 or packed stores
// (pack_kv is the identity-row case), gather and decode packed rows, and the in-place round trip
// (quantize_kv). One set of device codecs (kv.cuh) serves all of them and the attention kernel,
// so quantize_kv(x) == unpack(pack(x)) bit for bit on the GPU. Also the indexer's QAT
// (index_qat: tensor/index_qat.h, shared with the CPU).
#include "backend/cuda/kv.cuh"
#include "tensor/index_qat.h"

namespace dsv4::cuda {

namespace {

// One block of 256 threads per input row i: store row rows ? rows[i] : i gets x[i], as F32
// values (L.bytes == 0: row stride L.dim floats) or as the packed production row. Rows < 0 and
// rows >= N are skipped.
__global__ void __launch_bounds__(256) store_rows_kernel(const float* x, const int32_t* rows, int64_t N,
                                                         KvRowLayout L, bool packed, void* store) {
  pdl_prologue();
  const int64_t i = blockIdx.x, r = rows ? int64_t(rows[i]) : i;
  if (r < 0 || r >= N) return;
  const float* v = x + i * L.dim;
  if (packed) {
    kv_encode_row(v, L, static_cast<uint8_t*>(store) + r * L.bytes);
  } else {
    float* o = static_cast<float*>(store) + r * L.dim;
    for (int64_t c = threadIdx.x; c < L.dim; c += blockDim.x) o[c] = v[c];
  }
}

// One block per output row: out[i] = decode(packed[rows ? rows[i] : i]); NaN for rows outside [0, N).
__global__ void unpack_kv_kernel(const uint8_t* packed, int64_t N, const int32_t* rows, KvRowLayout L, float* out) {
  pdl_prologue();
  const int64_t i = blockIdx.x, r = rows ? int64_t(rows[i]) : i;
  float* o = out + i * L.dim;
  if (r < 0 || r >= N) {
    for (int64_t c = threadIdx.x; c < L.dim; c += blockDim.x) o[c] = __int_as_float(0x7fc00000);
    return;
  }
  const uint8_t* row = packed + r * L.bytes;
  for (int64_t c = threadIdx.x; c < L.dim; c += blockDim.x) o[c] = kv_decode(row, L, c);
}

// In place: each value becomes decode(encode(value)), with the same codecs as above.
__global__ void quantize_kv_kernel(float* x, KvRowLayout L) {
  pdl_prologue();
  float* v = x + int64_t(blockIdx.x) * L.dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t b = int64_t(warp) * kKvScaleBlock; b < L.nope; b += int64_t(nw) * kKvScaleBlock) {
    const int64_t e = b + kKvScaleBlock < L.nope ? b + kKvScaleBlock : L.nope;
    const float scale = e8m0_to_float(kv_block_code(v, b, e, lane));
    for (int64_t i = b + lane; i < e; i += 32) v[i] = e4m3_to_float(kv_e4m3(v[i], scale)) * scale;
  }
  for (int64_t i = L.nope + threadIdx.x; i < L.dim; i += blockDim.x) v[i] = bf16_bits_to_float(kv_bf16(v[i]));
}

// Thread per row: the shared definition (tensor/index_qat.h) on a copy in registers (D a
// compile-time constant, the loops unrolled), so the rounding is the CPU's bit for bit.
template <int D>
__global__ void index_qat_kernel(float* x, int64_t rows) {
  pdl_prologue();
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  float v[D];
  float4* row = reinterpret_cast<float4*>(x + r * D);
#pragma unroll
  for (int i = 0; i < D / 4; ++i) {
    const float4 f = row[i];
    v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
  }
  index_qat_row(v, D);
#pragma unroll
  for (int i = 0; i < D / 4; ++i) row[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

}  // namespace

void index_qat(float* x, int64_t rows, int64_t d, cudaStream_t s) {
  if (rows <= 0) return;
  switch (d) {  // index_qat_applies(d)
    case 32: launch_pdl(index_qat_kernel<32>, blocks_for(rows, 128), 128, 0, s, x, rows); break;
    case 64: launch_pdl(index_qat_kernel<64>, blocks_for(rows, 128), 128, 0, s, x, rows); break;
    case 128: launch_pdl(index_qat_kernel<128>, blocks_for(rows, 128), 128, 0, s, x, rows); break;
    default: std::fprintf(stderr, "index_qat: row width %lld is not 32, 64 or 128\n", (long long)d), std::abort();
  }
  DSV4_LAUNCH_CHECK();
}

void quantize_kv(float* x, int64_t rows, int64_t d, int64_t nope, cudaStream_t s) {
  if (rows <= 0) return;
  launch_pdl(quantize_kv_kernel, unsigned(rows), 256, 0, s, x, kv_row_layout(d, nope));
  DSV4_LAUNCH_CHECK();
}

void store_rows(const float* x, const int32_t* rows, int64_t n, int64_t d, int64_t nope, void* store, int64_t N,
                bool packed, cudaStream_t s) {
  if (n <= 0 || d <= 0) return;
  launch_pdl(store_rows_kernel, unsigned(n), 256, 0, s, x, rows, N, kv_row_layout(d, nope), packed, store);
  DSV4_LAUNCH_CHECK();
}

void pack_kv(const float* x, int64_t rows, int64_t d, int64_t nope, uint8_t* packed, cudaStream_t s) {
  store_rows(x, nullptr, rows, d, nope, packed, rows, true, s);
}

void unpack_kv(const uint8_t* packed, int64_t N, const int32_t* rows, int64_t n, int64_t d, int64_t nope, float* out,
               cudaStream_t s) {
  if (n <= 0 || d <= 0) return;
  launch_pdl(unpack_kv_kernel, unsigned(n), 128, 0, s, packed, N, rows, kv_row_layout(d, nope), out);
  DSV4_LAUNCH_CHECK();
}

}  // namespace dsv4::cuda
