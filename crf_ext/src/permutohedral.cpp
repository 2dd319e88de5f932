#include "permutohedral.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "hash_table.h"
#include "parallel.h"

namespace crf {

namespace {

// The simplex of one point: remainder-0 corner, rank of each coordinate, barycentric weights.
struct SimplexScratch {
  std::vector<float> elevated, rem0, barycentric;
  std::vector<int> rank;
  explicit SimplexScratch(int d) : elevated(d + 1), rem0(d + 1), barycentric(d + 2), rank(d + 1) {}
};

// Round to nearest, ties to even, as _mm_cvtps_epi32 does in pydensecrf. The 1.5 * 2^23 trick
// avoids a libm call (nearbyint saves and restores the FP environment) where it is exact.
inline float round_half_even(float x) {
  const float magic = 12582912.0f;
  return std::fabs(x) < 4194304.0f ? (x + magic) - magic : std::nearbyint(x);
}

// Locates `f` (d floats) in the lattice. Float operations follow pydensecrf's SSE build step by
// step (same products, same order, round-half-even), so the vertices are the same.
void locate(const float* f, int d, const float* scale, SimplexScratch& s) {
  const int d1 = d + 1;
  const float inv_d1 = 1.0f / static_cast<float>(d1);
  const float d1f = static_cast<float>(d1);
  // Elevate onto the hyperplane sum(y) = 0 of R^{d+1}.
  float running = 0.0f;
  for (int j = d; j > 0; --j) {
    const float cf = f[j - 1] * scale[j - 1];
    s.elevated[j] = running - static_cast<float>(j) * cf;
    running += cf;
  }
  s.elevated[0] = running;
  // Nearest remainder-0 point.
  float sum = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = round_half_even(inv_d1 * s.elevated[i]);
    s.rem0[i] = v * d1f;
    sum += v;
  }
  // Rank the residuals.
  std::fill(s.rank.begin(), s.rank.end(), 0);
  for (int i = 0; i < d; ++i) {
    const float di = s.elevated[i] - s.rem0[i];
    for (int j = i + 1; j <= d; ++j) {
      if (di < s.elevated[j] - s.rem0[j]) {
        ++s.rank[i];
      } else {
        ++s.rank[j];
      }
    }
  }
  // Bring the point back onto the plane when the rounding left it off (sum != 0).
  const int shift = static_cast<int>(sum);
  for (int i = 0; i <= d; ++i) {
    s.rank[i] += shift;
    if (s.rank[i] < 0) {
      s.rank[i] += d1;
      s.rem0[i] += d1f;
    } else if (s.rank[i] >= d1) {
      s.rank[i] -= d1;
      s.rem0[i] -= d1f;
    }
  }
  // Barycentric coordinates.
  std::fill(s.barycentric.begin(), s.barycentric.end(), 0.0f);
  for (int i = 0; i <= d; ++i) {
    const float v = (s.elevated[i] - s.rem0[i]) * inv_d1;
    s.barycentric[d - s.rank[i]] += v;
    s.barycentric[d - s.rank[i] + 1] -= v;
  }
  s.barycentric[0] += 1.0f + s.barycentric[d + 1];
}

// The d+1 vertex keys of a simplex (d stored coordinates each): coordinate i of vertex r is
// rem0[i] + r, or rem0[i] + r - (d+1) when rank[i] > d - r (the canonical simplex).
void simplex_vertex_keys(const int32_t* __restrict rem0, const int8_t* __restrict rank, int d,
                         int32_t* __restrict keys) {
  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) keys[r * d + i] = rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
  }
}

}  // namespace

Permutohedral::Permutohedral(const float* features, int n_points, int dim, int num_threads, bool keep_keys)
    : n_points_(n_points), dim_(dim) {
  const int d = dim, d1 = dim + 1;
  const int threads = resolve_threads(num_threads);
  alpha_ = 1.0f / (1.0f + std::pow(2.0f, -static_cast<float>(d)));

  // Elevation scales, computed in double and rounded once, as pydensecrf does.
  const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * d1);
  std::vector<float> scale(d);
  for (int i = 0; i < d; ++i) {
    scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std_dev);
  }

  // pydensecrf's SSE build handles points in groups of four and also enters the zero feature
  // vector for the padding points of the last group. Reproduce that, so that the vertex set is
  // identical: the extra vertices receive no values and read as zero, like missing ones.
  const int n_padded = (n_points + 3) / 4 * 4;
  std::vector<int32_t> rem0(static_cast<std::size_t>(n_padded) * d1);
  std::vector<int8_t> rank(static_cast<std::size_t>(n_padded) * d1);
  point_weights_.resize(static_cast<std::size_t>(n_points) * d1);

