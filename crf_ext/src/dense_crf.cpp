#include "dense_crf.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "fast_math.h"
#include "parallel.h"
#include "simd.h"

namespace crf {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Points per softmax chunk: small enough for L1, long enough to fill the SIMD lanes.
constexpr int kChunk = 64;

// out[c * out_step + r] = in[r * in_step + c] for r < rows, c < cols: 4 x 4 blocks in
// registers, the remainders one float at a time.
void transpose(const float* __restrict in, int rows, int cols, int in_step, float* __restrict out, int out_step) {
  auto at = [](int row, int col, int step) { return static_cast<std::size_t>(row) * step + col; };
  const int block_rows = rows / 4 * 4, block_cols = cols / 4 * 4;
  for (int r = 0; r < block_rows; r += 4) {
    for (int c = 0; c < block_cols; c += 4) {
      Floats<4> block[4];
      for (int i = 0; i < 4; ++i) block[i] = load<4>(in + at(r + i, c, in_step));
      transpose4(block);
      for (int i = 0; i < 4; ++i) store<4>(out + at(c + i, r, out_step), block[i]);
    }
    for (int c = block_cols; c < cols; ++c) {
      for (int i = 0; i < 4; ++i) out[at(c, r + i, out_step)] = in[at(r + i, c, in_step)];
    }
  }
  for (int r = block_rows; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) out[at(c, r, out_step)] = in[at(r, c, in_step)];
  }
}

// q[p] = softmax(logits[p]) for `count` <= kChunk points, both point-major with `stride` floats
// per point (the first n_labels used; q's padding lanes are set to zero). The labels are
// transposed into `by_label` (stride x kChunk) so that every step runs across points in SIMD
// lanes while each point still takes pydensecrf's expAndNormalize steps in label order:
// subtract the max, exponentiate, sum, divide.
void softmax_chunk(const float* __restrict logits, int count, int n_labels, int stride, float* __restrict by_label,
                   float* __restrict q) {
  transpose(logits, count, stride, stride, by_label, kChunk);
  float top[kChunk], sum[kChunk];
  for (int p = 0; p < count; ++p) top[p] = by_label[p];
  for (int l = 1; l < n_labels; ++l) {
    const float* __restrict row = by_label + l * kChunk;
    for (int p = 0; p < count; ++p) top[p] = top[p] < row[p] ? row[p] : top[p];
  }
  for (int p = 0; p < count; ++p) sum[p] = 0.0f;
  for (int l = 0; l < n_labels; ++l) {
    float* __restrict row = by_label + l * kChunk;
#pragma omp simd
    for (int p = 0; p < count; ++p) {
      row[p] = exp_approx(row[p] - top[p]);
      sum[p] += row[p];
    }
  }
  for (int l = 0; l < n_labels; ++l) {
    float* __restrict row = by_label + l * kChunk;
    for (int p = 0; p < count; ++p) row[p] /= sum[p];
  }
  std::fill(by_label + n_labels * kChunk, by_label + stride * kChunk, 0.0f);
  transpose(by_label, stride, count, kChunk, q, stride);
}

// A lattice value buffer, uninitialised: the splat writes every vertex row.
PooledArray<float> lattice_buffer(const Permutohedral& lattice, int stride) {
  return make_pooled_array<float>(lattice.buffer_size(stride));
}

// DenseCRF2D's features exactly as pydensecrf builds them: float pixel index / float std, then,
// if `image` (RGB, H x W x 3) is given, each channel / rgb_std. n_points x 2, or n_points x 5.
PooledVector<float> pixel_features(int height, int width, float xy_std, const uint8_t* image, float rgb_std,
                                   int num_threads) {
  const int dim = image != nullptr ? 5 : 2;
  PooledVector<float> features(static_cast<std::size_t>(height) * width * dim);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const std::size_t p = static_cast<std::size_t>(y) * width + x;
      float* f = &features[p * dim];
      f[0] = static_cast<float>(x) / xy_std;
      f[1] = static_cast<float>(y) / xy_std;
      if (image != nullptr) {
        for (int ch = 0; ch < 3; ++ch) f[2 + ch] = static_cast<float>(image[p * 3 + ch]) / rgb_std;
      }
    }
  }
  return features;
}

}  // namespace

