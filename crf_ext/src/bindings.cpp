// pybind11 bindings. The Python layer (crf_ext/*.py) validates arguments and gives the friendly
// errors; the checks here only guard memory safety for callers of the raw module. One module per
// instruction-set level (CRF_EXT_MODULE, CRF_EXT_LEVEL: see CMakeLists.txt); module_local classes, so
// that several levels can be loaded in one process (the tests compare them).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "dense_crf.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void check_shape(const py::array& a, std::vector<py::ssize_t> expected, const std::string& name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(expected.size());
  for (std::size_t i = 0; ok && i < expected.size(); ++i) ok = a.shape(i) == expected[i];
  if (!ok) {
    std::string got = "(", want = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += std::to_string(a.shape(i)) + (i + 1 < a.ndim() ? ", " : "");
    for (std::size_t i = 0; i < expected.size(); ++i) {
      want += std::to_string(expected[i]) + (i + 1 < expected.size() ? ", " : "");
    }
    throw std::invalid_argument(name + " has shape " + got + "), expected " + want + ")");
  }
}

// Every lattice feature must stay well inside int32 lattice coordinates after elevation: the one
// bound both APIs apply (a tiny standard deviation otherwise overflows them).
constexpr float kMaxFeature = 1e6f;

void require_feature(float value, const std::string& what) {
  if (!(std::fabs(value) <= kMaxFeature)) {
    throw std::invalid_argument(what + " must be finite with |value| <= 1e6 (got " + std::to_string(value) + ")");
  }
}

void check_features(const CArray<float>& features) {
  require(features.ndim() == 2 && features.shape(0) > 0 && features.shape(1) > 0 && features.shape(1) <= 64,
          "features must be (n_points, dim) with n_points >= 1 and 1 <= dim <= 64");
  const float* f = features.data();
  for (py::ssize_t i = 0; i < features.size(); ++i) require_feature(f[i], "features");
}

// The largest features dense_crf_2d computes for `image` (as pixel_features does), against the bound.
void check_feature_range(const CArray<uint8_t>& image, const crf::CrfParams& p, const std::string& where) {
  const float far = static_cast<float>(std::max(image.shape(0), image.shape(1)) - 1);
  uint8_t brightest = 0;
  const uint8_t* pixels = image.data();
  for (py::ssize_t i = 0; i < image.size(); ++i) brightest = std::max(brightest, pixels[i]);
  require_feature(far / p.bi_xy_std, where + "bilateral features (pixel index / bi_xy_std)");
  require_feature(static_cast<float>(brightest) / p.bi_rgb_std, where + "bilateral features (colour / bi_rgb_std)");
  require_feature(far / p.pos_xy_std, where + "position features (pixel index / pos_xy_std)");
}

crf::CrfParams make_params(float bi_w, float bi_xy_std, float bi_rgb_std, float pos_w, float pos_xy_std, int n_iter) {
  require(bi_xy_std > 0 && bi_rgb_std > 0 && pos_xy_std > 0, "standard deviations must be > 0");
  require(n_iter >= 0, "n_iter must be >= 0");
  crf::CrfParams p;
  p.bi_w = bi_w;
  p.bi_xy_std = bi_xy_std;
  p.bi_rgb_std = bi_rgb_std;
  p.pos_w = pos_w;
  p.pos_xy_std = pos_xy_std;
  p.n_iter = n_iter;
  return p;
}

// Shapes of one (image, probs) pair: returns (C, H, W).
std::vector<py::ssize_t> check_pair(const CArray<uint8_t>& image, const CArray<float>& probs, const std::string& where) {
  require(image.ndim() == 3 && image.shape(2) == 3 && image.shape(0) > 0 && image.shape(1) > 0,
          where + "image must be (H, W, 3) with H, W >= 1");
  require(probs.ndim() == 3 && probs.shape(0) >= 1, where + "probs must be (C, H, W) with C >= 1");
  check_shape(probs, {probs.shape(0), image.shape(0), image.shape(1)}, where + "probs");
  return {probs.shape(0), image.shape(0), image.shape(1)};
}