#pragma omp parallel num_threads(threads)
  {
    SimplexScratch s(d);
    std::vector<float> zero(d, 0.0f);
#pragma omp for schedule(static)
    for (int p = 0; p < n_padded; ++p) {
      const float* f = p < n_points ? features + static_cast<std::size_t>(p) * d : zero.data();
      locate(f, d, scale.data(), s);
      for (int i = 0; i <= d; ++i) {
        rem0[static_cast<std::size_t>(p) * d1 + i] = static_cast<int32_t>(s.rem0[i]);
        rank[static_cast<std::size_t>(p) * d1 + i] = static_cast<int8_t>(s.rank[i]);
        if (p < n_points) {
          point_weights_[static_cast<std::size_t>(p) * d1 + i] = s.barycentric[i];
        }
      }
    }
  }

  // Neighbouring points often lie in the same simplex, and then share all d+1 vertices.
  std::vector<uint8_t> same_as_previous(n_padded, 0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int p = 1; p < n_padded; ++p) {
    const std::size_t at = static_cast<std::size_t>(p) * d1;
    same_as_previous[p] = std::equal(&rem0[at], &rem0[at + d1], &rem0[at - d1]) &&
                          std::equal(&rank[at], &rank[at + d1], &rank[at - d1]);
  }

  // Insert the d+1 vertices of every point in point order, so ids are in first-touch order. The
  // table outgrows the caches and the loop is bound by memory latency: keys are hashed kAhead
  // points early and their slots prefetched.
  LatticeHashTable table(d, static_cast<std::size_t>(n_padded));
  point_rows_.resize(static_cast<std::size_t>(n_points) * d1);
  constexpr int kAhead = 4;
  const std::size_t ring_stride = static_cast<std::size_t>(d1) * d;
  std::vector<int32_t> ring_keys((kAhead + 1) * ring_stride);
  std::vector<uint32_t> ring_hashes((kAhead + 1) * d1);
  auto stage = [&](int p) {  // keys and hashes of point p into its ring slot; slots prefetched
    if (same_as_previous[p]) return;
    const int slot = p % (kAhead + 1);
    simplex_vertex_keys(&rem0[static_cast<std::size_t>(p) * d1], &rank[static_cast<std::size_t>(p) * d1], d,
                        &ring_keys[slot * ring_stride]);
    for (int r = 0; r <= d; ++r) {
      ring_hashes[slot * d1 + r] = LatticeHashTable::hash(&ring_keys[slot * ring_stride + r * d], d);
      table.prefetch(ring_hashes[slot * d1 + r]);
    }
  };
  for (int p = 0; p < std::min(kAhead, n_padded); ++p) stage(p);
  std::vector<int32_t> rows(d1);
  for (int p = 0; p < n_padded; ++p) {
    if (p + kAhead < n_padded) stage(p + kAhead);
    if (!same_as_previous[p]) {
      const int slot = p % (kAhead + 1);
      for (int r = 0; r <= d; ++r) {
        rows[r] = table.insert(&ring_keys[slot * ring_stride + r * d], ring_hashes[slot * d1 + r]) + 1;
      }
    }
    if (p < n_points) std::copy(rows.begin(), rows.end(), &point_rows_[static_cast<std::size_t>(p) * d1]);
  }
  n_vertices_ = table.size();
  const int m = n_vertices_;

  // Blur neighbours along axis j: n1 = key - 1 with key[j] + d and n2 = key + 1 with key[j] - d
  // (for j = d only the implied coordinate moves by d). Since n2(n1(v)) = v, looking up n1
  // gives both links. Each n2 entry has exactly one writer, so the loop is race-free.
  neighbour_rows_.assign(static_cast<std::size_t>(d1) * m * 2, 0);
