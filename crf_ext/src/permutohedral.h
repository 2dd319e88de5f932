// Permutohedral lattice (Adams, Baek, Davis 2010): Gaussian filtering in d dimensions by
// splatting onto the vertices of the enclosing simplices, blurring along the d+1 lattice axes
// and slicing back. The lattice is built to reproduce pydensecrf's exactly (same vertices, same
// barycentric weights, same float operations), so filters match it to the last few bits.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

namespace crf {

// Filter values are rows of `stride` floats, stride a multiple of kBlock (the SIMD width the
// loops are written for). Row 0 is a zero row that stands in for missing blur neighbours; vertex
// v is row v + 1.
constexpr int kBlock = 4;

inline int padded_channels(int channels) { return (channels + kBlock - 1) / kBlock * kBlock; }

class Permutohedral {
 public:
  // `features`: n_points x dim floats, point-major. `keep_keys` keeps the vertex keys for
  // inspection (tests); the filter does not need them.
  Permutohedral(const float* features, int n_points, int dim, int num_threads, bool keep_keys = false);

  int dim() const { return dim_; }
  int n_points() const { return n_points_; }
  int n_vertices() const { return n_vertices_; }
  // n_vertices x dim lattice coordinates (the last one is implied: they sum to 0); empty unless
  // built with keep_keys.
  const std::vector<int32_t>& keys() const { return keys_; }

  // Floats in a value buffer for `stride` channels (stride a multiple of kBlock).
  std::size_t buffer_size(int stride) const {
    return static_cast<std::size_t>(stride) * (n_vertices_ + 1);
  }

  // The three steps of one filter. Each is an OpenMP work-sharing loop: call them from every
  // thread of a parallel region (or outside one, serially). Buffers come from buffer_size() and
  // must have their zero row zeroed once. kStride is `stride` as a compile-time constant for the
  // common sizes (0: only known at run time); see with_stride().
  //
  // values[v] = sum over points p touching v of b_pv * (in[p] * point_scale[p]), in point order.
  // `in` has `stride` floats per point; `point_scale` may be null (no scaling).
  template <int kStride>
  void splat(const float* in, int stride, const float* point_scale, float* values) const;
  // Blurs along every axis with the unnormalised (1/2, 1, 1/2) kernel; `scratch` is the
  // ping-pong buffer. Returns the buffer that holds the result.
  template <int kStride>
  float* blur(float* values, float* scratch, int stride, bool reverse) const;
  // out[0..stride) = alpha * sum_j b_pj * values[v_pj] for point p. pydensecrf has two code
  // paths that round differently: channels > 2 folds alpha into the weight first.
  template <int kStride>
  void slice_point(int point, const float* values, int stride, bool alpha_in_weight, float* out) const;

  // Convenience: the whole filter, out = K in, for `channels` values per point (n_points x
  // channels, point-major), with pydensecrf's code path for that channel count.
  void filter(const float* in, int channels, float* out, int num_threads, bool reverse = false) const;

 private:
  int n_points_;
  int dim_;
  int n_vertices_ = 0;
  float alpha_;
  // Per point and simplex vertex (n_points x (dim+1)): the vertex row and its barycentric weight.
  std::vector<int32_t> point_rows_;
  std::vector<float> point_weights_;
  // The transpose (vertex -> points, CSR) so that the splat is a race-free gather per vertex.
  std::vector<int32_t> vertex_start_;
  std::vector<int32_t> vertex_points_;
  std::vector<float> vertex_weights_;
  // Blur neighbour rows, (dim+1) x n_vertices x 2 (row 0 when absent).
  std::vector<int32_t> neighbour_rows_;
  std::vector<int32_t> keys_;
};

// Calls fn(std::integral_constant<int, S>) with S = stride for the strides that get their own
// fully unrolled code (up to 24 channels, VOC's 21 labels included), S = 0 otherwise.
template <typename Fn>
void with_stride(int stride, Fn&& fn) {
  switch (stride) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 12: fn(std::integral_constant<int, 12>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 24: fn(std::integral_constant<int, 24>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

template <int kStride>
void Permutohedral::splat(const float* in, int stride, const float* point_scale, float* values) const {
  const int s = kStride > 0 ? kStride : stride;
  std::vector<float> acc(s);
#pragma omp for schedule(static)
  for (int v = 0; v < n_vertices_; ++v) {
    float* __restrict sum = acc.data();
    for (int c = 0; c < s; ++c) sum[c] = 0.0f;
    for (int e = vertex_start_[v]; e < vertex_start_[v + 1]; ++e) {
      const int p = vertex_points_[e];
      const float w = vertex_weights_[e];
      const float* __restrict x = in + static_cast<std::size_t>(p) * s;
      if (point_scale != nullptr) {
        const float scale = point_scale[p];
        for (int c = 0; c < s; ++c) sum[c] += w * (x[c] * scale);
      } else {
        for (int c = 0; c < s; ++c) sum[c] += w * x[c];
      }
    }
    float* __restrict out = values + static_cast<std::size_t>(v + 1) * s;
    for (int c = 0; c < s; ++c) out[c] = sum[c];
  }
}

template <int kStride>
float* Permutohedral::blur(float* values, float* scratch, int stride, bool reverse) const {
  const int s = kStride > 0 ? kStride : stride;
  const int m = n_vertices_;
  // Neighbour rows are scattered: prefetch them a few vertices ahead.
  constexpr int kAhead = 8;
  for (int step = 0; step <= dim_; ++step) {
    const int j = reverse ? dim_ - step : step;
    const int32_t* neighbours = &neighbour_rows_[static_cast<std::size_t>(j) * m * 2];
#pragma omp for schedule(static)
    for (int v = 0; v < m; ++v) {
      if (v + kAhead < m) {
        __builtin_prefetch(values + static_cast<std::size_t>(neighbours[2 * (v + kAhead)]) * s);
        __builtin_prefetch(values + static_cast<std::size_t>(neighbours[2 * (v + kAhead) + 1]) * s);
      }
      const float* __restrict old_v = values + static_cast<std::size_t>(v + 1) * s;
      const float* __restrict n1 = values + static_cast<std::size_t>(neighbours[2 * v]) * s;
      const float* __restrict n2 = values + static_cast<std::size_t>(neighbours[2 * v + 1]) * s;
      float* __restrict out = scratch + static_cast<std::size_t>(v + 1) * s;
      for (int c = 0; c < s; ++c) out[c] = old_v[c] + 0.5f * (n1[c] + n2[c]);
    }
    std::swap(values, scratch);
  }
  return values;
}

template <int kStride>
void Permutohedral::slice_point(int point, const float* values, int stride, bool alpha_in_weight,
                                float* __restrict out) const {
  const int s = kStride > 0 ? kStride : stride;
  const int d1 = dim_ + 1;
  const int32_t* rows = &point_rows_[static_cast<std::size_t>(point) * d1];
  const float* weights = &point_weights_[static_cast<std::size_t>(point) * d1];
  for (int c = 0; c < s; ++c) out[c] = 0.0f;
  for (int j = 0; j < d1; ++j) {
    const float w = weights[j];
    const float* __restrict row = values + static_cast<std::size_t>(rows[j]) * s;
    if (alpha_in_weight) {
      const float w_alpha = w * alpha_;
      for (int c = 0; c < s; ++c) out[c] += w_alpha * row[c];
    } else {
      for (int c = 0; c < s; ++c) out[c] += w * row[c] * alpha_;
    }
  }
}

}  // namespace crf
