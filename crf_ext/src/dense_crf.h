// Fully connected CRF with Gaussian edge potentials (Kraehenbuehl and Koltun 2011), mean-field
// inference with permutohedral-lattice message passing, numerically following pydensecrf.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "label_compat.h"
#include "permutohedral.h"

namespace crf {

// Where the time of a call goes (wall-clock seconds, the iterations' phases summed over them), for
// bench/crf.py. slice and softmax (and, with one thread, the splat) share one loop: its time is
// split by the threads' busy time in each.
struct PhaseTimes {
  double build = 0, splat = 0, blur = 0, slice = 0, softmax = 0;
};

// pydensecrf's enum values.
enum class Normalization : int { kNone = 0, kBefore = 1, kAfter = 2, kSymmetric = 3 };

// One Gaussian kernel: its lattice, its normalisation, its label compatibility.
class PairwiseKernel {
 public:
  // `features`: n_points x dim, point-major. `overlap`: see Permutohedral.
  PairwiseKernel(const float* features, int n_points, int dim, LabelCompat compat,
                 Normalization normalization, int num_threads, const std::function<void()>& overlap = nullptr);

  const Permutohedral& lattice() const { return lattice_; }
  const LabelCompat& compat() const { return compat_; }
  // Per-point factors applied before the filter and after it (null: none).
  const float* pre_scale() const;
  const float* post_scale() const;

 private:
  Permutohedral lattice_;
  LabelCompat compat_;
  Normalization normalization_;
  PooledVector<float> norm_;
};

class DenseCrf {
 public:
  DenseCrf(int n_points, int n_labels);

  int n_points() const { return n_points_; }
  int n_labels() const { return n_labels_; }
  bool has_unary() const { return !neg_unary_.empty(); }
  const std::vector<std::unique_ptr<PairwiseKernel>>& kernels() const { return kernels_; }

  // Unary energies, n_labels x n_points (label-major, as pydensecrf's setUnaryEnergy takes them).
  void set_unary(const float* unary);
  // Unary from probabilities, n_labels x n_points: -log(clip(p, clip_min, 1)). Throws
  // std::invalid_argument naming the first NaN, infinite or negative entry.
  void set_unary_from_probs(const float* probs, float clip_min, int num_threads);
  void add_kernel(std::unique_ptr<PairwiseKernel> kernel);

  // Marginals after n_iter mean-field iterations from softmax(-unary), into q: n_points x
  // n_labels, or n_labels x n_points when label_major.
  void inference(int n_iter, float* q, bool label_major, int num_threads, PhaseTimes* times = nullptr) const;
  // One mean-field iteration on q (n_points x n_labels), in place.
  void step(float* q, int num_threads) const;
  // pydensecrf's klDivergence(Q): sum Q log Q + sum U Q + sum_k sum Q * compat_k(K_k Q).
  double kl_divergence(const float* q, int num_threads) const;

 private:
  // Mean-field iterations on q_padded (n_points x stride, zero padding), in place.
  // `times`, if set, receives the time of each phase.
  void iterate(float* q_padded, int n_iter, int num_threads, PhaseTimes* times = nullptr) const;
  // logits -= compat(post * slice) of `kernel` for one point (stride lanes); `filtered` is the
  // kernel's blurred lattice values, `sliced` a scratch row. kDim: the kernel's feature
  // dimension if known at compile time, else 0.
  template <int kStride, int kDim = 0>
  void subtract_message(const PairwiseKernel& kernel, int point, const float* filtered, float* sliced,
                        float* logits) const;

  int n_points_;
  int n_labels_;
  int stride_;
  PooledVector<float> neg_unary_;  // n_points x stride (zero padding): log-probabilities, i.e. -U
  std::vector<std::unique_ptr<PairwiseKernel>> kernels_;
};

// BANA's call (pydensecrf's DenseCRF2D with a Gaussian and a bilateral kernel, Potts): image
// H x W x 3 RGB, probs C x H x W, q_out C x H x W.
struct CrfParams {
  float bi_w = 4.0f, bi_xy_std = 55.0f, bi_rgb_std = 3.0f, pos_w = 3.0f, pos_xy_std = 3.0f;
  int n_iter = 10;
};
// `times`, if set, receives where the time went (build: the unary and both lattices).
void dense_crf_2d(const uint8_t* image, const float* probs, int height, int width, int n_labels,
                  const CrfParams& params, float* q_out, int num_threads, PhaseTimes* times = nullptr);

}  // namespace crf