#pragma omp parallel num_threads(threads)
  {
    constexpr int kBatch = 8;
    std::vector<int32_t> keys(static_cast<std::size_t>(kBatch) * d1 * d);
    std::vector<uint32_t> batch_hashes(static_cast<std::size_t>(kBatch) * d1);
#pragma omp for schedule(static)
    for (int first = 0; first < m; first += kBatch) {
      const int count = std::min(kBatch, m - first);
      for (int b = 0; b < count; ++b) {
        const int32_t* k = table.key(first + b);
        for (int j = 0; j <= d; ++j) {
          const int at = b * d1 + j;
          int32_t* n1 = &keys[static_cast<std::size_t>(at) * d];
          for (int i = 0; i < d; ++i) n1[i] = k[i] - 1;
          if (j < d) n1[j] = k[j] + d;
          batch_hashes[at] = LatticeHashTable::hash(n1, d);
          table.prefetch(batch_hashes[at]);
        }
      }
      for (int b = 0; b < count; ++b) {
        const int v = first + b;
        for (int j = 0; j <= d; ++j) {
          const int at = b * d1 + j;
          const int u = table.find(&keys[static_cast<std::size_t>(at) * d], batch_hashes[at]);
          if (u < 0) continue;
          neighbour_rows_[(static_cast<std::size_t>(j) * m + v) * 2] = u + 1;
          neighbour_rows_[(static_cast<std::size_t>(j) * m + u) * 2 + 1] = v + 1;
        }
      }
    }
  }

  // Vertex -> points (CSR), points in increasing order so that the gather sums in pydensecrf's
  // order. Each thread counts and fills its own contiguous range of points; offsets of earlier
  // ranges come first, so the result is the same for any thread count.
  vertex_start_.assign(static_cast<std::size_t>(m) + 1, 0);
  vertex_points_.resize(point_rows_.size());
  vertex_weights_.resize(point_rows_.size());
  std::vector<std::vector<int32_t>> offsets(threads);
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_index(), n_threads = thread_count();
    const int begin = static_cast<int>(static_cast<long long>(n_points) * t / n_threads);
    const int end = static_cast<int>(static_cast<long long>(n_points) * (t + 1) / n_threads);
    std::vector<int32_t>& mine = offsets[t];
    mine.assign(m, 0);
    for (std::size_t at = static_cast<std::size_t>(begin) * d1; at < static_cast<std::size_t>(end) * d1; ++at) {
      ++mine[point_rows_[at] - 1];
    }
#pragma omp barrier
#pragma omp single
    {
      int32_t total = 0;
      for (int v = 0; v < m; ++v) {
        vertex_start_[v] = total;
        for (int u = 0; u < n_threads; ++u) {
          const int32_t here = offsets[u][v];
          offsets[u][v] = total;
          total += here;
        }
      }
      vertex_start_[m] = total;
    }
    for (int p = begin; p < end; ++p) {
      for (int j = 0; j <= d; ++j) {
        const std::size_t at = static_cast<std::size_t>(p) * d1 + j;
        const int32_t slot = mine[point_rows_[at] - 1]++;
        vertex_points_[slot] = p;
        vertex_weights_[slot] = point_weights_[at];
      }
    }
  }
  if (keep_keys) keys_ = table.keys();
}

void Permutohedral::filter(const float* in, int channels, float* out, int num_threads, bool reverse) const {
  const int stride = padded_channels(channels);
  std::vector<float> padded(static_cast<std::size_t>(n_points_) * stride, 0.0f);
  for (int p = 0; p < n_points_; ++p) {
    std::copy(in + static_cast<std::size_t>(p) * channels, in + static_cast<std::size_t>(p + 1) * channels,
              padded.begin() + static_cast<std::size_t>(p) * stride);
  }
  std::vector<float> values(buffer_size(stride), 0.0f), scratch(buffer_size(stride), 0.0f);
  const bool alpha_in_weight = channels > 2;
  with_stride(stride, [&](auto kStride) {
#pragma omp parallel num_threads(resolve_threads(num_threads))
    {
      splat<kStride>(padded.data(), stride, nullptr, values.data());
      const float* result = blur<kStride>(values.data(), scratch.data(), stride, reverse);
      std::vector<float> sliced(stride);
#pragma omp for schedule(static)
      for (int p = 0; p < n_points_; ++p) {
        slice_point<kStride>(p, result, stride, alpha_in_weight, sliced.data());
        std::copy(sliced.begin(), sliced.begin() + channels, out + static_cast<std::size_t>(p) * channels);
      }
    }
  });
}

}  // namespace crf