PairwiseKernel::PairwiseKernel(const float* features, int n_points, int dim, LabelCompat compat,
                               Normalization normalization, int num_threads, const std::function<void()>& overlap)
    : lattice_(features, n_points, dim, num_threads, false, overlap),
      compat_(std::move(compat)),
      normalization_(normalization) {
  if (normalization_ == Normalization::kNone) return;  // pydensecrf computes a mean norm it never uses
  // The norm is K 1 through the one-channel code path, then pydensecrf's double-precision formula.
  PooledVector<float> ones(n_points, 1.0f);
  norm_.resize(n_points);
  lattice_.filter(ones.data(), 1, norm_.data(), num_threads);
  for (float& n : norm_) {
    const double shifted = static_cast<double>(n) + 1e-20;
    n = static_cast<float>(normalization_ == Normalization::kSymmetric ? 1.0 / std::sqrt(shifted) : 1.0 / shifted);
  }
}

const float* PairwiseKernel::pre_scale() const {
  const bool before = normalization_ == Normalization::kSymmetric || normalization_ == Normalization::kBefore;
  return before ? norm_.data() : nullptr;
}

const float* PairwiseKernel::post_scale() const {
  const bool after = normalization_ == Normalization::kSymmetric || normalization_ == Normalization::kAfter;
  return after ? norm_.data() : nullptr;
}

DenseCrf::DenseCrf(int n_points, int n_labels)
    : n_points_(n_points), n_labels_(n_labels), stride_(padded_channels(n_labels)) {}

void DenseCrf::set_unary(const float* unary) {
  neg_unary_.assign(static_cast<std::size_t>(n_points_) * stride_, 0.0f);
  for (int l = 0; l < n_labels_; ++l) {
    for (int p = 0; p < n_points_; ++p) {
      neg_unary_[static_cast<std::size_t>(p) * stride_ + l] = -unary[static_cast<std::size_t>(l) * n_points_ + p];
    }
  }
}

void DenseCrf::set_unary_from_probs(const float* probs, float clip_min, int num_threads) {
  neg_unary_.resize(static_cast<std::size_t>(n_points_) * stride_);
  const int n = n_points_, c = n_labels_, stride = stride_;
  // Index of the first bad entry (label-major), or the end: checked in the same pass.
  long long first_bad = std::numeric_limits<long long>::max();
#pragma omp parallel for schedule(static) reduction(min : first_bad) num_threads(resolve_threads(num_threads))
  for (int p = 0; p < n; ++p) {
    float* row = &neg_unary_[static_cast<std::size_t>(p) * stride];
    for (int l = 0; l < c; ++l) {
      const float value = probs[static_cast<std::size_t>(l) * n + p];
      if (!(value >= 0.0f) || value == std::numeric_limits<float>::infinity()) {
        first_bad = std::min(first_bad, static_cast<long long>(l) * n + p);
      }
      row[l] = std::log(std::min(std::max(value, clip_min), 1.0f));
    }
    for (int l = c; l < stride; ++l) row[l] = 0.0f;
  }
  if (first_bad != std::numeric_limits<long long>::max()) {
    const long long label = first_bad / n, point = first_bad % n;
    throw std::invalid_argument("probs must be finite and >= 0; probs[" + std::to_string(label) + "] at pixel " +
                                std::to_string(point) + " is " +
                                std::to_string(probs[static_cast<std::size_t>(first_bad)]));
  }
}

void DenseCrf::add_kernel(std::unique_ptr<PairwiseKernel> kernel) { kernels_.push_back(std::move(kernel)); }

