#pragma once
// Warp-level tensor-core products (mma.sync) shared by the GEMM and attention kernels.
#include <cstdint>

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

}  // namespace dsv4::cuda
