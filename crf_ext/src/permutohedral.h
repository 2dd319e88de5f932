// Permutohedral lattice (Adams, Baek, Davis 2010): Gaussian filtering in d dimensions by
// splatting onto the vertices of the enclosing simplices, blurring along the d+1 lattice axes
// and slicing back. The lattice is built to reproduce pydensecrf's exactly (same vertices, same
// barycentric weights, same float operations), so filters match it to the last few bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "buffer_pool.h"
#include "parallel.h"
#include "simd.h"

namespace crf {

// Values per point and per vertex are rows of `stride` floats, stride a multiple of kBlock (the
// SIMD width the loops are written for), or any stride in the scalar loops. Lattice values are
// vertex-major, one whole row per vertex: the blur and the slice are bound by the latency of
// scattered row accesses, so one access should bring all channels (bench/RESULTS.md: the blur
// against 8-channel blocks).
constexpr int kBlock = 4;

inline int padded_channels(int channels) { return (channels + kBlock - 1) / kBlock * kBlock; }

// n_points rows of `channels` floats copied into rows of `stride` floats, zero padding.
inline PooledVector<float> padded_rows(const float* in, int n_points, int channels, int stride) {
  PooledVector<float> padded(static_cast<std::size_t>(n_points) * stride, 0.0f);
  for (int p = 0; p < n_points; ++p) {
    std::copy_n(in + static_cast<std::size_t>(p) * channels, channels,
                padded.data() + static_cast<std::size_t>(p) * stride);
  }
  return padded;
}

// 8-float vectors only where the target has 256-bit registers: without AVX the compiler splits
// them into pairs and spills them (bench/RESULTS.md: the sse4.2 level). The lanes
// are independent, so the width changes no result.
#ifdef __AVX__
constexpr int kWidestLanes = 8;
#else
constexpr int kWidestLanes = 4;
#endif

// The SIMD registers of one row of kStride floats: kRows vectors of kLanes floats.
template <int kStride>
struct RowShape {
  static constexpr int kLanes = kStride % kWidestLanes == 0 ? kWidestLanes : kStride % 4 == 0 ? 4 : 1;
  static constexpr int kRows = kStride / kLanes;
};

// Calls fn(at, std::integral_constant<int, kLanes>) for the kRows vectors of a row of kStride
// floats, `at` the first float of each. A row written one way and read back another (16-float
// loads over 8-float stores) misses the store-to-load forwarding and stalls.
template <int kStride, typename Fn>
inline void for_rows(Fn&& fn) {
  using Shape = RowShape<kStride>;
  for (int i = 0; i < Shape::kRows; ++i) fn(i * Shape::kLanes, std::integral_constant<int, Shape::kLanes>{});
}

class Permutohedral {
 public:
  // `features`: n_points x dim floats, point-major. `keep_keys` keeps the vertex keys for
  // inspection (tests); the filter does not need them. `overlap`, if set, is other work that
  // runs on a second thread during the build's one serial step (numbering the vertices in
  // first-touch order) when num_threads >= 2, and after that step otherwise; an exception
  // from it is rethrown once the build is done.
  Permutohedral(const float* features, int n_points, int dim, int num_threads, bool keep_keys = false,
                const std::function<void()>& overlap = nullptr);

  int dim() const { return dim_; }
  int n_points() const { return n_points_; }
  int n_vertices() const { return n_vertices_; }
  // n_vertices x dim lattice coordinates (the last one is implied: they sum to 0); empty unless
  // built with keep_keys.
  const std::vector<int32_t>& keys() const { return keys_; }
  // Whether the build's hash table told keys apart by their codes alone (hash_table.h).
  bool exact_codes() const { return exact_codes_; }

  // Floats in a value buffer for `stride` channels: one row per vertex.
  std::size_t buffer_size(int stride) const { return static_cast<std::size_t>(stride) * n_vertices_; }

