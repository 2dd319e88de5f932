// Fixed-width float vectors (GCC/Clang vector extensions): the compiler picks the instructions
// for the target (SSE, AVX2, AVX-512) and keeps IEEE semantics lane by lane, so results do not
// depend on the ISA. Used where the auto-vectoriser splits small arrays into scalars.
#pragma once

#include <cstring>

namespace crf {

template <int kLanes>
struct FloatVector;
template <>
struct FloatVector<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct FloatVector<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <int kLanes>
using Floats = typename FloatVector<kLanes>::type;

// Unaligned loads and stores.
template <int kLanes>
inline Floats<kLanes> load(const float* from) {
  Floats<kLanes> v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}

template <int kLanes>
inline void store(float* to, Floats<kLanes> v) {
  std::memcpy(to, &v, sizeof(v));
}

}  // namespace crf
