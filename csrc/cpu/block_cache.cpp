// A cache of large CPU memory blocks for the allocations made inside fused
// inference forwards, so that a model's activations reuse the same memory on
// every call instead of going back to malloc.
//
// Why: glibc gives freed memory above its mmap/trim thresholds back to the OS
// and the next forward faults it in again, page by page. On a 2-core Xeon VM
// (fp32, 224x224, batch 8) an optimized ResNet-50 forward took 23,700 minor
// page faults and EfficientNet-B0 20,600; without them (glibc's thresholds
// raised to 1 GiB for the whole process) they ran 1.29x and 1.52x faster. ONNX
// Runtime keeps its activations in an arena and takes none. Changing malloc
// for the whole process is not a library's business; caching the blocks that
// its own forwards allocate is.
//
// How: the cache is the CPU allocator (c10::SetCPUAllocator), installed when
// convkernels._C loads, in front of the allocator that was there. Outside a
// scope every allocation goes straight to that allocator. Inside one (a
// per-thread depth, opened by convkernels' fused forwards: convkernels/_cpu_cache.py)
// an allocation of at least kMinBytes takes the smallest free block that fits
// it with at most 1/8 to spare, else a new one from the base allocator. A
// block is handed out only while it is free: the tensor it backs was freed,
// so no tensor can see its memory change. Freed blocks (on any thread, in a
// scope or not) go back to the cache while it holds less than its limit, and
// to the base allocator beyond it. A block's data pointer is its context,
// so the raw allocate/deallocate interface keeps working.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace convkernels {
namespace cpu {
namespace {

constexpr size_t kMinBytes = 128 << 10;  // glibc's initial mmap threshold
constexpr int64_t kDefaultLimit = int64_t{1} << 30;

thread_local int64_t scope_depth = 0;

class BlockCache final : public c10::Allocator {
 public:
  // The cache, made (and installed as the CPU allocator) on first use.
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may be freed at exit
    return *cache;
  }

  // False when an allocator set with a higher priority kept its place, or
  // with CONVKERNELS_CPU_CACHE=0 in the environment.
  bool installed() const { return c10::GetCPUAllocator() == this; }

  c10::DataPtr allocate(size_t n) override {
    if (scope_depth == 0 || n < kMinBytes) return base_->allocate(n);
    std::unique_lock<std::mutex> lock(mu_);
    auto it = free_.lower_bound(n);
    c10::DataPtr mem;
    size_t size = n;
    if (it != free_.end() && it->first <= n + n / 8) {
      size = it->first;
      mem = std::move(it->second);
      free_.erase(it);
      free_bytes_ -= size;
      ++hits_;
    } else {
      ++misses_;
      lock.unlock();
      mem = base_->allocate(n);
      lock.lock();
    }
    void* p = mem.get();
    used_.emplace(p, Block{std::move(mem), size});
    used_bytes_ += size;
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &raw_delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every free block; returns the bytes freed.
  int64_t flush() {
    std::multimap<size_t, c10::DataPtr> drop;
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t bytes = static_cast<int64_t>(free_bytes_);
    drop.swap(free_);  // freed when `drop` goes, after the lock (declared first)
    free_bytes_ = 0;
    return bytes;
  }

  int64_t set_limit(int64_t limit) {
    TORCH_CHECK(limit >= 0, "cpu_cache_set_limit: limit must be >= 0 bytes, got ", limit);
    int64_t old;
    bool over;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = limit_;
      limit_ = limit;
      over = static_cast<int64_t>(free_bytes_) > limit;
    }
    if (over) flush();
    return old;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {installed() ? 1 : 0, static_cast<int64_t>(free_bytes_),
            static_cast<int64_t>(used_bytes_), hits_, misses_, limit_};
  }

 private:
  struct Block {
    c10::DataPtr mem;  // from base_
    size_t size;
  };

  BlockCache() : base_(c10::GetCPUAllocator()) {
    const char* env = std::getenv("CONVKERNELS_CPU_CACHE");
    if (env != nullptr && std::string(env) == "0") return;
    c10::SetCPUAllocator(this);
  }

  // The deleter of the DataPtrs handed out: the block back to the cache, or
  // to the base allocator beyond the limit.
  static void release(void* p) {
    BlockCache& c = get();
    c10::DataPtr mem;  // freed after the lock, if not kept
    std::lock_guard<std::mutex> lock(c.mu_);
    auto it = c.used_.find(p);
    TORCH_INTERNAL_ASSERT(it != c.used_.end(), "convkernels block cache: freeing an unknown block");
    const size_t size = it->second.size;
    c.used_bytes_ -= size;
    if (static_cast<int64_t>(c.free_bytes_ + size) <= c.limit_) {
      c.free_.emplace(size, std::move(it->second.mem));
      c.free_bytes_ += size;
    } else {
      mem = std::move(it->second.mem);
    }
    c.used_.erase(it);
  }

  // raw_deallocate of a pointer from raw_allocate: one of ours, or one the base
  // allocator made outside a scope.
  static void raw_delete(void* p) {
    BlockCache& c = get();
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      if (c.used_.find(p) == c.used_.end()) {
        c10::DeleterFnPtr d = c.base_->raw_deleter();
        TORCH_INTERNAL_ASSERT(d != nullptr, "convkernels block cache: the base CPU allocator "
                              "has no raw deleter");
        d(p);
        return;
      }
    }
    release(p);
  }

  c10::Allocator* base_;
  std::mutex mu_;
  std::unordered_map<void*, Block> used_;
  std::multimap<size_t, c10::DataPtr> free_;
  size_t free_bytes_ = 0, used_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0, limit_ = kDefaultLimit;
};

// Installed when the library loads, before any tensor of a scope exists.
[[maybe_unused]] const bool kInstalled = BlockCache::get().installed();

void cpu_cache_enter() { ++scope_depth; }

void cpu_cache_exit() {
  TORCH_CHECK(scope_depth > 0, "cpu_cache_exit: no cache scope is open on this thread");
  --scope_depth;
}

// [installed, free bytes, bytes in use, hits, misses, limit]
std::vector<int64_t> cpu_cache_stats() { return BlockCache::get().stats(); }

int64_t cpu_cache_flush() { return BlockCache::get().flush(); }

int64_t cpu_cache_set_limit(int64_t limit) { return BlockCache::get().set_limit(limit); }

}  // namespace
}  // namespace cpu
}  // namespace convkernels

// Not tensor ops: their schemas live here, beside the state they read and set.
TORCH_LIBRARY_FRAGMENT(convkernels_C, m) {
  m.def("cpu_cache_enter() -> ()", &convkernels::cpu::cpu_cache_enter);
  m.def("cpu_cache_exit() -> ()", &convkernels::cpu::cpu_cache_exit);
  m.def("cpu_cache_stats() -> int[]", &convkernels::cpu::cpu_cache_stats);
  m.def("cpu_cache_flush() -> int", &convkernels::cpu::cpu_cache_flush);
  m.def("cpu_cache_set_limit(int limit) -> int", &convkernels::cpu::cpu_cache_set_limit);
}
