// Work sharing for the native kernels (joseph.cc, conv3d.cc). `schedule(task)` runs task on
// another thread (or inline); the caller takes items too and then waits only for items
// already taken, so it never waits for a thread that has not started (no deadlock when the
// pool is busy or absent).
#ifndef XCT_NATIVE_PARALLEL_H
#define XCT_NATIVE_PARALLEL_H

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace xct_native {

using Scheduler = std::function<void(std::function<void()>)>;

inline void parallel_for(int64_t num_items, int num_threads, const Scheduler& schedule,
                         const std::function<void(int64_t)>& fn) {
  if (num_items <= 0) return;
  num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items)));
  if (num_threads == 1) {
    for (int64_t i = 0; i < num_items; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = num_items;
  state->fn = &fn;
  auto work = [state]() {
    for (;;) {
      const int64_t i = state->next.fetch_add(1);
      if (i >= state->n) return;
      (*state->fn)(i);  // fn outlives every taken item: the caller waits for them
      if (state->done.fetch_add(1) + 1 == state->n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int t = 1; t < num_threads; ++t) schedule(work);
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
}

}  // namespace xct_native
#endif  // XCT_NATIVE_PARALLEL_H

// Included again after xla/ffi/api/ffi.h with XCT_NATIVE_FFI_POOL defined: the pool.
#if defined(XCT_NATIVE_FFI_POOL) && !defined(XCT_NATIVE_POOL_H)
#define XCT_NATIVE_POOL_H
// XLA's intra-op pool when it has more than one thread, else plain std::threads.
namespace xct_native {
struct Pool {
  int num_threads;
  Scheduler schedule;
};

inline Pool make_pool(xla::ffi::ThreadPool& pool) {
  const int64_t n = pool.num_threads();
  if (n > 1) {
    return {static_cast<int>(n), [&pool](std::function<void()> task) {
              pool.Schedule([task = std::move(task)]() { task(); });
            }};
  }
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return {hw, [](std::function<void()> task) { std::thread(std::move(task)).detach(); }};
}
}  // namespace xct_native
#endif
