#include "permutohedral.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "hash_table.h"
#include "parallel.h"

namespace crf {

namespace {

// The simplex of one point: remainder-0 corner, rank of each coordinate, barycentric weights.
// kDim > 0 fixes the dimension at compile time (registers, unrolled loops); 0: any dimension.
template <int kDim>
struct SimplexScratch {
  template <typename T>
  using Buffer = std::conditional_t<(kDim > 0), std::array<T, kDim + 2>, std::vector<T>>;
  Buffer<float> elevated{}, rem0{}, barycentric{}, by_rank{};
  Buffer<int> rank{};
  explicit SimplexScratch(int d) {
    if constexpr (kDim == 0) {
      elevated.resize(d + 2);
      rem0.resize(d + 2);
      barycentric.resize(d + 2);
      by_rank.resize(d + 2);
      rank.resize(d + 2);
    }
  }
};

// Round to nearest, ties to even, as _mm_cvtps_epi32 does in pydensecrf. The 1.5 * 2^23 trick
// avoids a libm call (nearbyint saves and restores the FP environment) where it is exact.
inline float round_half_even(float x) {
  const float magic = 12582912.0f;
  return std::fabs(x) < 4194304.0f ? (x + magic) - magic : std::nearbyint(x);
}

// Locates `f` (d floats) in the lattice. Float operations follow pydensecrf's SSE build step by
// step (same products, same order, round-half-even), so the vertices are the same.
template <int kDim>
void locate(const float* f, int dim, const float* scale, SimplexScratch<kDim>& s) {
  const int d = kDim > 0 ? kDim : dim;
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
  // Rank the residuals. Branch-free: the comparisons are data-dependent and mispredict.
  std::fill(s.rank.begin(), s.rank.begin() + d1, 0);
  for (int i = 0; i < d; ++i) {
    const float di = s.elevated[i] - s.rem0[i];
    for (int j = i + 1; j <= d; ++j) {
      const int i_lower = di < s.elevated[j] - s.rem0[j];
      s.rank[i] += i_lower;
      s.rank[j] += 1 - i_lower;
    }
  }
  // Bring the point back onto the plane when the rounding left it off (sum != 0).
  const int shift = static_cast<int>(sum);
  for (int i = 0; i <= d; ++i) {
    const int r = s.rank[i] + shift;
    const int wrap = (r < 0) - (r >= d1);  // +1, 0 or -1 turns of d+1
    s.rank[i] = r + wrap * d1;
    s.rem0[i] += static_cast<float>(wrap) * d1f;
  }
  // Barycentric coordinates: b[t] = v[i] - v[k] with rank[i] = d - t and rank[k] = d - t + 1
  // (each term absent at the ends), v = (elevated - rem0) / (d + 1). pydensecrf accumulates
  // the two terms into zeros in coordinate order; one subtraction rounds the same. Indexed by
  // rank in registers, not scattered through memory.
  for (int i = 0; i <= d; ++i) s.by_rank[s.rank[i]] = (s.elevated[i] - s.rem0[i]) * inv_d1;
  s.barycentric[0] = s.by_rank[d];
  for (int t = 1; t <= d; ++t) s.barycentric[t] = s.by_rank[d - t] - s.by_rank[d - t + 1];
  s.barycentric[d + 1] = -s.by_rank[0];
  s.barycentric[0] += 1.0f + s.barycentric[d + 1];
}

// The d+1 vertex keys of a simplex (d stored coordinates each): coordinate i of vertex r is
// rem0[i] + r, or rem0[i] + r - (d+1) when rank[i] > d - r (the canonical simplex).
// kDim > 0 fixes the dimension at compile time.
template <int kDim>
void simplex_vertex_keys(const int32_t* __restrict rem0, const int8_t* __restrict rank, int dim,
                         int32_t* __restrict keys) {
  const int d = kDim > 0 ? kDim : dim;
  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) keys[r * d + i] = rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
  }
}

// Calls fn(std::integral_constant<int, d>) for the feature dimensions with their own unrolled
// code (DenseCRF2D's 2 and 5 among them), fn(std::integral_constant<int, 0>) otherwise.
template <typename Fn>
void with_dimension(int d, Fn&& fn) {
  with_constant<1, 2, 3, 4, 5, 6>(d, std::forward<Fn>(fn));
}