template <int kStride, int kDim>
void DenseCrf::subtract_message(const PairwiseKernel& kernel, int point, const float* filtered,
                                float* __restrict sliced, float* __restrict logits) const {
  const int s = kStride > 0 ? kStride : stride_;
  kernel.lattice().template slice_point<kStride, kDim>(point, filtered, s, n_labels_ > 2, sliced);
  if (const float* post = kernel.post_scale()) {
    const float scale = post[point];
    if constexpr (kStride > 0) {
      for_rows<kStride>([&](int at, auto lanes) { store<lanes>(sliced + at, load<lanes>(sliced + at) * scale); });
    } else {
      for (int l = 0; l < s; ++l) sliced[l] *= scale;
    }
  }
  kernel.compat().template subtract<kStride>(sliced, s, logits);
}

void DenseCrf::iterate(float* q, int n_iter, int num_threads, PhaseTimes* times) const {
  const int n = n_points_, c = n_labels_, stride = stride_;
  const int n_kernels = static_cast<int>(kernels_.size());
  const int threads = resolve_threads(num_threads);
  // With one thread the splat is a scatter, and that of the next iteration runs inside the
  // slice loop: each point's new q goes onto its vertices right after its softmax, while its
  // rows are still in cache, into a second buffer per kernel (the first is still being sliced).
  // Points in increasing order give every vertex the sums the gather gives. Several threads
  // would race on shared vertices: they gather, as a phase of its own.
  const bool scatter = threads == 1;
  std::vector<PooledArray<float>> values, next;
  for (int k = 0; k < n_kernels; ++k) {
    kernels_[k]->lattice().prepare_gather(threads);
    values.push_back(lattice_buffer(kernels_[k]->lattice(), stride));
    if (scatter && n_iter > 1) next.push_back(lattice_buffer(kernels_[k]->lattice(), stride));
  }
  // Timing: thread 0 reads the clock after each phase's closing barrier; the shared loop's time
  // is split by every thread's busy time in the slice, the softmax and the scatter.
  Clock::time_point mark;
  double splat_time = 0, blur_time = 0, loop_time = 0, slice_busy = 0, softmax_busy = 0, scatter_busy = 0;
  with_stride(stride, [&](auto kStride) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> logits(static_cast<std::size_t>(kChunk) * stride), by_label(static_cast<std::size_t>(kChunk) * stride);
      std::vector<float> sliced(stride);
      double my_slice = 0, my_softmax = 0, my_scatter = 0;
      auto now = [&] { return times != nullptr ? Clock::now() : Clock::time_point{}; };
      auto phase_done = [&](double& total) {
        if (times != nullptr && thread_index() == 0) {
          total += seconds_since(mark);
          mark = Clock::now();
        }
      };
      if (times != nullptr && thread_index() == 0) mark = Clock::now();
      for (int it = 0; it < n_iter; ++it) {
        if (!scatter || it == 0) {  // a scatter with one thread (Permutohedral::splat)
          // Every splat reads q before any point of q is overwritten below.
          for (int k = 0; k < n_kernels; ++k) {
            kernels_[k]->lattice().template splat<kStride>(q, stride, kernels_[k]->pre_scale(), values[k].get());
          }
          phase_done(splat_time);
        }
        for (int k = 0; k < n_kernels; ++k) {
          kernels_[k]->lattice().template blur<kStride>(values[k].get(), stride, false);
        }
        phase_done(blur_time);
        const bool scatter_now = scatter && it + 1 < n_iter;
        if (scatter_now) {
          for (int k = 0; k < n_kernels; ++k) std::fill_n(next[k].get(), kernels_[k]->lattice().buffer_size(stride), 0.0f);
          phase_done(splat_time);
        }
        // logits = -U - sum_k compat_k(K_k q), in pydensecrf's order, then softmax into q. Guided:
        // the slice costs more where the image has more vertices.
#pragma omp for schedule(guided, 4)
        for (int start = 0; start < n; start += kChunk) {
          const Clock::time_point slice_start = now();
          const int count = std::min(kChunk, n - start);
          std::copy_n(neg_unary_.data() + static_cast<std::size_t>(start) * stride,
                      static_cast<std::size_t>(count) * stride, logits.data());
          // Kernel by kernel over the chunk (each point still subtracts in kernel order), so that
          // one lattice's rows at a time stay in cache; DenseCRF2D's dimensions (2 and 5) unrolled.
          for (int k = 0; k < n_kernels; ++k) {
            with_constant<2, 5>(kernels_[k]->lattice().dim(), [&](auto kDim) {
              for (int i = 0; i < count; ++i) {
                subtract_message<kStride, kDim>(*kernels_[k], start + i, values[k].get(), sliced.data(),
                                                logits.data() + static_cast<std::size_t>(i) * stride);
              }
            });
          }
          const Clock::time_point softmax_start = now();
          float* q_chunk = q + static_cast<std::size_t>(start) * stride;
          softmax_chunk(logits.data(), count, c, stride, by_label.data(), q_chunk);
          const Clock::time_point scatter_start = now();
          if (scatter_now) {
            for (int k = 0; k < n_kernels; ++k) {
              const Permutohedral& lattice = kernels_[k]->lattice();
              with_constant<2, 5>(lattice.dim(), [&](auto kDim) {
                for (int i = 0; i < count; ++i) {
                  lattice.template splat_point<kStride, kDim>(start + i, q_chunk + static_cast<std::size_t>(i) * stride,
                                                              stride, kernels_[k]->pre_scale(), next[k].get());
                }
              });
            }
          }
          if (times != nullptr) {
            my_slice += std::chrono::duration<double>(softmax_start - slice_start).count();
            my_softmax += std::chrono::duration<double>(scatter_start - softmax_start).count();
            my_scatter += seconds_since(scatter_start);
          }
        }
        if (scatter_now) values.swap(next);  // one thread: no other reads them
        phase_done(loop_time);
      }
      if (times != nullptr) {
#pragma omp atomic
        slice_busy += my_slice;
#pragma omp atomic
        softmax_busy += my_softmax;
#pragma omp atomic
        scatter_busy += my_scatter;
      }
    }
  });
  if (times != nullptr) {
    const double busy = slice_busy + softmax_busy + scatter_busy;
    times->splat += splat_time + (busy > 0 ? loop_time * scatter_busy / busy : 0.0);
    times->blur += blur_time;
    if (busy > 0) {
      times->slice += loop_time * slice_busy / busy;
      times->softmax += loop_time * softmax_busy / busy;
    }
  }
}

