// Permutohedral lattice (Adams, Baek, Davis 2010): Gaussian filtering in d dimensions by
// splatting onto the vertices of the enclosing simplices, blurring along the d+1 lattice axes
// and slicing back. The lattice is built to reproduce pydensecrf's exactly (same vertices, same
// barycentric weights, same float operations), so filters match it to the last few bits.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace crf {

// Values per point are rows of `stride` floats, stride a multiple of kBlock (the SIMD width the
// loops are written for).
constexpr int kBlock = 4;

inline int padded_channels(int channels) { return (channels + kBlock - 1) / kBlock * kBlock; }

// Lattice values are stored in channel blocks: block b holds channels [b * width, (b + 1) *
// width) of every vertex, vertex-major. The blur walks one block at a time, so its scattered
// accesses stay within a block that fits the caches (8 channels of 400k vertices: 13 MB).
constexpr int block_width(int stride) { return stride % 8 == 0 ? 8 : 4; }

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
  std::size_t buffer_size(int stride) const { return static_cast<std::size_t>(stride) * n_vertices_; }

  // The three steps of one filter. Each is an OpenMP work-sharing loop: call them from every
  // thread of a parallel region (or outside one, serially). Buffers come from buffer_size(), in
  // the channel-block layout of block_width(stride). kStride is `stride` as a compile-time
  // constant for the common sizes (0: only known at run time); see with_stride().
  //
  // values[v] = sum over points p touching v of b_pv * (in[p] * point_scale[p]), in point order.
  // `in` has `stride` floats per point; `point_scale` may be null (no scaling).
  template <int kStride>
  void splat(const float* in, int stride, const float* point_scale, float* values) const;
  // Blurs along every axis with the unnormalised (1/2, 1, 1/2) kernel, in place.
  template <int kStride>
  void blur(float* values, int stride, bool reverse) const;
  // out[0..stride) = alpha * sum_j b_pj * values[v_pj] for point p. pydensecrf has two code
  // paths that round differently: channels > 2 folds alpha into the weight first.
  template <int kStride>
  void slice_point(int point, const float* values, int stride, bool alpha_in_weight, float* out) const;

  // Convenience: the whole filter, out = K in, for `channels` values per point (n_points x
  // channels, point-major), with pydensecrf's code path for that channel count.
  void filter(const float* in, int channels, float* out, int num_threads, bool reverse = false) const;

 private:
  // One axis of the blur on one channel block of kWidth channels.
  template <int kWidth>
  void blur_axis(float* block, int axis) const;

  int n_points_;
  int dim_;
  int n_vertices_ = 0;
  float alpha_;
  // Per point and simplex vertex (n_points x (dim+1)): the vertex and its barycentric weight.
  std::vector<int32_t> point_vertices_;
  std::vector<float> point_weights_;
  // The transpose (vertex -> points, CSR) so that the splat is a race-free gather per vertex.
  std::vector<int32_t> vertex_start_;
  std::vector<int32_t> vertex_points_;
  std::vector<float> vertex_weights_;
  // The lattice lines along each axis that hold more than one vertex ("chains"), each as its
  // vertices in order along the axis; a vertex with no neighbour on an axis is in no chain of
  // that axis (its blur there is the identity). Chain c is chain_vertices_[chain_start_[c] ..
  // chain_start_[c+1]); the chains of axis j are axis_chain_[j] .. axis_chain_[j+1].
  std::vector<int32_t> chain_vertices_;
  std::vector<int32_t> chain_start_;
  std::vector<int32_t> axis_chain_;
  std::vector<int32_t> keys_;
};

// Calls fn(std::integral_constant<int, V>) with V = value if value is one of kValues, V = 0
// otherwise: the listed values get their own fully unrolled code.
template <int... kValues, typename Fn>
void with_constant(int value, Fn&& fn) {
  const bool listed = ((value == kValues && (fn(std::integral_constant<int, kValues>{}), true)) || ...);
  if (!listed) fn(std::integral_constant<int, 0>{});
}

// The strides with their own code: up to 24 channels, VOC's 21 labels included.
template <typename Fn>
void with_stride(int stride, Fn&& fn) {
  with_constant<4, 8, 12, 16, 24>(stride, std::forward<Fn>(fn));
}

