// A small persistent thread pool for the kernels: parallel_for over chunked index ranges.
//
// Not OpenMP on purpose: libgomp's idle workers spin-wait after every parallel region (and its wait
// policy can only be set through the process environment, which would also change torch's), and a
// spinning worker starves MindSpore's own runtime threads on a 2-core machine: measured 1.8 s per
// decode step with OpenMP against 0.16 s with passive waiting. Workers here spin for at most a few
// hundred microseconds (back-to-back kernels while decoding) and then sleep on a condition variable.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_PAUSE() _mm_pause()
#else
#define QK_PAUSE() std::this_thread::yield()
#endif

namespace qk {

class Pool {
 public:
  using Fn = void (*)(void *ctx, int64_t begin, int64_t end);

  static Pool &get() {
    static Pool *pool = [] {
      pthread_atfork(nullptr, nullptr, [] { forked_child() = true; });
      return new Pool(thread_count());  // never destroyed: workers may outlive static destructors
    }();
    return *pool;
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs f(begin, end) over [0, n) in chunks of `chunk`, on the caller and the workers; returns when done.
  template <class F>
  void parallel_for(int64_t n, int64_t chunk, F &&f) {
    if (n <= 0) return;
    if (chunk < 1) chunk = 1;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    if (nchunks == 1 || workers_.empty() || forked_child()) {
      f(0, n);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mutex_);  // one parallel_for at a time per process
    using G = typename std::remove_reference<F>::type;
    Job job{&trampoline<G>, const_cast<void *>(static_cast<const void *>(&f)), n, chunk, nchunks};
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      gen = ++gen_counter_;
      job_ = job;
      done_.store(0, std::memory_order_relaxed);
      state_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
      published_.store(gen, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    work(job, gen);
    // Wait for chunks claimed by workers; they are short (tens of microseconds).
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < nchunks) {
      if (++spins < 4096) {
        QK_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  struct Job {
    Fn fn;
    void *ctx;
    int64_t n, chunk, nchunks;
  };

  template <class F>
  static void trampoline(void *ctx, int64_t b, int64_t e) {
    (*static_cast<F *>(ctx))(b, e);
  }

  static bool &forked_child() {
    static bool flag = false;
    return flag;
  }

  static int thread_count() {
    if (const char *env = std::getenv("QWEN2MS_KERNEL_THREADS")) {
      int v = std::atoi(env);
      if (v >= 1) return v;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      int c = CPU_COUNT(&set);
      if (c >= 1) return c;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc ? static_cast<int>(hc) : 1;
  }

  explicit Pool(int nthreads) {
    if (const char *env = std::getenv("QWEN2MS_KERNEL_SPIN_US")) spin_us_ = std::atoi(env) > 0 ? std::atoi(env) : 0;
    for (int i = 1; i < nthreads; ++i) workers_.emplace_back([this] { loop(); });
    for (auto &t : workers_) t.detach();
  }

  // Claims chunks only while the pool still runs generation `gen`: a worker holding an older job can
  // never run a newer job's chunks with stale arguments.
  void work(const Job &job, uint32_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(s >> 32) != gen) return;
      const int64_t idx = static_cast<int64_t>(s & 0xffffffffu);
      if (idx >= job.nchunks) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      const int64_t b = idx * job.chunk;
      const int64_t e = b + job.chunk < job.n ? b + job.chunk : job.n;
      job.fn(job.ctx, b, e);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void loop() {
    uint32_t seen = 0;
    int64_t last_gap_us = 0;  // idle time before the previous job
    for (;;) {
      uint32_t gen = published_.load(std::memory_order_acquire);
      // Spinning catches the next kernel without a futex wake-up (tens of us on a VM). Jobs that came
      // back to back (decoding: one kernel every 20-100 us) get the long spin; after a long gap
      // (prefill and training, where MindSpore's matmuls run between our kernels) a spinning worker
      // would only take a core from MindSpore's threads, so it spins briefly and sleeps.
      const auto idle_since = std::chrono::steady_clock::now();
      const int spin = last_gap_us <= spin_us_ ? spin_us_ : std::min(spin_us_, kShortSpinUs);
      const auto until = idle_since + std::chrono::microseconds(spin);
      for (int i = 1; gen == seen; ++i) {
        QK_PAUSE();
        gen = published_.load(std::memory_order_acquire);
        if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
      }
      Job job;
      {
        std::unique_lock<std::mutex> lk(mutex_);
        if (published_.load(std::memory_order_acquire) == seen) {
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return published_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        }
        gen = published_.load(std::memory_order_acquire);
        job = job_;
      }
      seen = gen;
      last_gap_us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                                          idle_since).count();
      work(job, gen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mutex_, mutex_;
  std::condition_variable cv_;
  Job job_{};
  uint32_t gen_counter_ = 0;
  std::atomic<uint32_t> published_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  static constexpr int kShortSpinUs = 50;
  int spin_us_ = 300;
};

// parallel_for, or a plain call when `worth` is false (too little work to pay for waking a thread).
template <class F>
inline void parallel_for(int64_t n, int64_t chunk, bool worth, F &&f) {
  if (!worth) {
    f(0, n);
    return;
  }
  Pool::get().parallel_for(n, chunk, f);
}

}  // namespace qk
