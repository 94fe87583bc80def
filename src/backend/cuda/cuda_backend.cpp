// The CUDA backend: the same ops as the FP32 CPU reference (backend/cpu/cpu_backend.cpp), with
// weights kept in their checkpoint formats in one device arena and dequantised inside the
// kernels, FP32 activations and accumulation ("exact mode"). Activations and sequence state live
// in a second arena, sub-allocated per tensor (no cudaMalloc per step). Everything runs on one
// stream; host reads (download) synchronise it.
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <cuda_runtime.h>

#include "backend/cuda/cublaslt_gemm.h"
#include "backend/cuda/kernels.h"
#include "tensor/index_qat.h"
#include "tensor/kv_format.h"
#include "util/error.h"
#include "util/log.h"

namespace dsv4 {

#define DSV4_CK(expr)                                                                                      \
  do {                                                                                                     \
    cudaError_t e_ = (expr);                                                                               \
    if (e_ != cudaSuccess) ::dsv4::fail("CUDA error at {}:{}: {} ({})", __FILE__, __LINE__, cudaGetErrorString(e_), #expr); \
  } while (0)

namespace {

static_assert(cuda::kSegFirstRow == int64_t(kSegFirstRow) && cuda::kSegRows == int64_t(kSegRows) &&
                  cuda::kSegStart == int64_t(kSegStart) && cuda::kSegSlot == int64_t(kSegSlot) &&
                  cuda::kSegOutFirst == int64_t(kSegOutFirst) && cuda::kSegCols == int64_t(kSegCols),
              "kernels.h mirrors the per-sequence table of backend.h");

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Best-fit placement of aligned blocks in [0, size) with coalescing (host bookkeeping only).
class FreeList {
 public:
  explicit FreeList(size_t size) { free_[0] = size; }
  // The offset of a new block of `bytes` (aligned), or SIZE_MAX when no free range fits.
  size_t allocate(size_t bytes) {
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->second >= bytes && (best == free_.end() || it->second < best->second)) best = it;
    if (best == free_.end()) return SIZE_MAX;
    const size_t off = best->first, sz = best->second;
    free_.erase(best);
    if (sz > bytes) free_[off + bytes] = sz - bytes;
    return off;
  }
  void release(size_t off, size_t bytes) {
    auto it = free_.emplace(off, bytes).first;
    auto nx = std::next(it);
    if (nx != free_.end() && it->first + it->second == nx->first) {
      it->second += nx->second;
      free_.erase(nx);
    }
    if (it != free_.begin()) {
      auto pv = std::prev(it);
      if (pv->first + pv->second == it->first) {
        pv->second += it->second;
        free_.erase(it);
      }
    }
  }

 private:
  std::map<size_t, size_t> free_;
};

// One cudaMalloc (or a region of another arena: a CUDA graph's own memory), sub-allocated
// best-fit. Reuse is safe without events because every kernel runs on the backend's single
// stream in issue order.
class Arena {
 public:
  // What a traced run allocated and released, in order (offsets in this arena).
  struct Event {
    size_t off, bytes;
    bool alloc;
  };
  explicit Arena(size_t bytes) : size_(bytes), free_(bytes) { DSV4_CK(cudaMalloc(&base_, bytes)); }
  // `region` keeps the memory [base, base + bytes) alive while this arena's tensors live.
  Arena(uint8_t* base, size_t bytes, std::shared_ptr<uint8_t> region)
      : base_(base), size_(bytes), free_(bytes), region_(std::move(region)) {}
  ~Arena() {
    if (!region_) cudaFree(base_);
  }
  uint8_t* allocate(size_t bytes) {
    bytes = align_up(std::max<size_t>(bytes, 1));
    std::lock_guard<std::mutex> g(mu_);
    const size_t off = free_.allocate(bytes);
    if (off == SIZE_MAX)
      fail("CUDA activation arena exhausted: {} bytes requested, {} of {} bytes in use (raise DSV4_CUDA_ARENA_MB; "
           "with --offload-experts, --offload-reserve sizes it)",
           bytes, used_, size_);
    used_ += bytes;
    peak_ = std::max(peak_, used_);
    if (trace_) trace_->push_back({off, bytes, true});
    return base_ + off;
  }
  void release(uint8_t* p, size_t bytes) {
    bytes = align_up(std::max<size_t>(bytes, 1));
    std::lock_guard<std::mutex> g(mu_);
    used_ -= bytes;
    free_.release(size_t(p - base_), bytes);
    if (trace_) trace_->push_back({size_t(p - base_), bytes, false});
  }
  void set_trace(std::vector<Event>* t) {
    std::lock_guard<std::mutex> g(mu_);
    trace_ = t;
  }
  size_t peak() const { return peak_; }
  size_t size() const { return size_; }

 private:
  uint8_t* base_ = nullptr;
  size_t size_, used_ = 0, peak_ = 0;
  FreeList free_;
  std::shared_ptr<uint8_t> region_;
  std::vector<Event>* trace_ = nullptr;
  std::mutex mu_;
};

// The size of an empty arena in which the traced allocations land exactly as they will again:
// the extent they reach in an unbounded one, grown until a run in an arena of that very size
// (where best fit may place blocks differently) fits. Releases of blocks from before the trace
// are not the new arena's.
size_t graph_arena_bytes(const std::vector<Arena::Event>& trace) {
  auto run = [&](size_t size, size_t& extent) {
    FreeList fl(size);
    std::unordered_map<size_t, size_t> at;  // traced offset -> offset here
    extent = 0;
    for (const Arena::Event& e : trace) {
      if (e.alloc) {
        const size_t off = fl.allocate(e.bytes);
        if (off == SIZE_MAX) return false;
        at[e.off] = off;
        extent = std::max(extent, off + e.bytes);
      } else if (auto it = at.find(e.off); it != at.end()) {
        fl.release(it->second, e.bytes);
        at.erase(it);
      }
    }
    return true;
  };
  size_t extent = 0, unused = 0;
  run(SIZE_MAX / 2, extent);
  size_t bytes = std::max<size_t>(extent, kAlign);
  while (!run(bytes, unused)) bytes += align_up(bytes / 8);
  return bytes;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const CudaOptions& o) : device_(device), opts_(o) {
    DSV4_CK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    DSV4_CK(cudaGetDeviceProperties(&prop, device));
    sm_ = prop.major * 10 + prop.minor;
    DSV4_CK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
    DSV4_CK(cudaMallocHost(&ring_, kRing));
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(s_);
    for (auto& [key, g] : graphs_)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    for (void* p : extra_) cudaFree(p);
    if (weights_) cudaFree(weights_);
    if (host_weights_) cudaFreeHost(host_weights_);
    if (cache_.pool) cudaFree(cache_.pool);
    cudaFreeHost(ring_);
    cudaStreamDestroy(s_);
  }
  std::string name() const override { return "cuda"; }

  // ---- memory ----
  Tensor alloc(std::vector<int64_t> shape, ElemType type = ElemType::F32) override {
    if (!arena_) make_arena();
    Tensor t;
    t.type = type;
    t.shape = std::move(shape);
    const size_t bytes = size_t(std::max<int64_t>(t.numel(), 1) * elem_size(type));
    uint8_t* p = arena_->allocate(bytes);
    std::shared_ptr<Arena> arena = arena_;
    t.storage = std::shared_ptr<uint8_t>(p, [arena, bytes](uint8_t* q) { arena->release(q, bytes); });
    if (opts_.poison) DSV4_CK(cudaMemsetAsync(p, 0xff, bytes, s_));
    return t;
  }
  void upload(const Tensor& dst, const void* src) override {
    no_capture("an upload");
    const size_t bytes = size_t(dst.nbytes());
    if (!bytes) return;
    uint8_t* d = dst.storage.get() + dst.offset;
    if (bytes > kRing / 4) {
      DSV4_CK(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, s_));
      DSV4_CK(cudaStreamSynchronize(s_));
      return;
    }
    if (ring_pos_ + bytes > kRing) {  // every earlier staged copy must have landed before reuse
      DSV4_CK(cudaStreamSynchronize(s_));
      ring_pos_ = 0;
    }
    std::memcpy(ring_ + ring_pos_, src, bytes);
    DSV4_CK(cudaMemcpyAsync(d, ring_ + ring_pos_, bytes, cudaMemcpyHostToDevice, s_));
    ring_pos_ += align_up(bytes);
  }
  void download(const Tensor& src, void* dst) override {
    no_capture("a download");
    const size_t bytes = size_t(src.nbytes());
    if (bytes) DSV4_CK(cudaMemcpyAsync(dst, src.storage.get() + src.offset, bytes, cudaMemcpyDeviceToHost, s_));
    synchronize();
  }
  void fill(const Tensor& t, float v) override { cuda::fill(t.f32(), t.numel(), v, s_); }
  void copy(const Tensor& src, const Tensor& dst) override {
    DSV4_CHECK(src.numel() == dst.numel() && elem_size(src.type) == elem_size(dst.type));
    if (src.numel())
      DSV4_CK(cudaMemcpyAsync(dst.storage.get() + dst.offset, src.storage.get() + src.offset, size_t(src.nbytes()),
                              cudaMemcpyDeviceToDevice, s_));
  }
  void synchronize() override {
    no_capture("a stream synchronisation");
    DSV4_CK(cudaStreamSynchronize(s_));
    ring_pos_ = 0;
  }

