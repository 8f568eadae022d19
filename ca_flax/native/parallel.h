// Runs chunks of work on the calling thread and XLA's intra-op thread pool.
//
// Chunks are claimed from a counter, so the caller never waits on a task that has not
// started (no deadlock when the pool is busy with other work); the state is shared-owned
// because a late pool task may start after the call returned, find nothing left and exit.
// Which thread runs which chunk varies; kernels that must not depend on it give each
// chunk its own output and combine them in chunk order afterwards.

#ifndef CA_FLAX_NATIVE_PARALLEL_H_
#define CA_FLAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ca_flax {

inline void RunChunks(xla::ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> work) {
  if (chunks <= 0) return;
  struct State {
    std::function<void(int64_t)> work;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable all_done;

    void Drain() {
      for (int64_t k = next.fetch_add(1); k < chunks; k = next.fetch_add(1)) {
        work(k);
        if (done.fetch_add(1) + 1 == chunks) {
          std::lock_guard<std::mutex> lock(mu);
          all_done.notify_all();
        }
      }
    }
  };
  auto state = std::make_shared<State>();
  state->work = std::move(work);
  state->chunks = chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state] { state->Drain(); });
  }
  state->Drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done.load() == state->chunks; });
}

// The output rows of `images` images (`rows` each) as chunks of consecutive rows, each
// within one image: `per_image` chunks per image (see RowChunksPerImage), so which rows a
// chunk holds depends only on the shape. Calls fn(chunk, image, first_row, last_row).
inline void RunRowChunks(xla::ffi::ThreadPool& pool, int64_t images, int64_t rows, int64_t per_image,
                         std::function<void(int64_t, int64_t, int64_t, int64_t)> fn) {
  RunChunks(pool, images * per_image, [&](int64_t k) {
    const int64_t image = k / per_image, part = k % per_image;
    fn(k, image, rows * part / per_image, rows * (part + 1) / per_image);
  });
}

// Chunks per image for RunRowChunks: at least kMinRowChunks in all, so every thread of a
// small pool has work even for one image, and at most one per row.
constexpr int64_t kMinRowChunks = 8;
inline int64_t RowChunksPerImage(int64_t images, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, (kMinRowChunks + images - 1) / images));
}

}  // namespace ca_flax

#endif  // CA_FLAX_NATIVE_PARALLEL_H_
