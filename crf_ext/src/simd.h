// Fixed-width float vectors (GCC/Clang vector extensions): the compiler picks the instructions
// for the target (SSE, AVX2, AVX-512) and keeps IEEE semantics lane by lane, so results do not
// depend on the ISA. Used where the auto-vectoriser splits small arrays into scalars.
#pragma once

#include <cstring>

namespace crf {

template <int kLanes>
struct FloatVector;
template <>
struct FloatVector<1> {  // rows of one float (the kernel norms): plain scalars
  typedef float type;
};
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

// In-place transpose of a 4 x 4 block held as four rows.
inline void transpose4(Floats<4> (&rows)[4]) {
  typedef int Indices __attribute__((vector_size(16)));
  const Floats<4> low01 = __builtin_shuffle(rows[0], rows[1], Indices{0, 4, 1, 5});
  const Floats<4> high01 = __builtin_shuffle(rows[0], rows[1], Indices{2, 6, 3, 7});
  const Floats<4> low23 = __builtin_shuffle(rows[2], rows[3], Indices{0, 4, 1, 5});
  const Floats<4> high23 = __builtin_shuffle(rows[2], rows[3], Indices{2, 6, 3, 7});
  rows[0] = __builtin_shuffle(low01, low23, Indices{0, 1, 4, 5});
  rows[1] = __builtin_shuffle(low01, low23, Indices{2, 3, 6, 7});
  rows[2] = __builtin_shuffle(high01, high23, Indices{0, 1, 4, 5});
  rows[3] = __builtin_shuffle(high01, high23, Indices{2, 3, 6, 7});
}

}  // namespace crf