py::array_t<float> dense_crf(const CArray<uint8_t>& image, const CArray<float>& probs, float bi_w, float bi_xy_std,
                             float bi_rgb_std, float pos_w, float pos_xy_std, int n_iter, int num_threads) {
  const auto chw = check_pair(image, probs, "");
  const crf::CrfParams params = make_params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter);
  check_feature_range(image, params, "");
  py::array_t<float> out(chw);
  const uint8_t* im = image.data();
  const float* pr = probs.data();
  float* q = out.mutable_data();
  {
    py::gil_scoped_release release;
    crf::dense_crf_2d(im, pr, static_cast<int>(chw[1]), static_cast<int>(chw[2]), static_cast<int>(chw[0]), params,
                      q, num_threads);
  }
  return out;
}

// dense_crf with the time of each phase (bench/crf.py): (marginals, {phase: seconds}).
py::tuple dense_crf_profile(const CArray<uint8_t>& image, const CArray<float>& probs, float bi_w, float bi_xy_std,
                            float bi_rgb_std, float pos_w, float pos_xy_std, int n_iter, int num_threads) {
  const auto chw = check_pair(image, probs, "");
  const crf::CrfParams params = make_params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter);
  check_feature_range(image, params, "");
  py::array_t<float> out(chw);
  crf::PhaseTimes times;
  const uint8_t* im = image.data();
  const float* pr = probs.data();
  float* q = out.mutable_data();
  {
    py::gil_scoped_release release;
    crf::dense_crf_2d(im, pr, static_cast<int>(chw[1]), static_cast<int>(chw[2]), static_cast<int>(chw[0]), params,
                      q, num_threads, &times);
  }
  py::dict seconds;
  seconds["build"] = times.build;
  seconds["splat"] = times.splat;
  seconds["blur"] = times.blur;
  seconds["slice"] = times.slice;
  seconds["softmax"] = times.softmax;
  return py::make_tuple(out, seconds);
}

py::list dense_crf_batch(const py::sequence& images, const py::sequence& probs_list, float bi_w, float bi_xy_std,
                         float bi_rgb_std, float pos_w, float pos_xy_std, int n_iter, int num_threads) {
  require(images.size() == probs_list.size(), "images and probs_list must have the same length");
  const crf::CrfParams params = make_params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter);
  const std::size_t count = images.size();
  std::vector<CArray<uint8_t>> ims;
  std::vector<CArray<float>> probs;
  std::vector<py::array_t<float>> outs;
  std::vector<std::vector<py::ssize_t>> shapes;
  for (std::size_t i = 0; i < count; ++i) {
    ims.push_back(CArray<uint8_t>::ensure(images[i]));
    probs.push_back(CArray<float>::ensure(probs_list[i]));
    require(ims.back() && probs.back(), "item " + std::to_string(i) + " is not an array");
    shapes.push_back(check_pair(ims.back(), probs.back(), "item " + std::to_string(i) + ": "));
    check_feature_range(ims.back(), params, "item " + std::to_string(i) + ": ");
    outs.emplace_back(shapes.back());
  }
  std::vector<const uint8_t*> im_ptrs(count);
  std::vector<const float*> prob_ptrs(count);
  std::vector<float*> out_ptrs(count);
  for (std::size_t i = 0; i < count; ++i) {
    im_ptrs[i] = ims[i].data();
    prob_ptrs[i] = probs[i].data();
    out_ptrs[i] = outs[i].mutable_data();
  }
  std::vector<std::string> errors(count);
  {
    py::gil_scoped_release release;
    const int threads = crf::resolve_threads(num_threads);
    // One image per thread: no synchronisation inside an image, and the same bits as dense_crf.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long long i = 0; i < static_cast<long long>(count); ++i) {
      try {
        crf::dense_crf_2d(im_ptrs[i], prob_ptrs[i], static_cast<int>(shapes[i][1]), static_cast<int>(shapes[i][2]),
                          static_cast<int>(shapes[i][0]), params, out_ptrs[i], 1);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
  }
  for (std::size_t i = 0; i < count; ++i) {
    require(errors[i].empty(), "probs_list[" + std::to_string(i) + "]: " + errors[i]);
  }
  py::list result;
  for (auto& out : outs) result.append(out);
  return result;
}