  // ---- weights ----
  void set_host_resident(std::vector<const TensorData*> ts, size_t expert_cache_bytes) override {
    if (weights_ || host_weights_) fail("CUDA backend: set_host_resident after the weights were placed");
    host_resident_ = std::unordered_set<const TensorData*>(ts.begin(), ts.end());
    cache_.bytes = expert_cache_bytes;
  }
  // One device arena for the weights not yet placed, one pinned mapped host region for the
  // host-resident ones (their device addresses go to map_: kernels read them over the bus).
  // Returns the newly placed tensors.
  std::vector<const TensorData*> place_weights(const std::vector<const TensorData*>& ts) {
    size_t device = 0, host = 0;
    std::vector<const TensorData*> fresh;
    std::unordered_set<const TensorData*> seen;  // (tens of thousands of expert tensors)
    for (const TensorData* t : ts)
      if (!map_.count(t) && seen.insert(t).second) {
        fresh.push_back(t);
        (host_resident_.count(t) ? host : device) += align_up(t->nbytes);
      }
    if (fresh.empty()) return fresh;
    if (weights_ || host_weights_)
      fail("CUDA backend: weights of a second model; one backend holds one model's weights (one arena)");
    DSV4_CK(cudaMalloc(&weights_, std::max<size_t>(device, 1)));
    if (host) {
      if (cudaHostAlloc(&host_weights_, host, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess)
        fail("CUDA backend: {:.2f} GiB of pinned host memory for the host-resident experts could not be allocated",
             double(host) / double(1 << 30));
      DSV4_CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_weights_dev_), host_weights_, 0));
      if (cache_.bytes) make_expert_cache();  // none for a plan that moves only the embedding
    }
    size_t at_device = 0, at_host = 0;
    for (const TensorData* t : fresh) {
      size_t& at = host_resident_.count(t) ? at_host : at_device;
      map_[t] = (host_resident_.count(t) ? host_weights_dev_ : weights_) + at;
      at += align_up(t->nbytes);
    }
    return fresh;
  }
  void prepare_weights(const ModelWeights& w) override {
    const auto ts = place_weights(weight_tensors(w));
    size_t payload = 0;
    for (auto* t : ts) payload += t->nbytes;
    if (ts.empty()) return;
    constexpr size_t kChunk = 32 << 20;
    uint8_t* stage[2];
    cudaEvent_t ev[2];
    cudaStream_t up;
    DSV4_CK(cudaStreamCreateWithFlags(&up, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      DSV4_CK(cudaMallocHost(&stage[i], kChunk));
      DSV4_CK(cudaEventCreateWithFlags(&ev[i], cudaEventDisableTiming));
      DSV4_CK(cudaEventRecord(ev[i], up));
    }
    ProgressBar bar("uploading weights", payload);
    int turn = 0;
    for (auto* t : ts) {
      uint8_t* dst = map_.at(t);
      if (host_resident_.count(t)) {  // mapped pinned memory: the host pointer of the same bytes
        std::memcpy(host_weights_ + (dst - host_weights_dev_), t->data, t->nbytes);
        bar.advance(t->nbytes);
        continue;
      }
      for (size_t off = 0; off < t->nbytes; off += kChunk) {
        const size_t n = std::min(kChunk, t->nbytes - off);
        DSV4_CK(cudaEventSynchronize(ev[turn]));
        std::memcpy(stage[turn], t->data + off, n);  // reads the mmapped file (page faults here)
        DSV4_CK(cudaMemcpyAsync(dst + off, stage[turn], n, cudaMemcpyHostToDevice, up));
        DSV4_CK(cudaEventRecord(ev[turn], up));
        turn ^= 1;
        bar.advance(n);
      }
    }
    DSV4_CK(cudaStreamSynchronize(up));
    bar.finish();
    for (int i = 0; i < 2; ++i) {
      cudaFreeHost(stage[i]);
      cudaEventDestroy(ev[i]);
    }
    cudaStreamDestroy(up);
  }
  void random_weights(const std::vector<RandomTensorSpec>& ts, uint64_t seed) {
    std::vector<const TensorData*> all;
    for (const auto& r : ts) all.push_back(r.t);
    DSV4_CHECK(!weights_ && place_weights(all).size() == all.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      const RandomTensorSpec& r = ts[i];
      const TensorData& t = *r.t;
      uint8_t* p = map_.at(&t);  // host-resident ones are written over the bus
      const int64_t n = t.numel();
      const uint64_t k = seed + 1 + uint64_t(r.key >= 0 ? r.key : int64_t(i));
      const float dense = std::sqrt(3.f / float(std::max<int64_t>(r.fan_in, 1)));
      int kind = 0;
      float a = dense;
      switch (r.init) {
        case Init::Dense: break;
        case Init::Embedding: a = 1.f; break;
        case Init::NormWeight: kind = 1; a = 1.f; break;
        case Init::Sink: a = 0.5f; break;
        case Init::RouterBias: a = 0.1f; break;
        case Init::Ape: a = 0.5f; break;
        case Init::HcFn: break;
        case Init::HcBase: a = 0.5f; break;
        case Init::HcScale: kind = 1; a = 1.f; break;
        case Init::TokenToExpert: break;
      }
      switch (t.dtype) {
        case DType::F32: cuda::random_fill_f32(reinterpret_cast<float*>(p), n, kind, a, k, s_); break;
        case DType::BF16: cuda::random_fill_bf16(reinterpret_cast<uint16_t*>(p), n, kind, a, k, s_); break;
        case DType::F8_E4M3: cuda::random_fill_bytes(p, n, 0, k, s_); break;
        case DType::FP4_E2M1:
        case DType::I8: cuda::random_fill_bytes(p, int64_t(t.nbytes), 1, k, s_); break;
        case DType::F8_E8M0: cuda::fill_u8(p, n, uint8_t(127 - 7), s_); break;  // 2^-7 ~ 1/sqrt(fan_in)
        case DType::I32:
        case DType::I64: {
          const int64_t below = r.fan_in > 1 ? r.fan_in : 1;
          cuda::random_ids(p, n, t.dtype == DType::I64, below, k, s_);
          break;
        }
        default: fail("random weights: tensor '{}' has unsupported dtype {}", t.name, dtype_name(t.dtype));
      }
    }
    synchronize();
  }

  // ---- fixed-shape steps: CUDA graphs ----
  void run_graph(uint64_t key, const std::function<void()>& record) override {
    const FixedStep fixed(fixed_step_);
    if (!opts_.graphs) {
      record();
      ++graph_stats_.eager;
      return;
    }
    Graph& g = graphs_[key];
    if (g.exec) {
      DSV4_CK(cudaGraphLaunch(g.exec, s_));
      ++graph_stats_.replays;
      return;
    }
    if (!arena_) make_arena();
    if (!g.arena_bytes) {  // first run: eager, with lazy device set-up (tables, workspaces) and the arena traced
      std::vector<Arena::Event> trace;
      arena_->set_trace(&trace);
      try {
        record();
      } catch (...) {
        arena_->set_trace(nullptr);
        throw;
      }
      arena_->set_trace(nullptr);
      g.arena_bytes = graph_arena_bytes(trace);
      ++graph_stats_.eager;
      return;
    }
    // Second run: captured with its activations in an arena of its own, so that nothing allocated
    // between replays can hold the addresses the graph writes.
    Tensor region = alloc({int64_t(g.arena_bytes)}, ElemType::U8);
    auto arena = std::make_shared<Arena>(region.storage.get() + region.offset, g.arena_bytes, region.storage);
    std::shared_ptr<Arena> main = std::exchange(arena_, arena);
    cudaGraph_t graph = nullptr;
    DSV4_CK(cudaStreamBeginCapture(s_, cudaStreamCaptureModeThreadLocal));
    try {
      record();
    } catch (...) {
      arena_ = main;
      cudaStreamEndCapture(s_, &graph);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();  // an invalidated capture leaves its error behind
      throw;
    }
    arena_ = main;
    DSV4_CK(cudaStreamEndCapture(s_, &graph));
    size_t n = 0;
    DSV4_CK(cudaGraphGetNodes(graph, nullptr, &n));
    std::vector<cudaGraphNode_t> nodes(n);
    DSV4_CK(cudaGraphGetNodes(graph, nodes.data(), &n));
    int64_t kernels = 0;
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType type{};
      DSV4_CK(cudaGraphNodeGetType(node, &type));
      kernels += type == cudaGraphNodeTypeKernel;
    }
    const cudaError_t inst = cudaGraphInstantiate(&g.exec, graph, 0);
    cudaGraphDestroy(graph);
    DSV4_CK(inst);
    g.arena = std::move(arena);
    graph_stats_.captures++;
    graph_stats_.kernels = kernels;
    graph_stats_.nodes = int64_t(n);
    log_info("cuda graphs: step {} captured: {} kernels ({} nodes), {:.1f} MiB of activations", key, kernels, n,
             double(g.arena_bytes) / (1 << 20));
    DSV4_CK(cudaGraphLaunch(g.exec, s_));
  }
  void drop_graph(uint64_t key) override {
    auto it = graphs_.find(key);
    if (it == graphs_.end()) return;
    if (it->second.exec) {
      DSV4_CK(cudaStreamSynchronize(s_));  // not while a replay may still run
      cudaGraphExecDestroy(it->second.exec);
    }
    graphs_.erase(it);
  }
  CudaGraphStats graph_stats() const { return graph_stats_; }
  CudaExpertCacheStats expert_cache_stats() {
    CudaExpertCacheStats st;
    st.slots = cache_.slots;
    st.slot_bytes = cache_.layout.slot_bytes;
    if (!cache_.stats) return st;
    no_capture("a read of the expert cache counters");
    unsigned long long c[3];
    DSV4_CK(cudaMemcpyAsync(c, cache_.stats, sizeof c, cudaMemcpyDeviceToHost, s_));
    DSV4_CK(cudaStreamSynchronize(s_));
    st.hits = c[0];
    st.misses = c[1];
    st.overflows = c[2];
    return st;
  }
  void set_graphs(bool on) { opts_.graphs = on; }

  size_t arena_peak() const { return arena_ ? arena_->peak() : 0; }
  cudaStream_t stream() const { return s_; }
  int device() const { return device_; }
  double device_ms(int reps, const std::function<void()>& fn) {
    fn();
    synchronize();
    cudaEvent_t e0, e1;
    DSV4_CK(cudaEventCreate(&e0));
    DSV4_CK(cudaEventCreate(&e1));
    cuda::spin(int64_t(100000) * (reps + 10), s_);  // ~50 us per call at ~2 GHz: longer than enqueueing it
    DSV4_CK(cudaEventRecord(e0, s_));
    for (int i = 0; i < reps; ++i) fn();
    DSV4_CK(cudaEventRecord(e1, s_));
    synchronize();
    float ms = 0.f;
    DSV4_CK(cudaEventElapsedTime(&ms, e0, e1));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return double(ms) / reps;
  }
  void set_fp8_gemm(CudaOptions::Fp8Gemm path) { opts_.fp8_gemm = path; }
  std::optional<size_t> device_free_bytes() override {
    size_t free_b = 0, total = 0;
    DSV4_CK(cudaSetDevice(device_));
    DSV4_CK(cudaMemGetInfo(&free_b, &total));
    return free_b;
  }
  void set_arena_bytes(size_t bytes) override {
    if (arena_) fail("CUDA backend: the activation arena already exists ({} bytes); size it before the first allocation", arena_->size());
    opts_.arena_bytes = bytes;
  }

  // ---- ops ----
  void embed(const TensorData& table, const Tensor& ids, const Tensor& out) override {
    cuda::embed(vec(table), table.shape[1], ids.i32(), ids.numel(), out.f32(), s_);
  }
  void rms_norm(const Tensor& x, const TensorData* w, float eps, const Tensor& out) override {
    cuda::rms_norm(x.f32(), w ? vec(*w) : cuda::Vec{}, eps, x.rows(), x.cols(), out.f32(), s_);
  }
  void linear(const Tensor& x, const Linear& w, const Tensor& out) override {
    DSV4_CHECK(x.cols() == w.in && out.cols() == w.out && x.rows() == out.rows());
    // BF16 weights from 128 rows (prefill: router, compressors, indexer weights, the lm_head of
    // many rows): cuBLASLt on split x.
    if (x.rows() >= kSplitBf16MinRows && w.format == WeightFormat::BF16 && split_bf16_gemm(x, w, 1, out)) return;
    cuda::GemmArgs a;
    a.x = x.f32();
    a.ldx = w.in;
    a.y = out.f32();
    a.ldy = w.out;
    a.M = a.max_rows = x.rows();
    a.N = w.out;
    a.K = w.in;
    a.wd = desc(w);
    QuantizedRows qr;
    if (quantises_input(w)) {
      const int64_t M = x.rows(), K = w.in;
      // FP8 weights take the tensor cores from kFp8TensorCoreMinRows rows (forced cuBLASLt, for
      // benchmarks, at any M); fewer rows stream the FP32 round trip through the GEMV.
      const bool fp8_tc = w.format == WeightFormat::FP8 && sm_ >= 89 && K % 32 == 0 &&
                          (M >= cuda::kFp8TensorCoreMinRows || opts_.fp8_gemm == CudaOptions::Fp8Gemm::CublasLt);
      const bool for_tensor_cores = tensor_cores(M, K) || fp8_tc || skinny(M, a.wd.fmt, K);
      if (!for_tensor_cores && rounds_x_in_gemm(a)) return cuda::gemm(a, s_);
      qr = quantize_rows(x.f32(), M, K, for_tensor_cores, tensor_cores(M, K) && wants_bf16_rows(a.wd, K));
      if (qr.ldq) {
        if (fp8_tc && cublaslt_fp8(qr, a.wd, out.f32(), M)) return;
        a.xq = qr.bytes();
        a.ldxq = qr.ldq;
        a.xs = qr.scales.f32();
        a.xs_ld = M;
        a.warpgroup_mma = warpgroup_mma();
        a.xb = qr.bf16_rows();
        a.ldxb = qr.ldq;
      } else {
        a.x = qr.roundtrip.f32();
      }
    }
    cuda::gemm(a, s_);
  }
  // From kSplitBf16MinRows rows (prefill) the groups run as batched cuBLASLt BF16 GEMMs
  // (split_bf16_gemm: x split into three BF16 parts, the weight as BF16), so the products are
  // exact and only the summation order differs from the CPU.
  void grouped_linear(const Tensor& x, const Linear& w, int64_t groups, const Tensor& out) override {
    const int64_t T = x.dim(0), in = w.in, R = w.out / groups;
    DSV4_CHECK(x.numel() == T * groups * in && out.numel() == T * groups * R);
    if (T >= kSplitBf16MinRows && split_bf16_gemm(x, w, groups, out)) return;
    cuda::GemmArgs a;
    a.x = x.f32();
    a.ldx = groups * in;
    a.x_z_off = in;
    a.y = out.f32();
    a.ldy = groups * R;
    a.y_z_off = R;
    a.M = a.max_rows = T;
    a.N = R;
    a.K = in;
    a.wd = desc(w);
    a.w_z_row_off = R;
    a.Z = int(groups);
    cuda::gemm(a, s_);
  }
  static constexpr int64_t kSplitBf16MinRows = 128, kSplitBf16ChunkRows = 1024;
  // out [T, groups, R] = x [T, groups, in] . w^T per group on cuBLASLt BF16: x split into three
  // BF16 parts (exact), an FP8 weight with E8M0 scales dequantised into scratch (exact). False
  // (out untouched or to be rewritten) where the weight is not BF16-exact or cuBLASLt offers no
  // algorithm.
  bool split_bf16_gemm(const Tensor& x, const Linear& w, int64_t groups, const Tensor& out) {
    const cuda::WeightDesc d = desc(w);
    const bool exact = d.fmt == cuda::kBF16 || (d.fmt == cuda::kFP8 && !d.scale_f32 && w.in % 16 == 0);
    if (!exact || sm_ < 80) return false;
    const int64_t in = w.in, R = w.out / groups, width = groups * in, T = x.numel() / width;
    auto bf16 = [](const Tensor& t) { return reinterpret_cast<uint16_t*>(t.u8()); };
    Tensor wb;
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(d.w);
    if (d.fmt == cuda::kFP8) {
      wb = alloc({w.out * w.in * 2}, ElemType::U8);
      cuda::fp8_weight_to_bf16(d, bf16(wb), s_);
      wp = bf16(wb);
    }
    // Row chunks bound the scratch of the parts (3 x 2 bytes per value of x).
    const int64_t chunk = std::min(T, kSplitBf16ChunkRows);
    Tensor parts = alloc({3 * chunk * width * 2}, ElemType::U8);
    for (int64_t r0 = 0; r0 < T; r0 += chunk) {
      const int64_t rows = std::min(chunk, T - r0), n = rows * width;
      cuda::split_bf16_planes(x.f32() + r0 * width, n, bf16(parts), s_);
      for (int64_t p = 0; p < 3; ++p)
        if (!lt_.run_bf16(bf16(parts) + p * n, width, in, wp, out.f32() + r0 * groups * R, groups * R, R, rows, R, in,
                          groups, p > 0, s_))
          return false;  // the FP32 GEMM then rewrites all of out
    }
    return true;
  }
  void rope(const Tensor& x, const Tensor& pos, const RopeTable& table, int64_t rope_dim, bool inverse) override {
    const int64_t T = x.dim(0), heads = x.shape.size() == 3 ? x.dim(1) : 1;
    cuda::rope(x.f32(), pos.i32(), rope_table(table), T, heads, x.cols(), rope_dim, inverse, s_);
  }
  void hc_pre(const Tensor& X, const HyperConn& hc, int64_t iters, float hc_eps, float norm_eps, const Tensor& u,
              const Tensor& post, const Tensor& comb) override {
    Tensor scratch = alloc({cuda::hc_scratch_floats(X.dim(0), X.dim(1), X.dim(2))});
    cuda::hc_pre(X.f32(), X.dim(0), X.dim(1), X.dim(2), f32p(*hc.fn), f32p(*hc.base), f32p(*hc.scale), iters, hc_eps,
                 norm_eps, u.f32(), post.f32(), comb.f32(), scratch.f32(), s_);
  }
  void hc_post(const Tensor& y, const Tensor& X, const Tensor& post, const Tensor& comb, const Tensor& out) override {
    DSV4_CHECK(out.storage != X.storage || out.offset != X.offset);
    cuda::hc_post(y.f32(), X.f32(), post.f32(), comb.f32(), X.dim(0), X.dim(1), X.dim(2), out.f32(), s_);
  }
  void hc_head(const Tensor& X, const HyperConn& hc, float hc_eps, float norm_eps, const Tensor& u) override {
    Tensor scratch = alloc({cuda::hc_scratch_floats(X.dim(0), X.dim(1), X.dim(2))});
    cuda::hc_head(X.f32(), X.dim(0), X.dim(1), X.dim(2), f32p(*hc.fn), f32p(*hc.base), f32p(*hc.scale), hc_eps,
                  norm_eps, u.f32(), scratch.f32(), s_);
  }
  void attend(const Tensor& q, const Tensor& window, const Tensor& fresh, const Tensor& idx_a, const Tensor& entries,
              const Tensor& idx_b, int64_t nope, const TensorData& sinks, float scale, const Tensor& out) override {
    cuda::AttendArgs a;
    a.q = q.f32();
    a.T = q.dim(0);
    a.H = q.dim(1);
    a.d = q.dim(2);
    a.nope = nope;
    DSV4_CHECK(nope >= 0 && nope <= a.d);
    // Window and entries: one format (F32 or packed) between them; fresh keys are F32.
    const Tensor* stores[2] = {&window, &entries};
    int packed = -1;
    for (const Tensor* st : stores) {
      if (st->empty()) continue;
      const bool p = st->type == ElemType::U8;
      DSV4_CHECK(p ? st->cols() == kv_row_layout(a.d, nope).bytes : st->type == ElemType::F32 && st->cols() == a.d);
      if (packed >= 0 && packed != int(p)) fail("attend: window and entries stores differ in format (F32 vs packed)");
      packed = int(p);
    }
    a.packed = packed == 1;
    if (!window.empty()) a.window = {window.storage.get() + window.offset, window.rows()};
    if (!entries.empty()) a.entries = {entries.storage.get() + entries.offset, entries.rows()};
    if (!fresh.empty()) {
      DSV4_CHECK(fresh.type == ElemType::F32 && fresh.cols() == a.d);
      a.fresh = fresh.f32();
      a.n_fresh = fresh.rows();
    }
    a.idx_a = idx_a.i32();
    a.Ka = idx_a.cols();
    a.Kb = idx_b.empty() ? 0 : idx_b.cols();
    a.idx_b = a.Kb ? idx_b.i32() : nullptr;
    DSV4_CHECK(idx_a.rows() == a.T && (!a.Kb || idx_b.rows() == a.T));
    a.sinks = vec(sinks);
    a.scale = scale;
    a.out = out.f32();
    Tensor scratch = alloc({cuda::attend_scratch_floats(a)});
    a.scratch = scratch.f32();
    cuda::attend(a, s_);
  }
  void compress(const Tensor& kv, const Tensor& gate, const TensorData& ape, const Tensor& seqs, int64_t ratio,
                bool overlap, const CompressorSlots& st, const Tensor& entries) override {
    DSV4_CHECK(seqs.cols() == kSegCols && ratio > 0);
    cuda::CompressArgs a;
    a.kv = kv.f32();
    a.gate = gate.f32();
    a.ape = vec(ape);
    a.seqs = seqs.i32();
    a.T = kv.rows();
    a.S = seqs.rows();
    a.ratio = ratio;
    a.d = kv.cols() / (overlap ? 2 : 1);
    a.overlap = overlap;
    a.st_kv = st.kv.f32();
    a.st_gate = st.gate.f32();
    if (overlap) {
      a.st_prev_kv = st.prev_kv.f32();
      a.st_prev_gate = st.prev_gate.f32();
    }
    a.entries = entries.empty() ? nullptr : entries.f32();
    cuda::compress(a, s_);
  }
  void index_topk(const Tensor& q, const Tensor& w, float w_scale, const Tensor& keys, const Tensor& block_table,
                  int64_t per_block, const Tensor& query_seq, const Tensor& usable, const Tensor& idx,
                  bool qat_operands) override {
    cuda::IndexArgs a;
    a.qat_operands = qat_operands;
    a.q = q.f32();
    a.w = w.f32();
    a.w_scale = w_scale;
    a.T = q.dim(0);
    a.H = q.dim(1);
    a.d = q.dim(2);
    a.keys = keys.f32();
    a.N = keys.rows();
    a.block_table = block_table.i32();
    a.S = block_table.rows();
    a.max_blocks = block_table.cols();
    a.per_block = per_block;
    a.n_max = a.max_blocks * per_block;
    if (idx.cols() > cuda::kTopkMaxK) fail("index_topk: top-{} exceeds the CUDA limit of {}", idx.cols(), cuda::kTopkMaxK);
    if (a.n_max >= int64_t(INT32_MAX)) fail("index_topk: {} keys per sequence overflow 32-bit indices", a.n_max);
    a.query_seq = query_seq.i32();
    a.usable = usable.i32();
    // At most kIndexScoreBytes of scores at a time (1M context: 64 query rows of 262,144 keys).
    a.score_rows = std::clamp<int64_t>(cuda::kIndexScoreBytes / 4 / std::max<int64_t>(a.n_max, 1), 1, std::max<int64_t>(a.T, 1));
    Tensor scratch = alloc({std::max<int64_t>(a.score_rows * a.n_max, 1)}, ElemType::F32);
    a.scores = scratch.f32();
    a.idx = idx.i32();
    a.K = idx.cols();
    cuda::index_topk(a, s_);
  }
  void route(const Tensor& x, const MoEWeights& moe, const Tensor& tokens, const ModelConfig& cfg, const Tensor& weights,
             const Tensor& experts) override {
    const int64_t T = x.dim(0), E = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
    if (k > 64) fail("CUDA router: top-{} exceeds 64", k);
    Tensor logits = alloc({T, E});
    linear(x, dense_linear(*moe.gate), logits);
    cuda::RouteArgs a;
    a.logits = logits.f32();
    a.T = T;
    a.E = E;
    a.k = k;
    a.scoring = cfg.scoring_func == "softmax" ? 0 : cfg.scoring_func == "sigmoid" ? 1 : 2;
    a.norm_topk = cfg.norm_topk_prob;
    a.routed_scale = float(cfg.routed_scaling_factor);
    if (moe.bias) a.bias = vec(*moe.bias);
    if (moe.hash_routed) {
      a.tid2eid = dev(*moe.tid2eid);
      if (moe.tid2eid->dtype != DType::I32 && moe.tid2eid->dtype != DType::I64)
        fail("tensor '{}': expected I32 or I64, got {}", moe.tid2eid->name, dtype_name(moe.tid2eid->dtype));
      a.tid_i64 = moe.tid2eid->dtype == DType::I64;
    }
    a.tokens = tokens.i32();
    a.weights = weights.f32();
    a.experts = experts.i32();
    cuda::route(a, s_);
  }
  void moe(const Tensor& x, const MoEWeights& moe, const Tensor& weights, const Tensor& experts, float limit,
           const Tensor& out) override {
    const int64_t T = x.dim(0), D = x.cols(), k = experts.cols(), E = int64_t(moe.experts.size());
    const MoeTables& tb = moe_tables(moe);
    const int64_t F = moe.experts.at(0).w1.out, n = T * k;
    Tensor counts = alloc({E}, ElemType::I32), offsets = alloc({E}, ElemType::I32), cursor = alloc({E}, ElemType::I32);
    Tensor perm = alloc({n}, ElemType::I32), slot = alloc({n}, ElemType::I32);
    // Grid slices only for experts that received tokens (at most min(E, T*k) of them).
    const int64_t zmax = std::min(E, n);
    Tensor active = alloc({std::max<int64_t>(zmax, 1)}, ElemType::I32);
    cuda::moe_group(experts.i32(), T, k, moe.first_expert, E, moe.routed_experts(), counts.i32(), offsets.i32(),
                    cursor.i32(), perm.i32(), slot.i32(), active.i32(), zmax, s_);
    // Rows per expert: at most T for learned routing (distinct experts), T*k for hash tables. A
    // fixed-shape step cannot read the counts back: it keeps the bound.
    int64_t max_rows = moe.hash_routed ? n : T;
    if (max_rows > 64 && !fixed_step_) {
      std::vector<int32_t> c(E);
      download(counts, c.data());
      max_rows = E ? *std::max_element(c.begin(), c.end()) : 0;
    }
    Tensor h1 = alloc({n, F}), h3 = alloc({n, F}), y = alloc({n, D});
    // Experts in host memory: passes over at most one pool of the active experts (ranks
    // [lo, lo + pass_size) of `active`), each fetched into the cache first (zmap: the pass's
    // experts). The kernels and their row layout are those of one pass over device-resident
    // experts, so the results are bit for bit the same. zmax bounds the active experts: the host
    // does not know how many there are, a pass past the last one plans nothing.
    const int64_t pass_size = tb.cached ? std::min(zmax, cache_.slots) : zmax;
    const int64_t passes = max_rows > 0 && pass_size > 0 ? (zmax + pass_size - 1) / pass_size : 0;
    Tensor pass_zmap = tb.cached ? alloc({std::max<int64_t>(zmax, 1)}, ElemType::I32) : Tensor{};
    // FP8 activations: E4M3 rows for the tensor-core kernel, or their FP32 round trip for the GEMV.
    const bool force_gemv = n <= 4 * E;  // <= 4 rows per expert on average: stream each expert's weights once
    const bool quant = act_quant_ != ActQuant::None && (tb.first.fmt == cuda::kFP8 || tb.first.fmt == cuda::kFP4);
    const bool tc = quant && !force_gemv && tensor_cores(max_rows, D) && F % 32 == 0;
    // Few rows per expert with FP8 activations: the weight-streaming tensor-core kernel.
    const bool sk = quant && !tc && skinny(force_gemv ? 1 : max_rows, tb.first.fmt, D) &&
                    cuda::skinny_fits(tb.first.fmt, F);
    QuantizedRows qx, qh;
    const float* xin = x.f32();
    if (quant) {
      qx = quantize_rows(x.f32(), T, D, tc || sk, tc && wants_bf16_rows(tb.first, D));
      if (!tc && !sk) xin = qx.roundtrip.f32();
    }
    auto expert_args = [&](const cuda::WeightDesc* descs, const float* xin, const QuantizedRows& q, int64_t q_rows,
                           const int32_t* rows, int64_t ldx, float* yout, int64_t N, int64_t K) {
      cuda::GemmArgs a;
      a.x = xin;
      a.ldx = ldx;
      if (q.ldq) {
        a.xq = q.bytes();
        a.ldxq = q.ldq;
        a.xs = q.scales.f32();
        a.xs_ld = q_rows;
        a.warpgroup_mma = warpgroup_mma();
        a.xb = q.bf16_rows();
        a.ldxb = q.ldq;
      }
      a.x_rows = rows;
      a.y = yout;
      a.ldy = N;
      a.N = N;
      a.K = K;
      a.counts = counts.i32();
      a.offsets = offsets.i32();
      a.max_rows = max_rows;
      a.descs = descs;
      a.wd = tb.first;
      a.Z = int(zmax);
      a.zmap = tb.cached ? pass_zmap.i32() : active.i32();
      a.force_gemv = force_gemv;
      a.typical_rows = (n + zmax - 1) / zmax;  // assignments over the active slices
      return a;
    };
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t lo = pass * pass_size;
      if (tb.cached) fetch_experts(tb, active, zmax, lo, std::min(zmax, lo + pass_size), pass_zmap);
      cuda::GemmArgs up = expert_args(tb.w1, xin, qx, T, perm.i32(), D, h1.f32(), F, D);
      up.descs3 = tb.w3;
      up.wd3 = tb.first;
      up.swiglu_limit = limit;
      cuda::gemm_swiglu(up, n, h3.f32(), s_);
      const float* hin = h1.f32();
      if (quant) {
        if (tc || sk) qh = quantize_rows(h1.f32(), n, F, true, tc && wants_bf16_rows(tb.first, F));
        else if (passes > 1) hin = (qh = quantize_rows(h1.f32(), n, F, false)).roundtrip.f32();  // rows of later passes stay unrounded
        else cuda::act_quant(h1.f32(), n, F, F, pow2_scales(), nullptr, 0, nullptr, h1.f32(), nullptr, s_);  // in place
      }
      cuda::gemm(expert_args(tb.w2, hin, qh, n, nullptr, F, y.f32(), D, F), s_);
    }
    Tensor shared;
    if (moe.has_shared) {
      const int64_t Fs = moe.shared.w1.out;
      Tensor s1 = alloc({T, Fs}), s3 = alloc({T, Fs});
      shared = alloc({T, D});
      if (T < cuda::kFp8TensorCoreMinRows && opts_.fp8_gemm != CudaOptions::Fp8Gemm::CublasLt) {
        // GEMV-sized (as linear() decides): w1 and w3 in one streaming pass with the SwiGLU fused, on the FP32 round
        // trip of x that linear() would make (the routed experts' one when they made it, else the GEMV's own).
        cuda::GemmArgs a;
        a.x = x.f32();
        QuantizedRows qs;
        bool round_x = false;
        if (quantises_input(moe.shared.w1)) {
          if (skinny(T, desc(moe.shared.w1).fmt, D)) {  // FP8 bytes: the weight-streaming tensor-core kernel
            const QuantizedRows& q = qx.ldq ? qx : (qs = quantize_rows(x.f32(), T, D, true));
            a.xq = q.bytes();
            a.ldxq = q.ldq;
            a.xs = q.scales.f32();
            a.xs_ld = T;
          } else if (!qx.roundtrip.empty()) {
            a.x = qx.roundtrip.f32();
          } else {
            round_x = true;  // once the shape is set: in the GEMV where it can, else act_quant
          }
        }
        a.ldx = D;
        a.y = s1.f32();
        a.ldy = Fs;
        a.M = a.max_rows = T;
        a.N = Fs;
        a.K = D;
        a.wd = desc(moe.shared.w1);
        a.wd3 = desc(moe.shared.w3);
        a.swiglu_limit = limit;
        if (round_x && !rounds_x_in_gemm(a)) {
          qx = quantize_rows(x.f32(), T, D, false);
          a.x = qx.roundtrip.f32();
        }
        cuda::gemm_swiglu(a, T, s3.f32(), s_);
      } else {
        linear(x, moe.shared.w1, s1);
        linear(x, moe.shared.w3, s3);
        cuda::swiglu(s1.f32(), s3.f32(), T * Fs, limit, s_);
      }
      linear(s1, moe.shared.w2, shared);
    }
    cuda::moe_combine(y.f32(), slot.i32(), weights.f32(), moe.has_shared ? shared.f32() : nullptr, T, k, D, out.f32(),
                      s_);
  }
  void gather_rows(const Tensor& src, const Tensor& rows, const Tensor& out) override {
    cuda::gather_rows(src.f32(), src.rows(), src.cols(), rows.i32(), rows.numel(), out.f32(), s_);
  }
  void broadcast_streams(const Tensor& v, const Tensor& X, bool accumulate) override {
    cuda::broadcast_streams(v.f32(), X.f32(), X.dim(0), X.dim(1), X.dim(2), accumulate, s_);
  }
  void quantize_kv(const Tensor& x, int64_t nope) override {
    DSV4_CHECK(nope >= 0 && nope <= x.cols());
    cuda::quantize_kv(x.f32(), x.rows(), x.cols(), nope, s_);
  }
  void index_qat(const Tensor& x) override {
    DSV4_CHECK(index_qat_applies(x.cols()));
    cuda::index_qat(x.f32(), x.rows(), x.cols(), s_);
  }
  void pack_kv(const Tensor& x, int64_t nope, const Tensor& packed) override {
    DSV4_CHECK(nope >= 0 && nope <= x.cols());
    DSV4_CHECK(packed.cols() == kv_row_layout(x.cols(), nope).bytes && packed.rows() == x.rows());
    cuda::pack_kv(x.f32(), x.rows(), x.cols(), nope, packed.u8(), s_);
  }
  void unpack_kv(const Tensor& packed, const Tensor& rows, int64_t nope, const Tensor& out) override {
    const int64_t n = out.rows();
    DSV4_CHECK(nope >= 0 && nope <= out.cols());
    DSV4_CHECK(packed.cols() == kv_row_layout(out.cols(), nope).bytes);
    DSV4_CHECK(rows.empty() ? n <= packed.rows() : rows.numel() == n);
    cuda::unpack_kv(packed.u8(), packed.rows(), rows.empty() ? nullptr : rows.i32(), n, out.cols(), nope, out.f32(), s_);
  }
  void store_rows(const Tensor& x, const Tensor& rows, int64_t nope, const Tensor& store) override {
    const int64_t n = x.rows(), d = x.cols();
    DSV4_CHECK(rows.numel() == n && nope >= 0 && nope <= d);
    const bool packed = store.type == ElemType::U8;
    DSV4_CHECK(packed ? store.cols() == kv_row_layout(d, nope).bytes : store.type == ElemType::F32 && store.cols() == d);
    cuda::store_rows(x.f32(), rows.i32(), n, d, nope, store.storage.get() + store.offset, store.rows(), packed, s_);
  }

  void sample(const Tensor& logits, const Tensor& params, const Tensor& uniforms, const Tensor& tokens) override {
    const int64_t B = logits.rows(), V = logits.cols();
    DSV4_CHECK(params.rows() == B && params.cols() == kSampleParams && uniforms.numel() == B && tokens.numel() == B);
    DSV4_CHECK(V > 0 && V < (int64_t(1) << 30));
    cuda::sample(logits.f32(), B, V, params.f32(), uniforms.f32(), tokens.i32(), s_);
  }

 private:
  static constexpr size_t kRing = 16 << 20;

  // A recorded fixed-shape step: the activation bytes it needs (from its eager first run), then
  // its graph and the arena it was captured in.
  struct Graph {
    size_t arena_bytes = 0;
    std::shared_ptr<Arena> arena;
    cudaGraphExec_t exec = nullptr;
  };
  // Marks the ops enqueued while it lives as part of a fixed-shape step.
  struct FixedStep {
    bool& flag;
    explicit FixedStep(bool& f) : flag(f) { flag = true; }
    ~FixedStep() { flag = false; }
  };
  // Host reads, staged uploads and synchronisation cannot be part of a graph: a step that tries
  // fails here, naming what it did, instead of with an invalidated capture.
  void no_capture(const char* what) const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    DSV4_CK(cudaStreamIsCapturing(s_, &st));
    if (st != cudaStreamCaptureStatusNone)
      fail("CUDA graph capture: {} inside a fixed-shape step (inputs must be in place before Backend::run_graph)",
           what);
  }

  // FP8 activation rows (act_quant): E4M3 bytes + scales [K/128][M] for the tensor-core GEMMs
  // (ldq > 0), with their BF16 values where the warpgroup kernel takes them (bf16_rows), or else
  // the FP32 round trip.
  struct QuantizedRows {
    Tensor q, scales, roundtrip, bf16;
    int64_t ldq = 0;
    const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(q.i32()); }
    uint16_t* bf16_rows() const { return bf16.empty() ? nullptr : reinterpret_cast<uint16_t*>(bf16.i32()); }
  };
  QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool for_tensor_cores, bool bf16_rows = false) {
    QuantizedRows r;
    if (for_tensor_cores) {
      r.ldq = (K + 15) / 16 * 16;
      r.q = alloc({(M * r.ldq + 3) / 4}, ElemType::I32);
      r.scales = alloc({(K + 127) / 128, M});
      if (bf16_rows) r.bf16 = alloc({(M * r.ldq + 1) / 2}, ElemType::I32);
      cuda::act_quant(x, M, K, K, pow2_scales(), reinterpret_cast<uint8_t*>(r.q.i32()), r.ldq, r.scales.f32(),
                      nullptr, r.bf16_rows(), s_);
    } else {
      r.roundtrip = alloc({M, K});
      cuda::act_quant(x, M, K, K, pow2_scales(), nullptr, 0, nullptr, r.roundtrip.f32(), nullptr, s_);
    }
    return r;
  }
  using XRoundTrip = cuda::GemmArgs::XRoundTrip;
  // The one-row stream GEMV rounds x through FP8 itself while staging it (no act_quant launch):
  // sets a.x_roundtrip and says true where that kernel runs.
  bool rounds_x_in_gemm(cuda::GemmArgs& a) const {
    a.x_roundtrip = pow2_scales() ? XRoundTrip::Pow2 : XRoundTrip::Amax;
    if (cuda::gemm_rounds_x(a)) return true;
    a.x_roundtrip = XRoundTrip::None;
    return false;
  }
  // FP8 tensor cores (mma.sync E4M3) exist from sm_89; GEMV-sized problems stay on the GEMV.
  bool tensor_cores(int64_t rows, int64_t K) const { return sm_ >= 89 && K % 32 == 0 && rows > cuda::kGemvMaxRows; }
  // ... or, with FP8 activations, on its weight-streaming tensor-core twin (gemm_fp8.cu). One row
  // of an FP8 weight stays on the FP32 stream GEMV of its round trip (H200, 1d16e6f: wq_b 19.1 vs
  // 26.5 us, wo_b 18.5 vs 25.1 us per call); FP4 experts take the twin from one row.
  bool skinny(int64_t rows, int32_t fmt, int64_t K) const {
    return sm_ >= 89 && (rows >= 2 || fmt == cuda::kFP4) && rows <= cuda::kGemvMaxRows && cuda::skinny_fits(fmt, K);
  }
  // Whether FP8-activation GEMMs may take the warpgroup-MMA kernel (GemmArgs::warpgroup_mma).
  bool warpgroup_mma() const { return opts_.fp8_gemm != CudaOptions::Fp8Gemm::Kernel && pow2_scales(); }
  // Whether FP8 rows of K columns for this weight should carry their BF16 values (the warpgroup
  // kernel's operand), where that kernel runs.
  bool wants_bf16_rows(const cuda::WeightDesc& w, int64_t K) const {
    return cuda::wgmma_weight_fits(w, K) && warpgroup_mma() && cuda::wgmma_available();
  }
  // cuBLASLt's block-scaled FP8 GEMM (sm_90 only); false when not chosen or not offered.
  bool cublaslt_fp8(const QuantizedRows& q, const cuda::WeightDesc& w, float* y, int64_t M) {
    using F = CudaOptions::Fp8Gemm;
    if (opts_.fp8_gemm == F::Kernel || opts_.fp8_gemm == F::Warpgroup || (opts_.fp8_gemm == F::Auto && sm_ / 10 != 9))
      return false;
    float*& ws = padded_scales_[w.s];
    if (!ws) {
      no_capture("a new cuBLASLt scale layout");
      void* p = nullptr;
      DSV4_CK(cudaMalloc(&p, size_t((w.out + 127) / 128 * cuda::padded_scale_cols(w.in)) * 4));
      extra_.push_back(p);
      ws = static_cast<float*>(p);
      cuda::padded_block_scales(w.s, w.scale_f32, w.out, w.in, ws, s_);
    }
    const bool ran = lt_.run_fp8(q.bytes(), q.ldq, q.scales.f32(), w.w, ws, y, w.out, M, w.out, w.in, s_);
    if (!ran && opts_.fp8_gemm == F::CublasLt)
      fail("cuBLASLt offers no block-scaled FP8 algorithm for {} x {} x {} on sm_{}", M, w.out, w.in, sm_);
    return ran;
  }

  struct MoeTables {
    std::vector<cuda::WeightDesc> host;  // w1 | w2 | w3, E each
    cuda::WeightDesc* devp = nullptr;
    size_t capacity = 0;  // descriptors devp holds
    cuda::WeightDesc first;
    const cuda::WeightDesc *w1 = nullptr, *w2 = nullptr, *w3 = nullptr;
    // Host-resident experts: devp is rewritten as experts enter the cache; home keeps where they
    // live, map their slots (cuda::ExpertCacheArgs).
    bool cached = false;
    cuda::WeightDesc* home = nullptr;
    int32_t* map = nullptr;
  };
  // The device pool host-resident experts are used from (cuda::expert_cache_fetch): slots of one
  // expert each (the layout of the first cached layer; all must match) and the LRU state.
  struct ExpertCache {
    size_t bytes = 0;  // set_host_resident's budget
    uint8_t* pool = nullptr;
    cuda::ExpertSlotLayout layout;
    int64_t slots = 0;
    int32_t** owner = nullptr;
    uint32_t *stamp = nullptr, *tick = nullptr;
    int32_t *order = nullptr, *job_slot = nullptr, *job_expert = nullptr, *n_jobs = nullptr;
    unsigned long long* stats = nullptr;  // hits, misses, overflows
  };
  // The pool (its budget, set before the weights are placed) and the LRU state, all empty.
  void make_expert_cache() {
    DSV4_CK(cudaMalloc(&cache_.pool, cache_.bytes));
    constexpr int64_t S = cuda::kExpertCacheMaxSlots;
    const size_t state = S * (sizeof(int32_t*) + 4 * sizeof(int32_t) + sizeof(uint32_t)) + 4 * 3 + 8 * 3 + 64;
    void* p = nullptr;
    DSV4_CK(cudaMalloc(&p, state));
    DSV4_CK(cudaMemset(p, 0, state));
    extra_.push_back(p);
    uint8_t* at = static_cast<uint8_t*>(p);
    auto take = [&](size_t bytes) {
      uint8_t* r = at;
      at += (bytes + 7) / 8 * 8;
      return r;
    };
    cache_.owner = reinterpret_cast<int32_t**>(take(S * sizeof(int32_t*)));
    cache_.stats = reinterpret_cast<unsigned long long*>(take(3 * 8));
    cache_.stamp = reinterpret_cast<uint32_t*>(take(S * 4));
    cache_.order = reinterpret_cast<int32_t*>(take(S * 4));
    cache_.job_slot = reinterpret_cast<int32_t*>(take(S * 4));
    cache_.job_expert = reinterpret_cast<int32_t*>(take(S * 4));
    cache_.tick = reinterpret_cast<uint32_t*>(take(4));
    cache_.n_jobs = reinterpret_cast<int32_t*>(take(4));
  }
  // A cached layer's slot layout: its experts' parts (w1 | w2 | w3, weight then scale), 256-byte
  // aligned. The first cached layer sizes the pool's slots; the others must match them.
  void check_slot_layout(const MoEWeights& m) {
    cuda::ExpertSlotLayout l;
    auto parts = [](const ExpertWeights& e) {
      std::array<size_t, 6> b{};
      const Linear* ls[3] = {&e.w1, &e.w2, &e.w3};
      for (int i = 0; i < 3; ++i) {
        b[2 * i] = ls[i]->weight->nbytes;
        b[2 * i + 1] = ls[i]->scale ? ls[i]->scale->nbytes : 0;
      }
      return b;
    };
    const auto first = parts(m.experts[0]);
    for (int i = 0; i < 6; ++i) {
      l.off[i] = l.slot_bytes;
      l.bytes[i] = int64_t(first[i]);
      l.slot_bytes += int64_t(align_up(first[i]));
    }
    for (const ExpertWeights& e : m.experts) {
      if (parts(e) != first) fail("expert cache: experts of '{}' differ in size", e.w1.weight->name);
      for (const Linear* x : {&e.w1, &e.w2, &e.w3})
        for (const TensorData* t : {x->weight, x->scale})
          if (t && !host_resident_.count(t))
            fail("expert cache: '{}' is on the GPU while other experts of its layer are in host memory", t->name);
    }
    if (!cache_.slots) {
      cache_.layout = l;
      cache_.slots = std::min<int64_t>(int64_t(cache_.bytes) / l.slot_bytes, cuda::kExpertCacheMaxSlots);
      if (cache_.slots < 1)
        fail("expert cache: {} bytes hold no expert of {} bytes ('{}')", cache_.bytes, l.slot_bytes,
             m.experts[0].w1.weight->name);
      return;
    }
    if (std::memcmp(l.bytes, cache_.layout.bytes, sizeof l.bytes) != 0)
      fail("expert cache: the experts of '{}' differ in size from those of the first cached layer",
           m.experts[0].w1.weight->name);
  }
  // Fetches this pass's experts (active[lo..hi)) into the cache; pass_zmap: the pass's
  // experts for the expert GEMMs.
  void fetch_experts(const MoeTables& tb, const Tensor& active, int64_t zmax, int64_t lo, int64_t hi,
                     const Tensor& pass_zmap) {
    cuda::ExpertCacheArgs a;
    a.active = active.i32();
    a.zmax = zmax;
    a.lo = int32_t(lo);
    a.hi = int32_t(hi);
    a.E = int32_t(tb.host.size() / 3);
    a.map = tb.map;
    a.owner = cache_.owner;
    a.stamp = cache_.stamp;
    a.tick = cache_.tick;
    a.S = int32_t(cache_.slots);
    a.home = tb.home;
    a.live = tb.devp;
    a.slots = cache_.pool;
    a.layout = cache_.layout;
    a.zmap = pass_zmap.i32();
    a.order = cache_.order;
    a.job_slot = cache_.job_slot;
    a.job_expert = cache_.job_expert;
    a.n_jobs = cache_.n_jobs;
    a.stats = cache_.stats;
    cuda::expert_cache_fetch(a, s_);
  }

  void make_arena() {
    size_t bytes = opts_.arena_bytes;
    if (!bytes) {
      if (const char* e = std::getenv("DSV4_CUDA_ARENA_MB")) bytes = size_t(std::atoll(e)) << 20;
    }
    if (!bytes || bytes == SIZE_MAX) {
      size_t free_b = 0, total_b = 0;
      DSV4_CK(cudaMemGetInfo(&free_b, &total_b));
      const size_t most = free_b > (size_t(2) << 30) ? size_t(double(free_b - (size_t(1) << 30)) * 0.95) : free_b / 2;
      bytes = bytes == SIZE_MAX ? most : std::min<size_t>(size_t(8) << 30, most);
    }
    arena_ = std::make_shared<Arena>(bytes);
  }

  const uint8_t* dev(const TensorData& t) {
    auto it = map_.find(&t);
    if (it != map_.end()) return it->second;
    // Not part of prepare_weights (op tests, ad-hoc weights): upload it on its own, once.
    if (!t.data) fail("tensor '{}' has no data and was not prepared on the device", t.name);
    no_capture("a first use of a weight tensor");
    void* p = nullptr;
    DSV4_CK(cudaMalloc(&p, std::max<size_t>(t.nbytes, 1)));
    // On the backend's stream + sync: a pageable cudaMemcpy on the legacy stream may return before
    // the DMA lands and does not order against our non-blocking stream.
    DSV4_CK(cudaMemcpyAsync(p, t.data, t.nbytes, cudaMemcpyHostToDevice, s_));
    DSV4_CK(cudaStreamSynchronize(s_));
    extra_.push_back(p);
    map_[&t] = static_cast<uint8_t*>(p);
    return static_cast<uint8_t*>(p);
  }
  const float* f32p(const TensorData& t) {
    if (t.dtype != DType::F32) fail("tensor '{}': expected F32, got {}", t.name, dtype_name(t.dtype));
    return reinterpret_cast<const float*>(dev(t));
  }
  cuda::Vec vec(const TensorData& t) {
    if (t.dtype != DType::F32 && t.dtype != DType::BF16)
      fail("tensor '{}': expected F32 or BF16, got {}", t.name, dtype_name(t.dtype));
    return cuda::Vec{dev(t), t.dtype == DType::BF16};
  }
  cuda::WeightDesc desc(const Linear& w) {
    cuda::WeightDesc d;
    d.w = dev(*w.weight);
    d.out = w.out;
    d.in = w.in;
    switch (w.format) {
      case WeightFormat::FP8: d.fmt = cuda::kFP8; break;
      case WeightFormat::FP4: d.fmt = cuda::kFP4; break;
      case WeightFormat::BF16:
        if (w.weight->dtype == DType::F32) d.fmt = cuda::kF32;
        else if (w.weight->dtype == DType::BF16) d.fmt = cuda::kBF16;
        else fail("tensor '{}': expected BF16 or F32, got {}", w.weight->name, dtype_name(w.weight->dtype));
        break;
    }
    if (d.fmt == cuda::kFP8 || d.fmt == cuda::kFP4) {
      d.s = dev(*w.scale);
      d.scale_f32 = w.scale->dtype == DType::F32;
    }
    return d;
  }
  const float* rope_table(const RopeTable& t) {
    auto& e = ropes_[&t];
    if (e.first != t.inv_freq) {
      no_capture("a new RoPE table");
      e.first = t.inv_freq;
      if (!e.second) {
        void* p = nullptr;
        DSV4_CK(cudaMalloc(&p, 4 * std::max<size_t>(t.inv_freq.size(), 64)));
        extra_.push_back(p);
        e.second = static_cast<float*>(p);
      }
      DSV4_CHECK(t.inv_freq.size() <= 64);
      DSV4_CK(cudaMemcpyAsync(e.second, t.inv_freq.data(), 4 * t.inv_freq.size(), cudaMemcpyHostToDevice, s_));
      DSV4_CK(cudaStreamSynchronize(s_));
    }
    return e.second;
  }
  const MoeTables& moe_tables(const MoEWeights& m) {
    std::vector<cuda::WeightDesc> host;
    auto it = moes_.find(&m);
    if (it != moes_.end() && it->second.host.size() == 3 * m.experts.size() &&
        it->second.host[0].w == (m.experts.empty() ? nullptr : dev(*m.experts[0].w1.weight)))
      return it->second;
    if (m.experts.empty()) fail("MoE layer without routed experts");
    no_capture("a new MoE descriptor table");
    for (int which = 0; which < 3; ++which)
      for (const auto& e : m.experts) host.push_back(desc(which == 0 ? e.w1 : which == 1 ? e.w2 : e.w3));
    for (const auto& d : host)
      if (d.fmt != host[0].fmt || d.scale_f32 != host[0].scale_f32) fail("MoE experts of one layer mix weight formats");
    MoeTables& t = moes_[&m];
    t.host = host;
    t.cached = host_resident_.count(m.experts[0].w1.weight) > 0;
    if (t.cached) {
      if (!cache_.pool)
        fail("CUDA backend: the experts of '{}' are in host memory without an expert cache (set_host_resident budget 0)",
             m.experts[0].w1.weight->name);
      check_slot_layout(m);
      void* p = nullptr;
      DSV4_CK(cudaMalloc(&p, host.size() * sizeof(cuda::WeightDesc) + m.experts.size() * 4));
      extra_.push_back(p);
      t.home = static_cast<cuda::WeightDesc*>(p);
      t.map = reinterpret_cast<int32_t*>(t.home + host.size());
      DSV4_CK(cudaMemcpyAsync(t.home, host.data(), host.size() * sizeof(cuda::WeightDesc), cudaMemcpyHostToDevice, s_));
      DSV4_CK(cudaMemsetAsync(t.map, 0xff, m.experts.size() * 4, s_));
    }
    if (t.capacity < host.size()) {  // a MoEWeights at a reused address may have more experts
      void* p = nullptr;
      DSV4_CK(cudaMalloc(&p, host.size() * sizeof(cuda::WeightDesc)));
      extra_.push_back(p);
      t.devp = static_cast<cuda::WeightDesc*>(p);
      t.capacity = host.size();
    }
    DSV4_CK(cudaMemcpyAsync(t.devp, host.data(), host.size() * sizeof(cuda::WeightDesc), cudaMemcpyHostToDevice, s_));
    DSV4_CK(cudaStreamSynchronize(s_));
    const size_t E = m.experts.size();
    t.w1 = t.devp;
    t.w2 = t.devp + E;
    t.w3 = t.devp + 2 * E;
    t.first = host[0];
    return t;
  }

  int device_;
  int sm_ = 0;  // compute capability, major * 10 + minor
  CudaOptions opts_;
  cuda::CublasLtGemm lt_;
  std::unordered_map<const uint8_t*, float*> padded_scales_;  // FP8 weight scales in cuBLASLt's layout
  cudaStream_t s_ = nullptr;
  std::shared_ptr<Arena> arena_;
  uint8_t* weights_ = nullptr;
  uint8_t* host_weights_ = nullptr;      // pinned, mapped: the host-resident weights (set_host_resident)
  uint8_t* host_weights_dev_ = nullptr;  // its device address
  std::unordered_set<const TensorData*> host_resident_;
  std::unordered_map<const TensorData*, uint8_t*> map_;
  std::vector<void*> extra_;
  std::unordered_map<const RopeTable*, std::pair<std::vector<float>, float*>> ropes_;
  std::unordered_map<const MoEWeights*, MoeTables> moes_;
  ExpertCache cache_;
  uint8_t* ring_ = nullptr;
  size_t ring_pos_ = 0;
  std::unordered_map<uint64_t, Graph> graphs_;
  CudaGraphStats graph_stats_;
  bool fixed_step_ = false;  // inside Backend::run_graph's record()
};