void DenseCrf::inference(int n_iter, float* q, bool label_major, int num_threads, PhaseTimes* times) const {
  const int n = n_points_, c = n_labels_, stride = stride_;
  PooledArray<float> padded = make_pooled_array<float>(static_cast<std::size_t>(n) * stride);
#pragma omp parallel num_threads(resolve_threads(num_threads))
  {
    std::vector<float> by_label(static_cast<std::size_t>(kChunk) * stride);
#pragma omp for schedule(static)
    for (int start = 0; start < n; start += kChunk) {
      const int count = std::min(kChunk, n - start);
      const std::size_t at = static_cast<std::size_t>(start) * stride;
      softmax_chunk(neg_unary_.data() + at, count, c, stride, by_label.data(), padded.get() + at);
    }
  }
  iterate(padded.get(), n_iter, num_threads, times);
#pragma omp parallel for schedule(static) num_threads(resolve_threads(num_threads))
  for (int p = 0; p < n; ++p) {
    const float* row = padded.get() + static_cast<std::size_t>(p) * stride;
    for (int l = 0; l < c; ++l) {
      q[label_major ? static_cast<std::size_t>(l) * n + p : static_cast<std::size_t>(p) * c + l] = row[l];
    }
  }
}

void DenseCrf::step(float* q, int num_threads) const {
  const int n = n_points_, c = n_labels_, stride = stride_;
  PooledVector<float> padded = padded_rows(q, n, c, stride);
  iterate(padded.data(), 1, num_threads);
  for (int p = 0; p < n; ++p) {
    std::copy_n(padded.data() + static_cast<std::size_t>(p) * stride, c, q + static_cast<std::size_t>(p) * c);
  }
}