// Runs `main` on this thread and `side` (if any) on a second one when two are available, one
// after the other otherwise. An exception from `side` is rethrown after both have finished.
void run_alongside(const std::function<void()>& main, const std::function<void()>& side, int threads) {
  if (!side) {
    main();
    return;
  }
  std::exception_ptr side_error;
  auto run_side = [&] {
    try {
      side();
    } catch (...) {
      side_error = std::current_exception();
    }
  };
  if (threads >= 2) {
#pragma omp parallel num_threads(2)
    {
      if (thread_index() == 0) main();
      if (thread_index() == 1 || thread_count() == 1) run_side();
    }
  } else {
    main();
    run_side();
  }
  if (side_error) std::rethrow_exception(side_error);
}

}  // namespace

Permutohedral::Permutohedral(const float* features, int n_points, int dim, int num_threads, bool keep_keys,
                             const std::function<void()>& overlap)
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
  PooledVector<int32_t> rem0(static_cast<std::size_t>(n_padded) * d1);
  PooledVector<int8_t> rank(static_cast<std::size_t>(n_padded) * d1);
  point_weights_.resize(static_cast<std::size_t>(n_points) * d1);

  with_dimension(d, [&](auto kDim) {
#pragma omp parallel num_threads(threads)
    {
      const int dc1 = (kDim > 0 ? kDim : d) + 1;  // a compile-time constant for d = 1..6
      SimplexScratch<kDim> s(d);
      std::vector<float> zero(d, 0.0f);
      // Raw pointers: the int8 stores may alias anything, vector members included, which would
      // reload them at every access.
      int32_t* const rem0_out = rem0.data();
      int8_t* const rank_out = rank.data();
      float* const weights_out = point_weights_.data();
#pragma omp for schedule(static)
      for (int p = 0; p < n_padded; ++p) {
        const float* f = p < n_points ? features + static_cast<std::size_t>(p) * d : zero.data();
        locate<kDim>(f, d, scale.data(), s);
        const std::size_t at = static_cast<std::size_t>(p) * dc1;
        for (int i = 0; i < dc1; ++i) {
          rem0_out[at + i] = static_cast<int32_t>(s.rem0[i]);
          rank_out[at + i] = static_cast<int8_t>(s.rank[i]);
        }
        if (p < n_points) std::copy_n(s.barycentric.data(), dc1, weights_out + at);
      }
    }
  });

  // Neighbouring points often lie in the same simplex, and then share all d+1 vertices.
  PooledVector<uint8_t> same_as_previous(n_padded, 0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int p = 1; p < n_padded; ++p) {
    const std::size_t at = static_cast<std::size_t>(p) * d1;
    same_as_previous[p] = std::equal(&rem0[at], &rem0[at + d1], &rem0[at - d1]) &&
                          std::equal(&rank[at], &rank[at + d1], &rank[at - d1]);
  }

  // Insert the d+1 vertices of every point in point order, so ids are in first-touch order: the
  // build's one serial step, beside which `overlap` runs. The table outgrows the caches and the
  // loop is bound by memory latency: keys are hashed kAhead points early and their slots
  // prefetched.
  // Sized for M = 2 N vertices without a rehash for d >= 3 (BANA's bilateral lattices have
  // 0.9-1.9 N; growing costs a third more insert time), for N / 4 in fewer dimensions, where
  // neighbouring points share more vertices (0.13 N for BANA's Gaussian kernel; a table for
  // 2 N would be 32 MB at 1000x750).
  const std::size_t expected_vertices = d >= 3 ? static_cast<std::size_t>(n_padded) * 2 : n_padded / 4;
  // Bounds on every key inserted (remainder-0 point - (d + 1) to + d) or looked up (n1, below:
  // a vertex - 1 to + d), for the table's codes.
  std::vector<int32_t> lowest(d, std::numeric_limits<int32_t>::max()), highest(d, std::numeric_limits<int32_t>::min());
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> my_lowest(lowest), my_highest(highest);
#pragma omp for schedule(static)
    for (int p = 0; p < n_padded; ++p) {
      for (int i = 0; i < d; ++i) {
        my_lowest[i] = std::min(my_lowest[i], rem0[static_cast<std::size_t>(p) * d1 + i]);
        my_highest[i] = std::max(my_highest[i], rem0[static_cast<std::size_t>(p) * d1 + i]);
      }
    }
