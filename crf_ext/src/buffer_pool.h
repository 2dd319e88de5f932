// Large buffers kept mapped between calls. A fresh anonymous mapping costs a page fault per 4 KiB
// page on first touch, a sizeable share of a dense_crf call on a virtual machine (bench/RESULTS.md);
// buffers handed back here are reused by the next call instead. The pool's resident memory (cached
// and in use) never exceeds the most it ever had in use at once during the first call, and 5/4 of
// that afterwards: with no slack, the next call's requests, which come in a different order than
// the blocks were freed, find no fitting block, and buffers are unmapped and faulted in again on
// every call. release_cached() returns the cached part.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

namespace crf {

// Under AddressSanitizer every array comes from operator new, so that overflows stay detectable.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kBufferPoolEnabled = false;
#else
constexpr bool kBufferPoolEnabled = true;
#endif

class BufferPool {
 public:
  // Requests below this go to operator new: the C heap reuses small blocks by itself.
  static constexpr std::size_t kMinBytes = std::size_t{1} << 20;

  static BufferPool& instance();

  // A page-aligned block of at least `bytes` (>= kMinBytes); its contents are undefined.
  void* acquire(std::size_t bytes);
  void release(void* block);
  // Unmaps every cached block; returns the bytes unmapped.
  std::size_t release_cached();
  std::size_t cached_bytes();
  // Bytes of all the blocks ever mapped: a statistic (a repeated call should map nothing).
  std::size_t mapped_bytes();

 private:
  struct Block {
    void* base;
    std::size_t capacity;  // bytes mapped
    std::size_t touched;   // the largest request served: an upper bound of its resident bytes
  };
  // The bound on resident bytes.
  std::size_t resident_limit() const { return settled_ ? high_water_ + high_water_ / 4 : high_water_; }
  // Unmaps cached blocks, oldest first, until the resident bytes fit resident_limit().
  void trim_locked();

  std::mutex mutex_;
  std::vector<Block> cached_;  // oldest first
  std::vector<Block> in_use_;
  // Resident bytes (upper bounds) of the cached and the in-use blocks, and the most ever in use
  // at once.
  std::size_t cached_touched_ = 0, in_use_touched_ = 0, high_water_ = 0;
  // Whether a first call has handed back everything (nothing in use any more).
  bool settled_ = false;
  std::size_t mapped_ = 0;
};

// std::allocator semantics; large arrays come from the BufferPool.
template <typename T>
struct PoolAllocator {
  using value_type = T;
  PoolAllocator() = default;
  template <typename U>
  PoolAllocator(const PoolAllocator<U>&) {}

  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (pooled(bytes)) return static_cast<T*>(BufferPool::instance().acquire(bytes));
    return static_cast<T*>(::operator new(bytes));
  }
  void deallocate(T* p, std::size_t n) {
    if (pooled(n * sizeof(T))) {
      BufferPool::instance().release(p);
    } else {
      ::operator delete(p);
    }
  }

  template <typename U>
  bool operator==(const PoolAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const PoolAllocator<U>&) const { return false; }

 private:
  static bool pooled(std::size_t bytes) { return kBufferPoolEnabled && bytes >= BufferPool::kMinBytes; }
};

template <typename T>
using PooledVector = std::vector<T, PoolAllocator<T>>;

// An uninitialised array from the pool (trivial types only).
template <typename T>
struct PoolDeleter {
  std::size_t size;
  void operator()(T* p) const { PoolAllocator<T>().deallocate(p, size); }
};
template <typename T>
using PooledArray = std::unique_ptr<T[], PoolDeleter<T>>;
template <typename T>
PooledArray<T> make_pooled_array(std::size_t size) {
  static_assert(std::is_trivial_v<T>, "the array is not initialised");
  return PooledArray<T>(PoolAllocator<T>().allocate(size), PoolDeleter<T>{size});
}

// Frees a vector's storage now (clear() keeps it).
template <typename Vector>
void free_storage(Vector& v) {
  Vector().swap(v);
}

}  // namespace crf