  // The three steps of one filter. Each is an OpenMP work-sharing loop: call them from every
  // thread of a parallel region (or outside one, serially). Buffers come from buffer_size().
  // The schedules are guided: the cost per vertex and per chain follows the image, so static
  // halves leave a thread idle.
  // kStride is `stride` as a compile-time constant for the common sizes (0: only known at run
  // time); see with_stride().
  //
  // values[v] = sum over points p touching v of b_pv * (in[p] * point_scale[p]), in point order.
  // `in` has `stride` floats per point; `point_scale` may be null (no scaling). A team of one
  // thread scatters point by point (splat_point); a larger team gathers per vertex from the
  // vertex -> point lists, which prepare_gather() builds.
  template <int kStride>
  void splat(const float* in, int stride, const float* point_scale, float* values) const;
  // Builds the vertex -> point lists, once, if num_threads asks for more than one thread (one
  // thread never needs them). Call it outside any parallel region before such a splat.
  void prepare_gather(int num_threads) const;
  // Blurs along every axis with the unnormalised (1/2, 1, 1/2) kernel, in place.
  template <int kStride>
  void blur(float* values, int stride, bool reverse) const;
  // out[0..stride) = alpha * sum_j b_pj * values[v_pj] for point p. pydensecrf has two code
  // paths that round differently: channels > 2 folds alpha into the weight first.
  // kDim: the lattice's dimension as a compile-time constant (0: only known at run time).
  template <int kStride, int kDim = 0>
  void slice_point(int point, const float* values, int stride, bool alpha_in_weight, float* out) const;
  // The splat as a scatter, one point at a time: values[v_pj] += b_pj * (in * point_scale[p]) for
  // the d+1 vertices of point p (`in`: its `stride` floats; `point_scale` may be null). Called
  // for every point in increasing order on zeroed values, it sums what splat() sums, in the same
  // order; serial only (points share vertices).
  template <int kStride, int kDim = 0>
  void splat_point(int point, const float* in, int stride, const float* point_scale, float* values) const;

  // Convenience: the whole filter, out = K in, for `channels` values per point (n_points x
  // channels, point-major), with pydensecrf's code path for that channel count.
  void filter(const float* in, int channels, float* out, int num_threads, bool reverse = false) const;

 private:
  // One axis of the blur.
  template <int kStride>
  void blur_axis(float* values, int stride, int axis) const;