#pragma omp critical
    for (int i = 0; i < d; ++i) {
      lowest[i] = std::min(lowest[i], my_lowest[i] - (d + 2));
      highest[i] = std::max(highest[i], my_highest[i] + 2 * d);
    }
  }
  auto owned_table = std::make_unique<LatticeHashTable>(d, expected_vertices, lowest.data(), highest.data(), keep_keys);
  LatticeHashTable& table = *owned_table;
  exact_codes_ = table.exact();
  point_vertices_.resize(static_cast<std::size_t>(n_points) * d1);
  auto number_vertices = [&](auto kDim) {
    const int dc = kDim > 0 ? kDim : d, dc1 = dc + 1;  // compile-time constants for d = 1..6
    constexpr int kAhead = 4;
    const std::size_t ring_stride = static_cast<std::size_t>(dc1) * dc;
    std::vector<int32_t> ring_keys((kAhead + 1) * ring_stride);
    std::vector<uint64_t> ring_codes((kAhead + 1) * dc1);
    std::vector<uint32_t> ring_hashes((kAhead + 1) * dc1);
    auto stage = [&](int p) {  // keys, codes and hashes of point p into its ring slot; slots prefetched
      if (same_as_previous[p]) return;
      const int slot = p % (kAhead + 1);
      int32_t* keys = &ring_keys[slot * ring_stride];
      simplex_vertex_keys<kDim>(&rem0[static_cast<std::size_t>(p) * dc1], &rank[static_cast<std::size_t>(p) * dc1],
                                dc, keys);
      for (int r = 0; r <= dc; ++r) {
        const uint64_t code = table.code<kDim>(keys + r * dc);
        ring_codes[slot * dc1 + r] = code;
        ring_hashes[slot * dc1 + r] = LatticeHashTable::hash(code);
        table.prefetch(ring_hashes[slot * dc1 + r]);
      }
    };
    for (int p = 0; p < std::min(kAhead, n_padded); ++p) stage(p);
    std::vector<int32_t> vertices(dc1);
    for (int p = 0; p < n_padded; ++p) {
      if (p + kAhead < n_padded) stage(p + kAhead);
      if (!same_as_previous[p]) {
        const int slot = p % (kAhead + 1);
        for (int r = 0; r <= dc; ++r) {
          vertices[r] = table.insert(&ring_keys[slot * ring_stride + r * dc], ring_codes[slot * dc1 + r],
                                     ring_hashes[slot * dc1 + r]);
        }
      }
      if (p < n_points) std::copy(vertices.begin(), vertices.end(), &point_vertices_[static_cast<std::size_t>(p) * dc1]);
    }
  };
  run_alongside([&] { with_dimension(d, number_vertices); }, overlap, threads);
  n_vertices_ = table.size();
  free_storage(rem0);  // each buffer is freed once dead, for the peak memory
  const int m = n_vertices_;

  // Blur neighbours along axis j: n1 = key - 1 with key[j] + d and n2 = key + 1 with key[j] - d
  // (for j = d only the implied coordinate moves by d); next[j][u] = v when v = n2(u).
  PooledVector<int32_t> next(static_cast<std::size_t>(d1) * m, -1);
  PooledVector<uint8_t> has_previous(static_cast<std::size_t>(d1) * m, 0);
  // The links inside each point's simplex come for free: vertex r + 1 is n2 of vertex r along
  // the axis of the coordinate ranked d - r (and vertex 0 is n2 of vertex d along the axis of
  // the coordinate ranked 0). Simplices that share an edge write the same link: relaxed atomic
  // stores make those identical writes race-free.
  with_dimension(d, [&](auto kDim) {
    const int dc = kDim > 0 ? kDim : d;  // a compile-time constant for d = 1..6
    int32_t* const next_out = next.data();
    uint8_t* const has_previous_out = has_previous.data();
#pragma omp parallel num_threads(threads)
    {
      std::vector<int> axis_of_rank(dc + 1);
#pragma omp for schedule(static)
      for (int p = 0; p < n_points; ++p) {
        if (same_as_previous[p]) continue;
        const int8_t* point_rank = &rank[static_cast<std::size_t>(p) * (dc + 1)];
        for (int i = 0; i <= dc; ++i) axis_of_rank[point_rank[i]] = i;
        const int32_t* simplex = &point_vertices_[static_cast<std::size_t>(p) * (dc + 1)];
        for (int r = 0; r <= dc; ++r) {
          const std::size_t axis_start = static_cast<std::size_t>(axis_of_rank[dc - r]) * m;
          const int32_t v = simplex[r == dc ? 0 : r + 1];
          __atomic_store_n(&next_out[axis_start + simplex[r]], v, __ATOMIC_RELAXED);
          __atomic_store_n(&has_previous_out[axis_start + v], uint8_t{1}, __ATOMIC_RELAXED);
        }
      }
    }
  });
  free_storage(rank);
  // The other links by hash look-ups of n1, which has one answer: each entry has one writer.
  // Most n1 are absent (no point's simplex reached them) and the filter answers those. The
  // look-ups are latency-bound: a batch of candidates goes through the filter, then the table,
  // in passes, each prefetching what the next one reads.
  table.build_filter();
  // n1 along axis j = key + delta_j, delta_j = -1 everywhere but + d at j (nothing for j = d):
  // its code is the key's plus that of delta_j.
  std::vector<int32_t> deltas(static_cast<std::size_t>(d1) * d, -1);
  std::vector<uint64_t> delta_codes(d1);
  for (int j = 0; j <= d; ++j) {
    if (j < d) deltas[static_cast<std::size_t>(j) * d + j] = d;
    delta_codes[j] = table.code(&deltas[static_cast<std::size_t>(j) * d]);
  }
