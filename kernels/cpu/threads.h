// fastlm_native::in_threads(threads, work): work(t) for t in [0, threads), on OpenMP's thread pool.
//
// Why OpenMP and not std::thread: torch's CPU ops run on libgomp's pool, whose workers spin for a while after
// each parallel region before they sleep. A kernel of ours that started its own threads right after a torch op
// (the loss kernel follows the logits GEMM) shared the cores with those spinning workers and took about twice
// as long (16.4 against 8.5 ms for 700 rows; bench/README.md, "The native kernels and torch's thread pool").
// Linked against libgomp.so.1, this module binds to the copy torch has already loaded (one soname, one
// runtime), so the work runs on the very workers that were spinning.
#pragma once

#include <omp.h>

namespace fastlm_native {

template <typename Work>
void in_threads(int threads, const Work& work) {
  if (threads <= 1) {
    work(0);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    // A smaller team than asked (OMP_THREAD_LIMIT) still does every share, in the same split.
    for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) work(t);
  }
}

}  // namespace fastlm_native
