#include "buffer_pool.h"

#include <sys/mman.h>

#include <algorithm>

namespace crf {

namespace {

// Mapped sizes: the request plus 1/16, rounded up to a step of 1/16 to 1/8 of it (64 KiB at
// least), so that the next call's slightly larger request of the same kind (another image's
// vertex count) still fits. Pages beyond the request are not touched: they cost address space,
// not memory.
std::size_t mapped_size(std::size_t bytes) {
  std::size_t step = std::size_t{64} << 10;
  while (step < bytes / 16) step *= 2;
  return (bytes + bytes / 16 + step - 1) / step * step;
}

}  // namespace

BufferPool& BufferPool::instance() {
  // Never destroyed: vectors in static storage elsewhere may hand blocks back at exit.
  static BufferPool* pool = new BufferPool();
  return *pool;
}

void* BufferPool::acquire(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  // The smallest cached block that fits, unless more than half of its resident pages would go
  // unused (they count against the high-water mark).
  auto best = cached_.end();
  for (auto it = cached_.begin(); it != cached_.end(); ++it) {
    if (it->capacity >= bytes && it->touched <= 2 * bytes && (best == cached_.end() || it->capacity < best->capacity)) {
      best = it;
    }
  }
  Block block;
  if (best != cached_.end()) {
    block = *best;
    cached_.erase(best);
    cached_touched_ -= block.touched;
  } else {
    const std::size_t capacity = mapped_size(bytes);
    void* base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
      // Memory is short: give back what is cached and try once more.
      for (const Block& cached : cached_) munmap(cached.base, cached.capacity);
      cached_.clear();
      cached_touched_ = 0;
      base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) throw std::bad_alloc();
    }
    mapped_ += capacity;
    block = Block{base, capacity, 0};
  }
  block.touched = std::max(block.touched, bytes);
  in_use_.push_back(block);
  in_use_touched_ += block.touched;
  high_water_ = std::max(high_water_, in_use_touched_);
  trim_locked();
  return block.base;
}

void BufferPool::release(void* base) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = std::find_if(in_use_.begin(), in_use_.end(), [base](const Block& b) { return b.base == base; });
  if (it == in_use_.end()) return;  // not ours: cannot happen through PoolAllocator
  const Block block = *it;
  in_use_.erase(it);
  in_use_touched_ -= block.touched;
  cached_.push_back(block);
  cached_touched_ += block.touched;
  settled_ = settled_ || in_use_.empty();
  trim_locked();
}

void BufferPool::trim_locked() {
  while (!cached_.empty() && cached_touched_ + in_use_touched_ > resident_limit()) {
    munmap(cached_.front().base, cached_.front().capacity);
    cached_touched_ -= cached_.front().touched;
    cached_.erase(cached_.begin());
  }
}

std::size_t BufferPool::release_cached() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t released = 0;
  for (const Block& block : cached_) {
    munmap(block.base, block.capacity);
    released += block.touched;
  }
  cached_.clear();
  cached_touched_ = 0;
  high_water_ = in_use_touched_;
  settled_ = false;  // the next call starts afresh, as a first one
  return released;
}

std::size_t BufferPool::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_touched_;
}

std::size_t BufferPool::mapped_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return mapped_;
}

}  // namespace crf
