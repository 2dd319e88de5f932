// Which instruction-set levels of the core this CPU (and OS) can run. Built for the compiler's
// default target, so that it loads on any CPU before a level's module is chosen.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace {

bool supports(const std::string& level) {
  if (level == "generic" || level == "native") return true;  // native: built for this machine on request
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // The x86-64 micro-architecture levels, with the OS's support of the wider registers.
  if (level == "sse4.2") return __builtin_cpu_supports("x86-64-v2");
  if (level == "avx2") return __builtin_cpu_supports("x86-64-v3");
  if (level == "avx512") return __builtin_cpu_supports("x86-64-v4");
#else
  if (level == "sse4.2" || level == "avx2" || level == "avx512") return false;
#endif
  throw std::invalid_argument("unknown instruction-set level '" + level + "'");
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "CPU feature detection for crf_ext's per-level modules.";
  m.def("supports", &supports, pybind11::arg("level"), "Whether this CPU runs the core built for `level`.");
}
