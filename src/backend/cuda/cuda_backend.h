#pragma once
// CUDA-only extras beyond the Backend interface: options, random on-device weights for the
// benchmark, device facts, and cuBLASLt reference timings.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace dsv4 {

struct CudaOptions {
  size_t arena_bytes = 0;  // activation/state arena; 0: DSV4_CUDA_ARENA_MB, else min(8 GiB, ~95% of free);
                           // SIZE_MAX: ~95% of what is free at the first allocation
  bool poison = false;     // fill every new tensor with 0xff (NaN / -1) as the CPU reference does:
                           // the GPU tests turn it on so unwritten outputs show; serving does not
                           // pay a memset per tensor
  // GEMMs of FP8 activations (Backend::set_act_quant) with more than a GEMV's rows: Auto takes
  // cuBLASLt's block-scaled FP8 GEMM for FP8 weights on sm_90 when it offers an algorithm, our
  // warpgroup-MMA kernel on sm_90a for FP4 weights (E8M0 scales, power-of-two activation
  // scales), else the portable mma.sync kernel (sm_89+). Kernel forces the portable kernel,
  // Warpgroup keeps cuBLASLt out (ours where it fits, the portable one elsewhere), CublasLt
  // forces cuBLASLt (failing when it cannot run the shape).
  enum class Fp8Gemm { Auto, Kernel, CublasLt, Warpgroup } fp8_gemm = Fp8Gemm::Auto;
  // Backend::run_graph captures fixed-shape steps as CUDA graphs and replays them; off: every
  // step runs its ops eagerly (the same ops: tests compare the two bit for bit).
  bool graphs = true;
};
std::unique_ptr<Backend> make_cuda_backend(int device, const CudaOptions& opts);

struct RandomTensorSpec {
  const TensorData* t = nullptr;  // data may be null: only name, dtype and shape are used
  Init init = Init::Dense;
  int64_t fan_in = 1;
  // The values' stream (with the seed); -1: the tensor's position in the list. The ranks of a
  // group give a tensor they all hold the same key, so replicated weights are equal on every rank.
  int64_t key = -1;
};
// Allocates one weight arena for these tensors and fills them on the device (no host copy).
void cuda_random_weights(Backend& be, const std::vector<RandomTensorSpec>& ts, uint64_t seed);

struct CudaDeviceInfo {
  std::string name;
  int sm_major = 0, sm_minor = 0, sms = 0;
  size_t total_bytes = 0, free_bytes = 0;
  double mem_bandwidth_gbs = 0;  // theoretical, from the memory clock and bus width
};
CudaDeviceInfo cuda_device_info(int device);
size_t cuda_arena_peak(Backend& be);  // bytes of the activation arena ever in use at once
void* cuda_stream(Backend& be);        // the cudaStream_t every op of the backend runs on
int cuda_device(Backend& be);          // its device
void cuda_set_fp8_gemm(Backend& be, CudaOptions::Fp8Gemm path);  // benchmarks compare the paths

// CUDA graphs of fixed-shape steps (Backend::run_graph): steps run eagerly (a key's first run, or
// graphs off), captured and replayed so far; the kernels and nodes of the last captured step (=
// the launches the step makes without a graph).
struct CudaGraphStats {
  int64_t eager = 0, captures = 0, replays = 0, kernels = 0, nodes = 0;
};
CudaGraphStats cuda_graph_stats(Backend& be);
void cuda_set_graphs(Backend& be, bool on);

// Device milliseconds per call of fn() (one warm-up call first): the stream is held by a spin
// kernel while the host enqueues reps calls between two events, so host launch gaps stay out and
// the calls run back to back as under a CUDA graph.
double cuda_device_ms(Backend& be, int reps, const std::function<void()>& fn);

// The expert cache of host-resident experts (Backend::set_host_resident): its slots, and since the
// backend was made, experts a pass found there (hits) or fetched over the bus (misses);
// overflows count passes that needed more experts than slots (a bug: their outputs are wrong).
struct CudaExpertCacheStats {
  int64_t slots = 0, slot_bytes = 0;
  uint64_t hits = 0, misses = 0, overflows = 0;
};
CudaExpertCacheStats cuda_expert_cache_stats(Backend& be);

// GB/s of host-to-device copies from pinned memory (median of a few copies of `bytes`): the bus
// rate that host-resident weights (Backend::set_host_resident) are read at, at best.
double cuda_host_to_device_gbs(size_t bytes);

// Median milliseconds of cuBLASLt BF16 x BF16 -> FP32 (FP32 accumulate) for y[M,N] = x[M,K] W[N,K]^T.
double cublaslt_bf16_gemm_ms(int64_t M, int64_t N, int64_t K, int reps);

}  // namespace dsv4