  int n_points_;
  int dim_;
  int n_vertices_ = 0;
  float alpha_;
  // Per point and simplex vertex (n_points x (dim+1)): the vertex and its barycentric weight.
  PooledVector<int32_t> point_vertices_;
  PooledVector<float> point_weights_;
  // The transpose (vertex -> points, CSR) so that the splat is a race-free gather per vertex;
  // built on first need (prepare_gather).
  mutable std::mutex gather_mutex_;
  mutable bool gather_ready_ = false;
  mutable PooledVector<int32_t> vertex_start_;
  mutable PooledVector<int32_t> vertex_points_;
  mutable PooledVector<float> vertex_weights_;
  // The lattice lines along each axis that hold more than one vertex ("chains"), each as its
  // vertices in order along the axis; a vertex with no neighbour on an axis is in no chain of
  // that axis (its blur there is the identity). Chain c is chain_vertices_[chain_start_[c] ..
  // chain_start_[c+1]); the chains of axis j are axis_chain_[j] .. axis_chain_[j+1].
  PooledVector<int32_t> chain_vertices_;
  PooledVector<int32_t> chain_start_;
  std::vector<int32_t> axis_chain_;
  std::vector<int32_t> keys_;
  bool exact_codes_ = false;
};

// Calls fn(std::integral_constant<int, V>) with V = value if value is one of kValues, V = 0
// otherwise: the listed values get their own fully unrolled code.
template <int... kValues, typename Fn>
void with_constant(int value, Fn&& fn) {
  const bool listed = ((value == kValues && (fn(std::integral_constant<int, kValues>{}), true)) || ...);
  if (!listed) fn(std::integral_constant<int, 0>{});
}

// The strides with their own code: up to 24 channels, VOC's 21 labels included, and 1 for the
// kernel norms.
template <typename Fn>
void with_stride(int stride, Fn&& fn) {
  with_constant<1, 4, 8, 12, 16, 24>(stride, std::forward<Fn>(fn));
}

template <int kStride>
void Permutohedral::splat(const float* in, int stride, const float* point_scale, float* values) const {
  if (thread_count() == 1) {
    std::fill_n(values, buffer_size(stride), 0.0f);
    for (int p = 0; p < n_points_; ++p) {
      splat_point<kStride>(p, in + static_cast<std::size_t>(p) * stride, stride, point_scale, values);
    }
    return;
  }
  if constexpr (kStride > 0) {  // the sums in vector registers
    using Shape = RowShape<kStride>;
    constexpr int kLanes = Shape::kLanes, kRows = Shape::kRows;
    using Row = Floats<kLanes>;
#pragma omp for schedule(guided, 512)
    for (int v = 0; v < n_vertices_; ++v) {
      Row sum[kRows] = {};
      for (int e = vertex_start_[v]; e < vertex_start_[v + 1]; ++e) {
        const int p = vertex_points_[e];
        const float w = vertex_weights_[e];
        const float* x = in + static_cast<std::size_t>(p) * kStride;
        if (point_scale != nullptr) {
          const float scale = point_scale[p];
          for (int i = 0; i < kRows; ++i) sum[i] += w * (load<kLanes>(x + i * kLanes) * scale);
        } else {
          for (int i = 0; i < kRows; ++i) sum[i] += w * load<kLanes>(x + i * kLanes);
        }
      }
      float* out = values + static_cast<std::size_t>(v) * kStride;
      for (int i = 0; i < kRows; ++i) store<kLanes>(out + i * kLanes, sum[i]);
    }
  } else {
#pragma omp for schedule(guided, 512)
    for (int v = 0; v < n_vertices_; ++v) {
      float* __restrict sum = values + static_cast<std::size_t>(v) * stride;
      for (int c = 0; c < stride; ++c) sum[c] = 0.0f;
      for (int e = vertex_start_[v]; e < vertex_start_[v + 1]; ++e) {
        const int p = vertex_points_[e];
        const float w = vertex_weights_[e];
        const float* __restrict x = in + static_cast<std::size_t>(p) * stride;
        if (point_scale != nullptr) {
          const float scale = point_scale[p];
          for (int c = 0; c < stride; ++c) sum[c] += w * (x[c] * scale);
        } else {
          for (int c = 0; c < stride; ++c) sum[c] += w * x[c];
        }
      }
    }
  }
}

template <int kStride>
void Permutohedral::blur(float* values, int stride, bool reverse) const {
  for (int step = 0; step <= dim_; ++step) blur_axis<kStride>(values, stride, reverse ? dim_ - step : step);
}

// Prefetches every cache line of a row of `floats` floats, for writing.
inline void prefetch_row(const float* row, int floats) {
  for (int c = 0; c < floats; c += 16) __builtin_prefetch(row + c, 1);
  __builtin_prefetch(row + floats - 1, 1);
}

// Along one chain each (scattered) vertex row is read once and written once: the walk keeps the
// old values of the previous and the current vertex, so the blur runs in place. The float
// operations are those of new[v] = old[v] + 0.5 * (old[n1] + old[n2]), a missing neighbour
// reading as 0. Rows are prefetched kAhead chain elements early (the walk is latency-bound).
template <int kStride>
void Permutohedral::blur_axis(float* values, int stride, int axis) const {
  constexpr int kAhead = 32;  // far enough ahead to cover a scattered row's latency (bench/RESULTS.md)
  const int s = kStride > 0 ? kStride : stride;
  // Local copies: the compiler cannot tell that the stores below leave the members alone.
  const int32_t* const vertices = chain_vertices_.data();
  const int32_t* const starts = chain_start_.data();
  const int first_chain = axis_chain_[axis], last_chain = axis_chain_[axis + 1];
  const int axis_end = starts[last_chain];
  auto row = [values, vertices, s](int at) { return values + static_cast<std::size_t>(vertices[at]) * s; };
  if constexpr (kStride > 0) {
    using Shape = RowShape<kStride>;
    constexpr int kLanes = Shape::kLanes, kRows = Shape::kRows;
    using Row = Floats<kLanes>;
#pragma omp for schedule(guided, 64)
    for (int chain = first_chain; chain < last_chain; ++chain) {
      const int begin = starts[chain], end = starts[chain + 1];
      Row prev[kRows] = {}, cur[kRows], next[kRows];
      for (int i = 0; i < kRows; ++i) cur[i] = load<kLanes>(row(begin) + i * kLanes);
      for (int at = begin; at < end; ++at) {
        if (at + kAhead < axis_end) prefetch_row(row(at + kAhead), kStride);
        if (at + 1 < end) {
          const float* in = row(at + 1);
          for (int i = 0; i < kRows; ++i) next[i] = load<kLanes>(in + i * kLanes);
        } else {
          for (int i = 0; i < kRows; ++i) next[i] = Row{};
        }
        float* out = row(at);
        for (int i = 0; i < kRows; ++i) {
          store<kLanes>(out + i * kLanes, cur[i] + 0.5f * (prev[i] + next[i]));
          prev[i] = cur[i];
          cur[i] = next[i];
        }
      }
    }
  } else {
    std::vector<float> prev_cur(2 * static_cast<std::size_t>(s));
#pragma omp for schedule(guided, 64)
    for (int chain = first_chain; chain < last_chain; ++chain) {
      const int begin = starts[chain], end = starts[chain + 1];
      float* __restrict prev = prev_cur.data();  // old values of the previous vertex
      float* __restrict cur = prev + s;          // and of the current one
      for (int c = 0; c < s; ++c) prev[c] = 0.0f;
      for (int at = begin; at < end; ++at) {
        if (at + kAhead < axis_end) prefetch_row(row(at + kAhead), s);
        float* __restrict out = row(at);
        const float* __restrict next = at + 1 < end ? row(at + 1) : nullptr;
        for (int c = 0; c < s; ++c) {
          cur[c] = out[c];
          out[c] = cur[c] + 0.5f * (prev[c] + (next != nullptr ? next[c] : 0.0f));
          prev[c] = cur[c];
        }
      }
    }
  }
}

template <int kStride, int kDim>
void Permutohedral::slice_point(int point, const float* values, int stride, bool alpha_in_weight,
                                float* __restrict out) const {
  const int s = kStride > 0 ? kStride : stride;
  const int d1 = (kDim > 0 ? kDim : dim_) + 1;
  const int32_t* vertices = &point_vertices_[static_cast<std::size_t>(point) * d1];
  const float* weights = &point_weights_[static_cast<std::size_t>(point) * d1];
  if constexpr (kStride > 0) {  // the sums in vector registers
    using Shape = RowShape<kStride>;
    constexpr int kLanes = Shape::kLanes, kRows = Shape::kRows;
    using Row = Floats<kLanes>;
    Row sum[kRows] = {};
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      const float w_alpha = w * alpha_;
      const float* row = values + static_cast<std::size_t>(vertices[j]) * kStride;
      if (alpha_in_weight) {
        for (int i = 0; i < kRows; ++i) sum[i] += w_alpha * load<kLanes>(row + i * kLanes);
      } else {
        for (int i = 0; i < kRows; ++i) sum[i] += w * load<kLanes>(row + i * kLanes) * alpha_;
      }
    }
    for (int i = 0; i < kRows; ++i) store<kLanes>(out + i * kLanes, sum[i]);
  } else {
    for (int c = 0; c < s; ++c) out[c] = 0.0f;
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      const float w_alpha = w * alpha_;
      const float* __restrict row = values + static_cast<std::size_t>(vertices[j]) * s;
      if (alpha_in_weight) {
        for (int c = 0; c < s; ++c) out[c] += w_alpha * row[c];
      } else {
        for (int c = 0; c < s; ++c) out[c] += w * row[c] * alpha_;
      }
    }
  }
}

