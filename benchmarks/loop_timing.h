/* Timing helpers of the loop microbenchmarks (sparse24_panel_loop.cpp, unstructured_loop.cpp):
 * best-of-passes seconds a call, and the core clock measured with a chain of dependent adds
 * (so that cycles do not depend on the time-stamp counter's rate). */
#ifndef PQ_BENCH_LOOP_TIMING_H
#define PQ_BENCH_LOOP_TIMING_H
#include <chrono>

namespace loop_timing {

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/* Best seconds a call of f over `passes` passes of `reps` calls. The memory clobber before
 * each call makes the compiler assume the inputs changed, so that it cannot compute a call
 * once and reuse it (the kernels are inline and have no other side effect). */
template <class F>
double best_seconds(F f, int reps, int passes) {
  double best = 1e30;
  for (int r = 0; r < passes; ++r) {
    const double t0 = now();
    for (int i = 0; i < reps; ++i) {
      __asm__ volatile("" ::: "memory");
      f();
    }
    const double t = now() - t0;
    if (t < best) best = t;
  }
  return best / reps;
}

/* Core cycles a second: a chain of dependent 64-bit adds, one a cycle (ten an iteration, so
 * that the loop's own branch does not set the pace). Register adds, not immediate ones: Intel
 * cores from Golden Cove on fold chains of small immediate adds at rename, and that chain ran
 * six adds a cycle on a Granite Rapids (a "clock" of 18.9 GHz). */
inline double core_hz(int passes) {
  const long n = 2000000;
  volatile long sink = 0;
  const double t = best_seconds([&] {
    long a = sink, one = 1;
    for (long i = 0; i < n; ++i)
      __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
                       "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
                       : "+r"(a) : "r"(one));
    sink = a;
  }, 1, passes);
  return 10.0 * n / t;
}

}  // namespace loop_timing
#endif /* PQ_BENCH_LOOP_TIMING_H */