crf::LabelCompat make_compat(const std::string& kind, const CArray<float>& weights, int n_labels) {
  if (kind == "potts") {
    require(weights.size() == 1, "Potts compatibility takes one weight");
    return crf::LabelCompat::potts(weights.data()[0]);
  }
  if (kind == "diagonal") {
    check_shape(weights, {n_labels}, "compat");
    return crf::LabelCompat::diagonal(weights.data(), n_labels);
  }
  if (kind == "matrix") {
    check_shape(weights, {n_labels, n_labels}, "compat");
    return crf::LabelCompat::matrix(weights.data(), n_labels);
  }
  throw std::invalid_argument("unknown compatibility kind '" + kind + "'");
}

}  // namespace

PYBIND11_MODULE(CRF_EXT_MODULE, m) {
  m.doc() = "C++ core of crf_ext: permutohedral lattice and mean-field DenseCRF, built for one instruction-set level.";
  m.attr("isa") = CRF_EXT_LEVEL;
  m.attr("openmp") = crf::have_openmp();
  m.def("max_threads", [] { return crf::resolve_threads(0); });
  m.attr("buffer_pool") = crf::kBufferPoolEnabled;
  m.def("cached_bytes", [] { return crf::BufferPool::instance().cached_bytes(); },
        "Bytes of large buffers kept mapped for reuse by later calls.");
  m.def("release_memory", [] { return crf::BufferPool::instance().release_cached(); },
        "Unmaps the buffers kept for reuse; returns their bytes.");
  m.def("mapped_bytes", [] { return crf::BufferPool::instance().mapped_bytes(); },
        "Bytes of all the large buffers ever mapped (a statistic).");

  py::class_<crf::Permutohedral>(m, "Lattice", py::module_local())
      .def(py::init([](const CArray<float>& features, int num_threads) {
             check_features(features);
             return std::make_unique<crf::Permutohedral>(features.data(), static_cast<int>(features.shape(0)),
                                                         static_cast<int>(features.shape(1)), num_threads, true);
           }),
           py::arg("features"), py::arg("num_threads") = 0)
      .def_property_readonly("n_vertices", &crf::Permutohedral::n_vertices)
      .def_property_readonly("n_points", &crf::Permutohedral::n_points)
      .def_property_readonly("dim", &crf::Permutohedral::dim)
      .def_property_readonly("exact_codes", &crf::Permutohedral::exact_codes)
      .def("keys",
           [](const crf::Permutohedral& lattice) {
             py::array_t<int32_t> keys({lattice.n_vertices(), lattice.dim()});
             std::copy(lattice.keys().begin(), lattice.keys().end(), keys.mutable_data());
             return keys;
           })
      .def(
          "filter",
          [](const crf::Permutohedral& lattice, const CArray<float>& values, bool reverse, int num_threads) {
            require(values.ndim() == 2 && values.shape(0) == lattice.n_points() && values.shape(1) >= 1,
                    "values must be (n_points, channels)");
            py::array_t<float> out({values.shape(0), values.shape(1)});
            const float* in = values.data();
            float* o = out.mutable_data();
            const int channels = static_cast<int>(values.shape(1));
            {
              py::gil_scoped_release release;
              lattice.filter(in, channels, o, num_threads, reverse);
            }
            return out;
          },
          py::arg("values"), py::arg("reverse") = false, py::arg("num_threads") = 0);

  py::class_<crf::DenseCrf>(m, "DenseCrf", py::module_local())
      .def(py::init([](int n_points, int n_labels) {
             require(n_points >= 1 && n_labels >= 1, "n_points and n_labels must be >= 1");
             return std::make_unique<crf::DenseCrf>(n_points, n_labels);
           }),
           py::arg("n_points"), py::arg("n_labels"))
      .def_property_readonly("n_points", &crf::DenseCrf::n_points)
      .def_property_readonly("n_labels", &crf::DenseCrf::n_labels)
      .def_property_readonly("has_unary", &crf::DenseCrf::has_unary)
      .def("set_unary",
           [](crf::DenseCrf& self, const CArray<float>& unary) {
             check_shape(unary, {self.n_labels(), self.n_points()}, "unary");
             self.set_unary(unary.data());
           })
      .def(
          "set_unary_from_probs",
          [](crf::DenseCrf& self, const CArray<float>& probs, float clip, int num_threads) {
            check_shape(probs, {self.n_labels(), self.n_points()}, "probs");
            self.set_unary_from_probs(probs.data(), clip, num_threads);
          },
          py::arg("probs"), py::arg("clip") = 1e-5f, py::arg("num_threads") = 0)
      .def(
          "add_pairwise",
          [](crf::DenseCrf& self, const CArray<float>& features, const std::string& compat_kind,
             const CArray<float>& compat, int normalization, int num_threads) {
            check_features(features);
            require(features.shape(0) == self.n_points(), "features must have one row per point");
            require(normalization >= 0 && normalization <= 3, "normalization must be 0..3");
            auto kernel = std::make_unique<crf::PairwiseKernel>(
                features.data(), self.n_points(), static_cast<int>(features.shape(1)),
                make_compat(compat_kind, compat, self.n_labels()), static_cast<crf::Normalization>(normalization),
                num_threads);
            self.add_kernel(std::move(kernel));
          },
          py::arg("features"), py::arg("compat_kind"), py::arg("compat"), py::arg("normalization"),
          py::arg("num_threads") = 0)
      .def(
          "inference",
          [](const crf::DenseCrf& self, int n_iter, int num_threads) {
            require(self.has_unary(), "set a unary before inference");
            require(n_iter >= 0, "n_iter must be >= 0");
            py::array_t<float> q({self.n_points(), self.n_labels()});
            float* out = q.mutable_data();
            {
              py::gil_scoped_release release;
              self.inference(n_iter, out, /*label_major=*/false, num_threads);
            }
            return q;
          },
          py::arg("n_iter"), py::arg("num_threads") = 0)
      .def(
          "step",
          [](const crf::DenseCrf& self, py::array_t<float, py::array::c_style> q, int num_threads) {
            require(self.has_unary(), "set a unary before inference");
            check_shape(q, {self.n_points(), self.n_labels()}, "Q");
            float* data = q.mutable_data();
            py::gil_scoped_release release;
            self.step(data, num_threads);
          },
          py::arg("q"), py::arg("num_threads") = 0)
      .def(
          "kl_divergence",
          [](const crf::DenseCrf& self, const CArray<float>& q, int num_threads) {
            require(self.has_unary(), "set a unary before computing the KL divergence");
            check_shape(q, {self.n_points(), self.n_labels()}, "Q");
            return self.kl_divergence(q.data(), num_threads);
          },
          py::arg("q"), py::arg("num_threads") = 0)
      .def("vertex_counts", [](const crf::DenseCrf& self) {
        std::vector<int> counts;
        for (const auto& kernel : self.kernels()) counts.push_back(kernel->lattice().n_vertices());
        return counts;
      });

  m.def("dense_crf", &dense_crf, py::arg("image"), py::arg("probs"), py::arg("bi_w"), py::arg("bi_xy_std"),
        py::arg("bi_rgb_std"), py::arg("pos_w"), py::arg("pos_xy_std"), py::arg("n_iter"), py::arg("num_threads"));
  m.def("dense_crf_profile", &dense_crf_profile, py::arg("image"), py::arg("probs"), py::arg("bi_w"),
        py::arg("bi_xy_std"), py::arg("bi_rgb_std"), py::arg("pos_w"), py::arg("pos_xy_std"), py::arg("n_iter"),
        py::arg("num_threads"));
  m.def("dense_crf_batch", &dense_crf_batch, py::arg("images"), py::arg("probs_list"), py::arg("bi_w"),
        py::arg("bi_xy_std"), py::arg("bi_rgb_std"), py::arg("pos_w"), py::arg("pos_xy_std"), py::arg("n_iter"),
        py::arg("num_threads"));
}