#pragma omp parallel num_threads(threads)
  {
    constexpr int kBatch = 64;
    struct Candidate {
      int32_t vertex;
      int32_t axis;
      uint32_t hash;
    };
    std::vector<Candidate> batch(kBatch + d1);  // flushed once kBatch are pending
    int32_t* const next_out = next.data();
    uint8_t* const has_previous_out = has_previous.data();
    std::vector<int32_t> n1(d);
    int pending = 0;
    auto resolve = [&] {
      int kept = 0;
      for (int b = 0; b < pending; ++b) table.prefetch_filter(batch[b].hash);
      for (int b = 0; b < pending; ++b) {
        if (!table.may_contain(batch[b].hash)) continue;
        table.prefetch(batch[b].hash);
        batch[kept++] = batch[b];
      }
      for (int b = 0; b < kept; ++b) {
        const Candidate& candidate = batch[b];
        if (!table.exact()) {  // the key itself, for the comparison
          const int32_t* k = table.key(candidate.vertex);
          const int32_t* delta = &deltas[static_cast<std::size_t>(candidate.axis) * d];
          for (int i = 0; i < d; ++i) n1[i] = k[i] + delta[i];
        }
        const uint64_t code = table.code_of(candidate.vertex) + delta_codes[candidate.axis];
        const int u = table.find(n1.data(), code, candidate.hash);
        if (u < 0) continue;
        has_previous_out[static_cast<std::size_t>(candidate.axis) * m + candidate.vertex] = 1;
        next_out[static_cast<std::size_t>(candidate.axis) * m + u] = candidate.vertex;
      }
      pending = 0;
    };
    with_dimension(d, [&](auto kDim) {
      const int dc = kDim > 0 ? kDim : d;  // a compile-time constant for d = 1..6
#pragma omp for schedule(static)
      for (int v = 0; v < m; ++v) {
        const uint64_t code = table.code_of(v);
        // Branch-free: whether an axis still needs its look-up follows no pattern.
        for (int j = 0; j <= dc; ++j) {
          const uint32_t h = LatticeHashTable::hash(code + delta_codes[j]);
          batch[pending] = Candidate{v, j, h};
          pending += !has_previous_out[static_cast<std::size_t>(j) * m + v];
        }
        if (pending >= kBatch) resolve();
      }
    });
    resolve();
  }
  if (keep_keys) keys_.assign(table.keys().begin(), table.keys().end());
  owned_table.reset();

  // Chains, axis by axis, in the order of their first vertex; the axes in parallel.
  std::vector<int32_t> axis_elements(d1 + 1, 0), axis_chains(d1 + 1, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int j = 0; j <= d; ++j) {
    const int32_t* axis_next = &next[static_cast<std::size_t>(j) * m];
    const uint8_t* axis_has_previous = &has_previous[static_cast<std::size_t>(j) * m];
    int32_t elements = 0, chains = 0;
    for (int v = 0; v < m; ++v) {
      elements += axis_has_previous[v] | (axis_next[v] >= 0);
      chains += !axis_has_previous[v] & (axis_next[v] >= 0);
    }
    axis_elements[j + 1] = elements;
    axis_chains[j + 1] = chains;
  }
  for (int j = 0; j <= d; ++j) {
    axis_elements[j + 1] += axis_elements[j];
    axis_chains[j + 1] += axis_chains[j];
  }
  chain_vertices_.resize(axis_elements[d1]);
  chain_start_.resize(axis_chains[d1] + 1);
  chain_start_[axis_chains[d1]] = axis_elements[d1];
  axis_chain_.assign(axis_chains.begin(), axis_chains.end());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int j = 0; j <= d; ++j) {
    const int32_t* axis_next = &next[static_cast<std::size_t>(j) * m];
    const uint8_t* axis_has_previous = &has_previous[static_cast<std::size_t>(j) * m];
    // The heads first, branch-free (a quarter of the vertices, in no predictable pattern),
    // into the chain starts, which the walks then overwrite one by one.
    int32_t* const heads = chain_start_.data() + axis_chains[j];
    const int32_t n_heads = axis_chains[j + 1] - axis_chains[j];
    for (int v = 0, found = 0; found < n_heads; ++v) {  // heads[found] is written in range only
      heads[found] = v;
      found += !axis_has_previous[v] & (axis_next[v] >= 0);
    }
    int32_t* const out = chain_vertices_.data();
    int32_t element = axis_elements[j];
    for (int c = 0; c < n_heads; ++c) {
      const int32_t head = heads[c];
      heads[c] = element;
      for (int u = head; u >= 0; u = axis_next[u]) out[element++] = u;
    }
  }

  free_storage(next);
  free_storage(has_previous);
}

