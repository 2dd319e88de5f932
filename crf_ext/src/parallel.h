// Thread-count helpers; everything also builds without OpenMP (one thread).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace crf {

// Threads to use for a request: <= 0 means "all that OpenMP would use".
inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Inside a parallel region: this thread's index and the team size (0 and 1 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace crf