template <int kStride>
void Permutohedral::splat(const float* in, int stride, const float* point_scale, float* values) const {
  const int s = kStride > 0 ? kStride : stride;
  const int width = block_width(s);
  const std::size_t block_size = static_cast<std::size_t>(n_vertices_) * width;
  if constexpr (kStride > 0) {  // the sums in vector registers
    constexpr int kWidth = block_width(kStride), kRows = kStride / kWidth;
    using Row = Floats<kWidth>;
#pragma omp for schedule(static)
    for (int v = 0; v < n_vertices_; ++v) {
      Row sum[kRows] = {};
      for (int e = vertex_start_[v]; e < vertex_start_[v + 1]; ++e) {
        const int p = vertex_points_[e];
        const float w = vertex_weights_[e];
        const float* x = in + static_cast<std::size_t>(p) * kStride;
        if (point_scale != nullptr) {
          const float scale = point_scale[p];
          for (int i = 0; i < kRows; ++i) sum[i] += w * (load<kWidth>(x + i * kWidth) * scale);
        } else {
          for (int i = 0; i < kRows; ++i) sum[i] += w * load<kWidth>(x + i * kWidth);
        }
      }
      float* out = values + static_cast<std::size_t>(v) * kWidth;
      for (int i = 0; i < kRows; ++i) store<kWidth>(out + i * block_size, sum[i]);
    }
  } else {
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
      float* __restrict out = values + static_cast<std::size_t>(v) * width;
      for (int first = 0; first < s; first += width, out += block_size) {
        for (int c = 0; c < width; ++c) out[c] = sum[first + c];
      }
    }
  }
}

template <int kStride>
void Permutohedral::blur(float* values, int stride, bool reverse) const {
  const int s = kStride > 0 ? kStride : stride;
  const int width = block_width(s);
  for (int first = 0; first < s; first += width) {
    float* block = values + static_cast<std::size_t>(n_vertices_) * first;
    for (int step = 0; step <= dim_; ++step) {
      const int axis = reverse ? dim_ - step : step;
      if (width == 8) {
        blur_axis<8>(block, axis);
      } else {
        blur_axis<4>(block, axis);
      }
    }
  }
}

// Along one chain each (scattered) vertex row is read once and written once: the walk keeps the
// old values of the previous and the current vertex, so the blur runs in place. The float
// operations are those of new[v] = old[v] + 0.5 * (old[n1] + old[n2]), a missing neighbour
// reading as 0.
template <int kWidth>
void Permutohedral::blur_axis(float* block, int axis) const {
  using Row = Floats<kWidth>;
  constexpr int kAhead = 8;  // prefetch distance along the chains of the axis
  const int axis_end = chain_start_[axis_chain_[axis + 1]];
#pragma omp for schedule(static)
  for (int chain = axis_chain_[axis]; chain < axis_chain_[axis + 1]; ++chain) {
    const int begin = chain_start_[chain], end = chain_start_[chain + 1];
    Row prev = {}, cur = load<kWidth>(block + static_cast<std::size_t>(chain_vertices_[begin]) * kWidth);
    for (int at = begin; at < end; ++at) {
      if (at + kAhead < axis_end) {
        __builtin_prefetch(block + static_cast<std::size_t>(chain_vertices_[at + kAhead]) * kWidth);
      }
      const Row next = at + 1 < end ? load<kWidth>(block + static_cast<std::size_t>(chain_vertices_[at + 1]) * kWidth)
                                    : Row{};
      store<kWidth>(block + static_cast<std::size_t>(chain_vertices_[at]) * kWidth, cur + 0.5f * (prev + next));
      prev = cur;
      cur = next;
    }
  }
}

template <int kStride>
void Permutohedral::slice_point(int point, const float* values, int stride, bool alpha_in_weight,
                                float* __restrict out) const {
  const int s = kStride > 0 ? kStride : stride;
  const int width = block_width(s);
  const std::size_t block_size = static_cast<std::size_t>(n_vertices_) * width;
  const int d1 = dim_ + 1;
  const int32_t* vertices = &point_vertices_[static_cast<std::size_t>(point) * d1];
  const float* weights = &point_weights_[static_cast<std::size_t>(point) * d1];
  if constexpr (kStride > 0) {  // the sums in vector registers
    constexpr int kWidth = block_width(kStride), kRows = kStride / kWidth;
    using Row = Floats<kWidth>;
    Row sum[kRows] = {};
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      const float w_alpha = w * alpha_;
      const float* row = values + static_cast<std::size_t>(vertices[j]) * kWidth;
      if (alpha_in_weight) {
        for (int i = 0; i < kRows; ++i) sum[i] += w_alpha * load<kWidth>(row + i * block_size);
      } else {
        for (int i = 0; i < kRows; ++i) sum[i] += w * load<kWidth>(row + i * block_size) * alpha_;
      }
    }
    for (int i = 0; i < kRows; ++i) store<kWidth>(out + i * kWidth, sum[i]);
  } else {
    for (int c = 0; c < s; ++c) out[c] = 0.0f;
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      const float w_alpha = w * alpha_;
      const float* __restrict row = values + static_cast<std::size_t>(vertices[j]) * width;
      for (int first = 0; first < s; first += width, row += block_size) {
        float* __restrict o = out + first;
        if (alpha_in_weight) {
          for (int c = 0; c < width; ++c) o[c] += w_alpha * row[c];
        } else {
          for (int c = 0; c < width; ++c) o[c] += w * row[c] * alpha_;
        }
      }
    }
  }
}

}  // namespace crf
