// Label compatibility of a pairwise term, with pydensecrf's sign conventions.
#pragma once

#include <vector>

#include "permutohedral.h"

namespace crf {

// pydensecrf applies compat to the filtered marginals m = K Q and subtracts the result from the
// logits. Potts(w) gives -w m (so the update adds w m); Diagonal(v) gives v * m; Matrix(W) gives
// W' m with W' = (W + W^T) / 2. The signs differ between Potts and the others, as in pydensecrf.
class LabelCompat {
 public:
  enum class Kind { kPotts, kDiagonal, kMatrix };

  static LabelCompat potts(float weight) { return LabelCompat(Kind::kPotts, {weight}, 1); }
  static LabelCompat diagonal(const float* weights, int n_labels) {
    std::vector<float> padded(padded_channels(n_labels), 0.0f);
    std::copy(weights, weights + n_labels, padded.begin());
    return LabelCompat(Kind::kDiagonal, std::move(padded), n_labels);
  }
  // `matrix`: n_labels x n_labels, row-major; symmetrised here and stored transposed, one row
  // of padded_channels(n_labels) floats per input label, so that subtract() runs across labels.
  static LabelCompat matrix(const float* matrix, int n_labels) {
    const int stride = padded_channels(n_labels);
    std::vector<float> by_input(static_cast<std::size_t>(n_labels) * stride, 0.0f);
    for (int out = 0; out < n_labels; ++out) {
      for (int in = 0; in < n_labels; ++in) {
        by_input[in * stride + out] = 0.5f * (matrix[out * n_labels + in] + matrix[in * n_labels + out]);
      }
    }
    return LabelCompat(Kind::kMatrix, std::move(by_input), n_labels);
  }

  Kind kind() const { return kind_; }
  int n_labels() const { return n_labels_; }

  // logits[l] -= compat(filtered)[l] for the `stride` lanes of one point (padding lanes of
  // `filtered` are zero and stay so). Each output lane sums its inputs in label order, as
  // pydensecrf does; the loops run across lanes so that they vectorise.
  template <int kStride>
  void subtract(const float* __restrict filtered, int stride, float* __restrict logits) const {
    const int s = kStride > 0 ? kStride : stride;
    switch (kind_) {
      case Kind::kPotts: {
        const float minus_w = -weights_[0];
        if constexpr (kStride > 0) {  // row by row, as the slice stored `filtered` (store forwarding)
          for_rows<kStride>([&](int at, auto lanes) {
            store<lanes>(logits + at, load<lanes>(logits + at) - minus_w * load<lanes>(filtered + at));
          });
        } else {
          for (int l = 0; l < s; ++l) logits[l] -= minus_w * filtered[l];
        }
        break;
      }
      case Kind::kDiagonal:
        if constexpr (kStride > 0) {
          for_rows<kStride>([&](int at, auto lanes) {
            store<lanes>(logits + at,
                         load<lanes>(logits + at) - load<lanes>(&weights_[at]) * load<lanes>(filtered + at));
          });
        } else {
          for (int l = 0; l < s; ++l) logits[l] -= weights_[l] * filtered[l];
        }
        break;
      case Kind::kMatrix:
        if constexpr (kStride > 0) {
          float sum[kStride] = {};
          for (int in = 0; in < n_labels_; ++in) {
            const float* __restrict column = &weights_[static_cast<std::size_t>(in) * kStride];
            for (int l = 0; l < kStride; ++l) sum[l] += column[l] * filtered[in];
          }
          for (int l = 0; l < kStride; ++l) logits[l] -= sum[l];
        } else {
          for (int l = 0; l < s; ++l) {
            float sum = 0.0f;
            for (int in = 0; in < n_labels_; ++in) sum += weights_[static_cast<std::size_t>(in) * s + l] * filtered[in];
            logits[l] -= sum;
          }
        }
        break;
    }
  }

 private:
  LabelCompat(Kind kind, std::vector<float> weights, int n_labels)
      : kind_(kind), weights_(std::move(weights)), n_labels_(n_labels) {}

  Kind kind_;
  std::vector<float> weights_;
  int n_labels_;
};

}  // namespace crf
