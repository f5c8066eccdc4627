// A tiny CUDA execution model on the CPU, enough to run pyqkv's attention kernels unchanged: one CTA
// at a time, its threads as cooperative coroutines (ucontext) that switch only at barriers. Barriers
// (__syncthreads, __syncwarp), warp shuffles and votes are exact; a barrier that not every thread
// reaches is reported as a deadlock. Threads run in a configurable order between barriers (forward,
// reverse, shuffled), so a missing barrier shows up as a read of data not yet written: shared memory
// starts as NaN bytes. What this cannot show: timing-dependent races inside one barrier interval on
// real hardware, memory-model effects, alignment faults, performance.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
// Global, not thread_local: the scheduler sets threadIdx before it switches to a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
enum class Order { kForward, kReverse, kShuffled };

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::kReady;
};

struct Cta {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  double exchange[32][32];  // per warp, per lane: shuffle / vote buffer
};

// The first failure seen inside a kernel thread (exceptions cannot cross the coroutine boundary);
// run_cta raises it from the scheduler.
inline std::string& failure() {
  static std::string f;
  return f;
}
inline void fail(const std::string& msg) {
  if (failure().empty()) failure() = msg;
}

inline Cta*& cta() {
  static Cta* c = nullptr;
  return c;
}

inline void yield(State s) {
  Cta* c = cta();
  Thread& t = c->threads[c->current];
  t.state = s;
  swapcontext(&t.ctx, &c->scheduler);
}

inline void sync_block() { yield(State::kAtBlockBarrier); }
inline void sync_warp() { yield(State::kAtWarpBarrier); }

template <typename T>
T shfl_xor(T v, int offset) {
  Cta* c = cta();
  const int w = c->current / 32, lane = c->current % 32;
  sync_warp();  // everyone has read the previous exchange
  c->exchange[w][lane] = static_cast<double>(v);
  sync_warp();
  return static_cast<T>(c->exchange[w][lane ^ offset]);
}

inline bool any(bool pred) {
  Cta* c = cta();
  const int w = c->current / 32, lane = c->current % 32;
  sync_warp();
  c->exchange[w][lane] = pred ? 1.0 : 0.0;
  sync_warp();
  bool r = false;
  for (int l = 0; l < 32; ++l) r = r || c->exchange[w][l] != 0.0;
  return r;
}

inline void trampoline() {
  Cta* c = cta();
  c->body();
  c->threads[c->current].state = State::kDone;
  // returning resumes uc_link, the scheduler
}

// Runs body on n_threads threads (a multiple of 32) of one CTA until all return.
inline void run_cta(const std::function<void()>& body, int n_threads, Order order, uint64_t seed) {
  if (n_threads % 32 != 0) throw std::runtime_error("emu: CTA size must be a multiple of 32");
  Cta c;
  c.body = body;
  c.threads.resize(n_threads);
  std::memset(c.exchange, 0, sizeof(c.exchange));
  cta() = &c;
  blockDim.x = n_threads;
  blockDim.y = blockDim.z = 1;
  for (auto& t : c.threads) {
    t.stack.resize(256 * 1024);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &c.scheduler;
    makecontext(&t.ctx, trampoline, 0);
  }
  std::vector<int> ids(n_threads);
  for (int i = 0; i < n_threads; ++i) ids[i] = i;
  if (order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  std::mt19937_64 rng(seed);
  const int n_warps = n_threads / 32;
  for (;;) {
    if (order == Order::kShuffled) std::shuffle(ids.begin(), ids.end(), rng);
    for (int i : ids) {
      if (c.threads[i].state != State::kReady) continue;
      c.current = i;
      threadIdx.x = i;
      threadIdx.y = threadIdx.z = 0;
      swapcontext(&c.scheduler, &c.threads[i].ctx);
    }
    int done = 0, at_block = 0;
    for (auto& t : c.threads) {
      done += t.state == State::kDone;
      at_block += t.state == State::kAtBlockBarrier;
    }
    if (done == n_threads) break;
    bool released = false;
    if (at_block == n_threads) {
      for (auto& t : c.threads) t.state = State::kReady;
      released = true;
    } else {
      for (int w = 0; w < n_warps; ++w) {
        bool all = true;
        for (int l = 0; l < 32; ++l) all = all && c.threads[w * 32 + l].state == State::kAtWarpBarrier;
        if (all) {
          for (int l = 0; l < 32; ++l) c.threads[w * 32 + l].state = State::kReady;
          released = true;
        }
      }
    }
    if (!released) {
      cta() = nullptr;
      throw std::runtime_error("emu: deadlock: " + std::to_string(done) + " threads returned, " +
                               std::to_string(at_block) +
                               " wait at __syncthreads, the rest at __syncwarp/shuffles (divergent barrier)");
    }
  }
  cta() = nullptr;
  if (!failure().empty()) {
    const std::string f = failure();
    failure().clear();
    throw std::runtime_error("emu: " + f);
  }
}

}  // namespace emu
