// The CPU emulator's scheduler (see cuda_runtime.h): the threads of one block are fibers (ucontext) on
// the calling OS thread; the blocks of a grid run one after another.
#include <ucontext.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda_runtime.h"

namespace ltcl_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 tid;
  bool done = false;
  Wait wait = Wait::kNone;
  size_t gen = 0;       // the barrier / collective this fiber waits at
  size_t block_gen = 0; // barriers passed (its next __syncthreads is number block_gen)
  size_t warp_gen = 0;  // collectives passed
};

struct Warp {
  std::vector<int> arrived;     // per collective: lanes that reached it
  uint64_t slots[2][32];        // values of collective g in slots[g & 1]
};

struct Runtime {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  std::vector<int> block_arrived;  // per barrier: threads that reached it
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  Fiber* cur = nullptr;
  uint3 bid{0, 0, 0};
  dim3 bdim, gdim;
  unsigned nthreads = 0;
  cudaError_t error = cudaSuccess;
  bool abort_block = false;
};

thread_local Runtime rt;

void fiber_main() {
  Runtime& r = rt;
  (*r.body)();
  r.cur->done = true;
  swapcontext(&r.cur->ctx, &r.sched);  // never resumed
}

void yield_to_scheduler() { swapcontext(&rt.cur->ctx, &rt.sched); }

bool ready(const Fiber& f) {
  const Runtime& r = rt;
  switch (f.wait) {
    case Wait::kNone: return true;
    case Wait::kBlock: return r.block_arrived[f.gen] == static_cast<int>(r.nthreads);
    case Wait::kWarp: return r.warps[(f.tid.x) / 32].arrived[f.gen] == 32;
  }
  return false;
}

int& counter(std::vector<int>& v, size_t g) {
  if (v.size() <= g) v.resize(g + 1, 0);
  return v[g];
}

// One block: resume every runnable fiber in turn until all have returned; a round in which none can run
// while some have not returned is a deadlock.
bool run_block(bool reverse) {
  Runtime& r = rt;
  r.block_arrived.clear();
  for (auto& w : r.warps) w.arrived.clear();
  for (unsigned t = 0; t < r.nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = uint3{t, 0, 0};
    f.done = false;
    f.wait = Wait::kNone;
    f.gen = f.block_gen = f.warp_gen = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  unsigned left = r.nthreads;
  while (left > 0) {
    bool progress = false;
    for (unsigned k = 0; k < r.nthreads; ++k) {
      Fiber& f = r.fibers[reverse ? r.nthreads - 1 - k : k];
      if (f.done || !ready(f)) continue;
      f.wait = Wait::kNone;
      r.cur = &f;
      swapcontext(&r.sched, &f.ctx);
      r.cur = nullptr;
      progress = true;
      if (f.done) --left;
    }
    if (!progress) return false;
  }
  return true;
}

}  // namespace

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  Runtime& r = rt;
  const unsigned n = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n == 0 || n > 1024 || n % 32 != 0 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    // 1-D blocks of whole warps only: every launch in csrc/cuda has them
    r.error = cudaErrorInvalidConfiguration;
    return;
  }
  if (r.fibers.size() < n) {
    r.fibers.resize(n);
    for (auto& f : r.fibers)
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
  }
  r.warps.resize(n / 32);
  r.body = &body;
  r.bdim = block;
  r.gdim = grid;
  r.nthreads = n;
  const char* order = std::getenv("LTCL_CUDA_EMU_ORDER");
  const bool reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.bid = uint3{x, y, z};
        if (!run_block(reverse)) {
          r.error = cudaErrorLaunchFailure;
          r.body = nullptr;
          return;
        }
      }
  r.body = nullptr;
}

const uint3& thread_idx() { return rt.cur->tid; }
const uint3& block_idx() { return rt.bid; }
const dim3& block_dim() { return rt.bdim; }
const dim3& grid_dim() { return rt.gdim; }

void syncthreads() {
  Runtime& r = rt;
  Fiber& f = *r.cur;
  f.gen = f.block_gen++;
  ++counter(r.block_arrived, f.gen);
  f.wait = Wait::kBlock;
  yield_to_scheduler();
}

const uint64_t* warp_exchange(unsigned mask, uint64_t mine) {
  Runtime& r = rt;
  Fiber& f = *r.cur;
  Warp& w = r.warps[f.tid.x / 32];
  if (mask != 0xffffffffu) r.error = cudaErrorLaunchFailure;  // partial masks are not emulated: fail the launch
  f.gen = f.warp_gen++;
  w.slots[f.gen & 1][f.tid.x & 31] = mine;
  ++counter(w.arrived, f.gen);
  f.wait = Wait::kWarp;
  yield_to_scheduler();
  return w.slots[f.gen & 1];
}

cudaError_t take_last_error() {
  const cudaError_t e = rt.error;
  rt.error = cudaSuccess;
  return e;
}

cudaError_t peek_last_error() { return rt.error; }

}  // namespace ltcl_emu
