// Open-addressing hash set of permutohedral lattice keys.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "buffer_pool.h"

namespace crf {

// Keys are `key_size` int32 coordinates; ids are assigned in insertion order, so inserting the
// vertices of the points in raster order numbers them in first-touch order, as pydensecrf does.
// Linear probing over a power-of-two table that is kept at most half full. Each slot stores the
// full 32-bit hash next to the id so that most mismatches are rejected without touching the keys.
class LatticeHashTable {
 public:
  LatticeHashTable(int key_size, std::size_t expected_keys) : key_size_(key_size) {
    std::size_t capacity = 16;
    while (capacity < 2 * expected_keys) capacity *= 2;
    slots_.assign(capacity, Slot{-1, 0});
    mask_ = capacity - 1;
    keys_.reserve(expected_keys * key_size_);
  }

  int size() const { return static_cast<int>(n_keys_); }
  const int32_t* key(int id) const { return keys_.data() + static_cast<std::size_t>(id) * key_size_; }
  const PooledVector<int32_t>& keys() const { return keys_; }

  static uint32_t hash(const int32_t* key, int key_size) { return finish(linear_hash(key, key_size)); }

  // A sum of products with one random odd factor per coordinate: the multiplies are
  // independent, so a key's coordinates (and the keys of a simplex) hash in parallel rather
  // than in one dependent chain. Linear modulo 2^64 (coordinates sign-extended), so the hash of
  // a neighbour, key + delta, is linear_hash(key) + linear_hash(delta). The factors must be
  // unrelated: lattice keys differ by small integer vectors, and factors like (2i + 1) g would
  // cancel on them exactly.
  static uint64_t linear_hash(const int32_t* key, int key_size) {
    uint64_t h = 0;
    for (int i = 0; i < key_size; ++i) h += static_cast<uint64_t>(static_cast<int64_t>(key[i])) * factor(i);
    return h;
  }

  // Finaliser of MurmurHash3: the table indexes with the low bits, which the sum leaves
  // dependent on the low bits of the coordinates only.
  static uint32_t finish(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 33;
    return static_cast<uint32_t>(h);
  }

  // SplitMix64 of i, made odd (folded to a constant where the key size is known at compile time).
  static constexpr uint64_t factor(int i) {
    uint64_t z = static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) | 1;
  }

  // Id of `key` (whose hash() is `h`), inserted if absent.
  int insert(const int32_t* key, uint32_t h) {
    if (2 * (n_keys_ + 1) > slots_.size()) grow();
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      Slot& slot = slots_[s];
      if (slot.id < 0) {
        slot = Slot{static_cast<int32_t>(n_keys_), h};
        keys_.insert(keys_.end(), key, key + key_size_);
        return static_cast<int>(n_keys_++);
      }
      if (slot.hash == h && same_key(slot.id, key)) return slot.id;
    }
  }

  // Id of `key` (whose hash() is `h`), or -1. Read-only: safe to call from several threads.
  int find(const int32_t* key, uint32_t h) const {
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      const Slot& slot = slots_[s];
      if (slot.id < 0) return -1;
      if (slot.hash == h && same_key(slot.id, key)) return slot.id;
    }
  }

  // Look-ups are latency-bound (the table outgrows the caches): callers hash a batch of keys,
  // prefetch their slots, then resolve them.
  void prefetch(uint32_t h) const { __builtin_prefetch(&slots_[h & mask_]); }

  // A Bloom filter of the keys inserted so far (two bits in one 64-bit word per key, 8 to 16
  // bits per key), small enough to stay in cache: most look-ups of absent keys end here
  // instead of in the table. False means absent; true means look it up.
  void build_filter() {
    std::size_t words = 64;
    while (words * 64 < 8 * n_keys_) words *= 2;
    filter_.assign(words, 0);
    filter_shift_ = 64 - __builtin_ctzll(words);  // words is a power of two
    for (const Slot& slot : slots_) {
      if (slot.id >= 0) filter_[filter_word(slot.hash)] |= filter_bits(slot.hash);
    }
  }
  void prefetch_filter(uint32_t h) const { __builtin_prefetch(&filter_[filter_word(h)]); }
  bool may_contain(uint32_t h) const {
    const uint64_t bits = filter_bits(h);
    return (filter_[filter_word(h)] & bits) == bits;
  }

 private:
  struct Slot {
    int32_t id;
    uint32_t hash;
  };

  // The filter's word and bits from a remix of the hash: the table's slot is its low bits.
  static uint64_t filter_mix(uint32_t h) { return static_cast<uint64_t>(h) * 0x9E3779B97F4A7C15ull; }
  std::size_t filter_word(uint32_t h) const { return filter_mix(h) >> filter_shift_; }
  static uint64_t filter_bits(uint32_t h) {
    const uint64_t g = filter_mix(h);
    return (uint64_t{1} << (g & 63)) | (uint64_t{1} << ((g >> 6) & 63));
  }

  bool same_key(int id, const int32_t* key) const {
    const int32_t* stored = this->key(id);
    for (int i = 0; i < key_size_; ++i) {
      if (stored[i] != key[i]) return false;
    }
    return true;
  }

  void grow() {
    PooledVector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{-1, 0});
    mask_ = slots_.size() - 1;
    for (const Slot& slot : old) {
      if (slot.id < 0) continue;
      std::size_t s = slot.hash & mask_;
      while (slots_[s].id >= 0) s = (s + 1) & mask_;
      slots_[s] = slot;
    }
  }

  int key_size_;
  std::size_t n_keys_ = 0;
  std::size_t mask_ = 0;
  PooledVector<Slot> slots_;
  PooledVector<int32_t> keys_;
  PooledVector<uint64_t> filter_;
  int filter_shift_ = 64;
};

}  // namespace crf
