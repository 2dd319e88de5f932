// Vectorisable float32 exp for the mean-field softmax.
#pragma once

#include <cstdint>
#include <cstring>

namespace crf {

// exp(x) to about 1 ulp for x in [-87.3, 88.3] (clamped outside), written so that GCC
// auto-vectorises loops over it: glibc's expf is a scalar call, and the softmax takes tens of
// millions of them per image. Cody-Waite reduction by ln 2, degree-6 polynomial (Cephes
// coefficients), scale by 2^n through the exponent bits.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;  // ternaries, not std::min/max: those block vectorisation
  x = x > 88.3f ? 88.3f : x;
  // Round to nearest through the 1.5 * 2^23 trick: no libm call, so the loop vectorises.
  const float magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline void exp_inplace(float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) x[i] = exp_approx(x[i]);
}

}  // namespace crf