void Permutohedral::prepare_gather(int num_threads) const {
  const int threads = resolve_threads(num_threads);
  if (threads <= 1) return;
  std::lock_guard<std::mutex> lock(gather_mutex_);
  if (gather_ready_) return;
  gather_ready_ = true;
  const int n_points = n_points_, d = dim_, d1 = dim_ + 1, m = n_vertices_;
  // Vertex -> points (CSR), points in increasing order so that the gather sums in pydensecrf's
  // order. Each thread counts and fills its own contiguous range of points; offsets of earlier
  // ranges come first, so the result is the same for any thread count.
  vertex_start_.assign(static_cast<std::size_t>(m) + 1, 0);
  vertex_points_.resize(point_vertices_.size());
  vertex_weights_.resize(point_vertices_.size());
  std::vector<PooledVector<int32_t>> offsets(threads);
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_index(), n_threads = thread_count();
    const int begin = static_cast<int>(static_cast<long long>(n_points) * t / n_threads);
    const int end = static_cast<int>(static_cast<long long>(n_points) * (t + 1) / n_threads);
    PooledVector<int32_t>& mine = offsets[t];
    mine.assign(m, 0);
    for (std::size_t at = static_cast<std::size_t>(begin) * d1; at < static_cast<std::size_t>(end) * d1; ++at) {
      ++mine[point_vertices_[at]];
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
        const int32_t slot = mine[point_vertices_[at]]++;
        vertex_points_[slot] = p;
        vertex_weights_[slot] = point_weights_[at];
      }
    }
  }
}

void Permutohedral::filter(const float* in, int channels, float* out, int num_threads, bool reverse) const {
  // One channel (the kernel norms) runs unpadded, with its own stride-1 code: a quarter of the
  // memory, the same float operations.
  const int stride = channels == 1 ? 1 : padded_channels(channels);
  PooledVector<float> padded;
  if (stride != channels) padded = padded_rows(in, n_points_, channels, stride);
  const float* points = stride != channels ? padded.data() : in;
  PooledArray<float> values = make_pooled_array<float>(buffer_size(stride));
  const bool alpha_in_weight = channels > 2;
  prepare_gather(num_threads);
  with_stride(stride, [&](auto kStride) {
#pragma omp parallel num_threads(resolve_threads(num_threads))
    {
      splat<kStride>(points, stride, nullptr, values.get());
      blur<kStride>(values.get(), stride, reverse);
      std::vector<float> sliced(stride);
#pragma omp for schedule(static)
      for (int p = 0; p < n_points_; ++p) {
        slice_point<kStride>(p, values.get(), stride, alpha_in_weight, sliced.data());
        std::copy(sliced.begin(), sliced.begin() + channels, out + static_cast<std::size_t>(p) * channels);
      }
    }
  });
}

}  // namespace crf