double DenseCrf::kl_divergence(const float* q, int num_threads) const {
  const int n = n_points_, c = n_labels_, stride = stride_;
  const PooledVector<float> padded = padded_rows(q, n, c, stride);
  // Per-point terms summed in point order afterwards: the same bits for any thread count.
  PooledVector<double> per_point(n, 0.0);
  for (int p = 0; p < n; ++p) {
    for (int l = 0; l < c; ++l) {
      const float ql = padded[static_cast<std::size_t>(p) * stride + l];
      per_point[p] += static_cast<double>(ql) * std::log(static_cast<double>(std::max(ql, 1e-20f)));
      per_point[p] -= static_cast<double>(neg_unary_[static_cast<std::size_t>(p) * stride + l]) * ql;
    }
  }
  for (const auto& kernel : kernels_) {
    const Permutohedral& lattice = kernel->lattice();
    lattice.prepare_gather(num_threads);
    PooledVector<float> values(lattice.buffer_size(stride), 0.0f);
    with_stride(stride, [&](auto kStride) {
#pragma omp parallel num_threads(resolve_threads(num_threads))
      {
        lattice.template splat<kStride>(padded.data(), stride, kernel->pre_scale(), values.data());
        lattice.template blur<kStride>(values.data(), stride, false);
        std::vector<float> sliced(stride), minus_message(stride);
#pragma omp for schedule(static)
        for (int p = 0; p < n; ++p) {
          std::fill(minus_message.begin(), minus_message.end(), 0.0f);
          subtract_message<kStride>(*kernel, p, values.data(), sliced.data(), minus_message.data());
          for (int l = 0; l < c; ++l) {
            per_point[p] -= static_cast<double>(padded[static_cast<std::size_t>(p) * stride + l]) * minus_message[l];
          }
        }
      }
    });
  }
  double kl = 0.0;
  for (double term : per_point) kl += term;
  return kl;
}

void dense_crf_2d(const uint8_t* image, const float* probs, int height, int width, int n_labels,
                  const CrfParams& params, float* q_out, int num_threads, PhaseTimes* times) {
  const Clock::time_point start = Clock::now();
  const int n = height * width;
  DenseCrf crf(n, n_labels);
  // One of the threads builds the (small) Gaussian kernel and the unary while the bilateral
  // lattice numbers its vertices, its one serial step (with one thread: right after it). The
  // same bits for any thread count.
  std::unique_ptr<PairwiseKernel> gaussian;
  auto build_gaussian_and_unary = [&] {
    const PooledVector<float> features = pixel_features(height, width, params.pos_xy_std, nullptr, 0.0f, 1);
    gaussian = std::make_unique<PairwiseKernel>(features.data(), n, 2, LabelCompat::potts(params.pos_w),
                                                Normalization::kSymmetric, 1);
    gaussian->lattice().prepare_gather(num_threads);  // here, beside the serial step, if needed
    crf.set_unary_from_probs(probs, 1e-5f, 1);
  };
  PooledVector<float> features =
      pixel_features(height, width, params.bi_xy_std, image, params.bi_rgb_std, resolve_threads(num_threads));
  auto bilateral = std::make_unique<PairwiseKernel>(features.data(), n, 5, LabelCompat::potts(params.bi_w),
                                                    Normalization::kSymmetric, num_threads, build_gaussian_and_unary);
  free_storage(features);
  crf.add_kernel(std::move(gaussian));  // pydensecrf's order: the messages are summed in it
  crf.add_kernel(std::move(bilateral));
  if (times != nullptr) times->build += seconds_since(start);
  crf.inference(params.n_iter, q_out, /*label_major=*/true, num_threads, times);
}

}  // namespace crf
