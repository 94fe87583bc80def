#pragma once
// Warp-level tensor-core products (mma.sync) and their BF16 operand helpers, shared by the GEMM,
// attention and conversion kernels.
#include <cstdint>

#include <cuda_bf16.h>
#include <nv/target>

namespace dsv4::cuda {

// c += a * b on one m16n8 tile with FP32 accumulators (fragments as the PTX ISA lays them out),
// compiled only for GPUs with the instruction; elsewhere it traps (the host never launches the
// kernels that use it there).
#define DSV4_MMA_16X8(name, provides_sm, shape_and_types)                                                 \
  __device__ __forceinline__ void name(float* c, const uint32_t* a, const uint32_t* b) {                 \
    NV_IF_ELSE_TARGET(provides_sm,                                                                       \
                      (asm volatile("mma.sync.aligned." shape_and_types                                  \
                                    " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"           \
                                    : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                     \
                                    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));), \
                      (__trap();))                                                                       \
  }
DSV4_MMA_16X8(mma_bf16, NV_PROVIDES_SM_80, "m16n8k16.row.col.f32.bf16.bf16.f32")
DSV4_MMA_16X8(mma_e4m3, NV_PROVIDES_SM_89, "m16n8k32.row.col.f32.e4m3.e4m3.f32")
#undef DSV4_MMA_16X8

// Four 8 x 8 matrices of 16-bit values from shared memory, lane l giving the address of row l % 8
// of matrix l / 8 (16-byte aligned); r[i] is this thread's fragment word of matrix i (row lane / 4,
// columns 2 (lane % 4) and + 1; kTrans: the transposed matrix's). sm_75 and newer.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// The BF16 pair (RNE) of two FP32 values as one 32-bit operand word, lo in the low half.
__device__ __forceinline__ uint32_t bf16x2_rn(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Two FP32 values (lower k first) as three BF16 pairs hi + mid + lo that sum to them exactly: each
// part rounds the remainder to 8 significant bits, and 3 x 8 covers FP32's 24. A BF16 value times
// each part is an exact FP32 product, so a tensor-core product over the three parts differs from
// the FP32 one only in the order of the sums.
__device__ __forceinline__ void split_bf16x3(float2 v, uint32_t (&part)[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    part[i] = bf16x2_rn(v.x, v.y);
    v.x -= __uint_as_float(part[i] << 16);
    v.y -= __uint_as_float(part[i] & 0xffff0000u);
  }
}

}  // namespace dsv4::cuda
