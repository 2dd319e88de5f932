// Label compatibility of a pairwise term, with pydensecrf's sign conventions.
#pragma once

#include <vector>

namespace crf {

// pydensecrf applies compat to the filtered marginals m = K Q and subtracts the result from the
// logits. Potts(w) gives -w m (so the update adds w m); Diagonal(v) gives v * m; Matrix(W) gives
// W' m with W' = (W + W^T) / 2. The signs differ between Potts and the others, as in pydensecrf.
class LabelCompat {
 public:
  enum class Kind { kPotts, kDiagonal, kMatrix };

  static LabelCompat potts(float weight) { return LabelCompat(Kind::kPotts, {weight}, 1); }
  static LabelCompat diagonal(const float* weights, int n_labels) {
    return LabelCompat(Kind::kDiagonal, std::vector<float>(weights, weights + n_labels), n_labels);
  }
  // `matrix`: n_labels x n_labels, row-major; symmetrised here.
  static LabelCompat matrix(const float* matrix, int n_labels) {
    std::vector<float> sym(static_cast<std::size_t>(n_labels) * n_labels);
    for (int i = 0; i < n_labels; ++i) {
      for (int j = 0; j < n_labels; ++j) {
        sym[i * n_labels + j] = 0.5f * (matrix[i * n_labels + j] + matrix[j * n_labels + i]);
      }
    }
    return LabelCompat(Kind::kMatrix, std::move(sym), n_labels);
  }

  Kind kind() const { return kind_; }
  int n_labels() const { return n_labels_; }

  // out[l] = compat(filtered)[l] for the n_labels values of one point.
  void apply(const float* filtered, int n_labels, float* out) const {
    switch (kind_) {
      case Kind::kPotts:
        for (int l = 0; l < n_labels; ++l) out[l] = -weights_[0] * filtered[l];
        break;
      case Kind::kDiagonal:
        for (int l = 0; l < n_labels; ++l) out[l] = weights_[l] * filtered[l];
        break;
      case Kind::kMatrix:
        for (int l = 0; l < n_labels; ++l) {
          float acc = 0.0f;
          for (int k = 0; k < n_labels; ++k) acc += weights_[l * n_labels + k] * filtered[k];
          out[l] = acc;
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
