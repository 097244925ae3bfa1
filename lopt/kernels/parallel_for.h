// ParallelFor: the thread loop of lopt's CPU kernels (mlp_update_cpu.cc, adafac_update_cpu.cc),
// over XLA's intra-op thread pool (the FFI's ThreadPool context).
#ifndef LOPT_KERNELS_PARALLEL_FOR_H_
#define LOPT_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace lopt_kernels {

namespace ffi = xla::ffi;

// Runs fn(lo, hi) over [0, total) in chunks claimed from a shared counter by the calling thread
// and by helpers scheduled on XLA's intra-op pool. The caller never waits for a helper that has
// not started: the caller itself may be a pool thread (XLA:CPU runs several devices' programs
// on that pool), so waiting for queued tasks could wait for itself. It waits only for helpers
// still inside a chunk they claimed; a helper that starts after every chunk is claimed returns
// at once, touching only the shared state it co-owns.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t min_chunk, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(min_chunk, (total + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (total + chunk - 1) / chunk;
  if (threads <= 1 || chunks <= 1) { fn(0, total); return; }
  auto state = std::make_shared<ParallelState>();
  std::function<void(int64_t)> body = [&](int64_t c) {
    fn(c * chunk, std::min(total, (c + 1) * chunk));
  };
  auto* body_ptr = &body;  // valid while the caller waits; used only for a claimed chunk
  auto drain = [state, body_ptr, chunks] {
    state->active.fetch_add(1);
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) (*body_ptr)(c);
    if (state->active.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(drain)(drain));
  for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) body(c);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->active.load() == 0; });
}

}  // namespace lopt_kernels

#endif  // LOPT_KERNELS_PARALLEL_FOR_H_