CudaBackend& as_cuda(Backend& be) {
  auto* c = dynamic_cast<CudaBackend*>(&be);
  if (!c) fail("backend '{}' is not the CUDA backend", be.name());
  return *c;
}

}  // namespace

bool cuda_device_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaOptions& opts) {
  if (!cuda_device_available()) fail("no CUDA device is available");
  return std::make_unique<CudaBackend>(device, opts);
}
std::unique_ptr<Backend> make_cuda_backend(int device) { return make_cuda_backend(device, CudaOptions{}); }

void cuda_random_weights(Backend& be, const std::vector<RandomTensorSpec>& ts, uint64_t seed) {
  as_cuda(be).random_weights(ts, seed);
}

size_t cuda_arena_peak(Backend& be) { return as_cuda(be).arena_peak(); }
void* cuda_stream(Backend& be) { return as_cuda(be).stream(); }
int cuda_device(Backend& be) { return as_cuda(be).device(); }
void cuda_set_fp8_gemm(Backend& be, CudaOptions::Fp8Gemm path) { as_cuda(be).set_fp8_gemm(path); }
double cuda_device_ms(Backend& be, int reps, const std::function<void()>& fn) { return as_cuda(be).device_ms(reps, fn); }

double cuda_host_to_device_gbs(size_t bytes) {
  void *host = nullptr, *dev = nullptr;
  DSV4_CK(cudaMallocHost(&host, bytes));
  DSV4_CK(cudaMalloc(&dev, bytes));
  std::memset(host, 1, bytes);
  cudaEvent_t a, b;
  DSV4_CK(cudaEventCreate(&a));
  DSV4_CK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < 6; ++i) {
    DSV4_CK(cudaEventRecord(a));
    DSV4_CK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice));
    DSV4_CK(cudaEventRecord(b));
    DSV4_CK(cudaEventSynchronize(b));
    float t = 0;
    DSV4_CK(cudaEventElapsedTime(&t, a, b));
    if (i) ms.push_back(t);  // the first copy warms up
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(dev);
  cudaFreeHost(host);
  std::sort(ms.begin(), ms.end());
  return double(bytes) / (double(ms[ms.size() / 2]) * 1e6);
}
CudaGraphStats cuda_graph_stats(Backend& be) { return as_cuda(be).graph_stats(); }
CudaExpertCacheStats cuda_expert_cache_stats(Backend& be) { return as_cuda(be).expert_cache_stats(); }
void cuda_set_graphs(Backend& be, bool on) { as_cuda(be).set_graphs(on); }

CudaDeviceInfo cuda_device_info(int device) {
  CudaDeviceInfo d;
  cudaDeviceProp p{};
  DSV4_CK(cudaGetDeviceProperties(&p, device));
  d.name = p.name;
  d.sm_major = p.major;
  d.sm_minor = p.minor;
  d.sms = p.multiProcessorCount;
  DSV4_CK(cudaSetDevice(device));
  DSV4_CK(cudaMemGetInfo(&d.free_bytes, &d.total_bytes));
  int clock_khz = 0, bus_bits = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
  d.mem_bandwidth_gbs = 2.0 * double(clock_khz) * 1e3 * double(bus_bits) / 8.0 / 1e9;
  return d;
}

}  // namespace dsv4
