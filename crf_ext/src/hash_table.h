// Open-addressing hash map from permutohedral lattice keys to vertex ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "buffer_pool.h"

namespace crf {

// Keys are `key_size` int32 coordinates; ids are assigned in insertion order, so inserting the
// vertices of the points in raster order numbers them in first-touch order, as pydensecrf does.
// Linear probing over a power-of-two table that is kept at most half full.
//
// A key is looked up by its code, sum_i key[i] * factor_i modulo 2^64: linear, so the code of a
// neighbour key + delta is code(key) + code(delta), and the multiplies of a key are independent.
// When every key that will be inserted or looked up lies in a box of at most 2^64 points, the
// factors are the box's mixed-radix place values and distinct keys have distinct codes: a
// slot's code alone decides a match and the keys are not stored (BANA's lattices at 500x375:
// about 18 bits for the Gaussian kernel, 43 for the bilateral). Otherwise the factors are
// unrelated odd numbers (lattice keys differ by small integer vectors, on which factors like
// (2i + 1) g would cancel) and a matching code is confirmed on the stored key.
class LatticeHashTable {
 public:
  // `lowest` / `highest`: key_size bounds on the coordinates of every key that will be inserted
  // or looked up. `keep_keys`: store the keys even when the codes are exact (keys()).
  LatticeHashTable(int key_size, std::size_t expected_keys, const int32_t* lowest, const int32_t* highest,
                   bool keep_keys)
      : key_size_(key_size), factors_(key_size) {
    uint64_t place = 1;
    exact_ = true;
    for (int i = 0; i < key_size && exact_; ++i) {
      const uint64_t range = static_cast<uint64_t>(static_cast<int64_t>(highest[i]) - lowest[i] + 1);
      factors_[i] = place;
      exact_ = range <= std::numeric_limits<uint64_t>::max() / place;
      place *= range;
    }
    if (!exact_) {
      for (int i = 0; i < key_size; ++i) factors_[i] = random_factor(i);
    }
    store_keys_ = !exact_ || keep_keys;
    std::size_t capacity = 16;
    while (capacity < 2 * expected_keys) capacity *= 2;
    slots_.assign(capacity, Slot{0, -1, 0});
    mask_ = capacity - 1;
    codes_.reserve(expected_keys);
    if (store_keys_) keys_.reserve(expected_keys * key_size_);
  }

  int size() const { return static_cast<int>(n_keys_); }
  bool exact() const { return exact_; }
  // The stored keys, id-major (empty when the codes are exact and keep_keys was not asked).
  const PooledVector<int32_t>& keys() const { return keys_; }
  const int32_t* key(int id) const { return keys_.data() + static_cast<std::size_t>(id) * key_size_; }
  uint64_t code_of(int id) const { return codes_[id]; }

  // kSize: key_size as a compile-time constant, or 0.
  template <int kSize = 0>
  uint64_t code(const int32_t* key) const {
    const int size = kSize > 0 ? kSize : key_size_;
    uint64_t sum = 0;
    for (int i = 0; i < size; ++i) sum += static_cast<uint64_t>(static_cast<int64_t>(key[i])) * factors_[i];
    return sum;
  }

  // The slot hash of a code: MurmurHash3's finaliser (the table indexes with the low bits, which
  // the sum leaves dependent on the low bits of the coordinates only).
  static uint32_t hash(uint64_t code) {
    code ^= code >> 33;
    code *= 0xFF51AFD7ED558CCDull;
    code ^= code >> 33;
    code *= 0xC4CEB9FE1A85EC53ull;
    code ^= code >> 33;
    return static_cast<uint32_t>(code);
  }

  // Id of `key` (with this code and hash), inserted if absent.
  int insert(const int32_t* key, uint64_t code, uint32_t h) {
    if (2 * (n_keys_ + 1) > slots_.size()) grow();
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      Slot& slot = slots_[s];
      if (slot.id < 0) {
        slot = Slot{code, static_cast<int32_t>(n_keys_), h};
        codes_.push_back(code);
        if (store_keys_) keys_.insert(keys_.end(), key, key + key_size_);
        return static_cast<int>(n_keys_++);
      }
      if (slot.code == code && (exact_ || same_key(slot.id, key))) return slot.id;
    }
  }

  // Id of the key with this code and hash, or -1; `key` is read only when the codes are not
  // exact (it may be null otherwise). Read-only: safe to call from several threads.
  int find(const int32_t* key, uint64_t code, uint32_t h) const {
    for (std::size_t s = h & mask_;; s = (s + 1) & mask_) {
      const Slot& slot = slots_[s];
      if (slot.id < 0) return -1;
      if (slot.code == code && (exact_ || same_key(slot.id, key))) return slot.id;
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
    uint64_t code;
    int32_t id;
    uint32_t hash;
  };

  // SplitMix64 of i, made odd.
  static constexpr uint64_t random_factor(int i) {
    uint64_t z = static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) | 1;
  }

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
    slots_.assign(old.size() * 2, Slot{0, -1, 0});
    mask_ = slots_.size() - 1;
    for (const Slot& slot : old) {
      if (slot.id < 0) continue;
      std::size_t s = slot.hash & mask_;
      while (slots_[s].id >= 0) s = (s + 1) & mask_;
      slots_[s] = slot;
    }
  }

  int key_size_;
  std::vector<uint64_t> factors_;
  bool exact_ = false;
  bool store_keys_ = true;
  std::size_t n_keys_ = 0;
  std::size_t mask_ = 0;
  PooledVector<Slot> slots_;
  PooledVector<uint64_t> codes_;  // per id
  PooledVector<int32_t> keys_;    // per id, when stored
  PooledVector<uint64_t> filter_;
  int filter_shift_ = 64;
};

}  // namespace crf