template <int kStride, int kDim>
void Permutohedral::splat_point(int point, const float* in, int stride, const float* point_scale,
                                float* __restrict values) const {
  const int s = kStride > 0 ? kStride : stride;
  const int d1 = (kDim > 0 ? kDim : dim_) + 1;
  const int32_t* vertices = &point_vertices_[static_cast<std::size_t>(point) * d1];
  const float* weights = &point_weights_[static_cast<std::size_t>(point) * d1];
  const float scale = point_scale != nullptr ? point_scale[point] : 1.0f;
  if constexpr (kStride > 0) {
    using Shape = RowShape<kStride>;
    constexpr int kLanes = Shape::kLanes, kRows = Shape::kRows;
    using Row = Floats<kLanes>;
    Row x[kRows];
    for (int i = 0; i < kRows; ++i) x[i] = load<kLanes>(in + i * kLanes);
    if (point_scale != nullptr) {
      for (int i = 0; i < kRows; ++i) x[i] = x[i] * scale;
    }
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      float* row = values + static_cast<std::size_t>(vertices[j]) * kStride;
      for (int i = 0; i < kRows; ++i) store<kLanes>(row + i * kLanes, load<kLanes>(row + i * kLanes) + w * x[i]);
    }
  } else {
    for (int j = 0; j < d1; ++j) {
      const float w = weights[j];
      float* row = values + static_cast<std::size_t>(vertices[j]) * s;
      if (point_scale != nullptr) {
        for (int c = 0; c < s; ++c) row[c] += w * (in[c] * scale);
      } else {
        for (int c = 0; c < s; ++c) row[c] += w * in[c];
      }
    }
  }
}

}  // namespace crf
