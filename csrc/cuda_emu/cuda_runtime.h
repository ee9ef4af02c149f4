// CPU emulator of the CUDA runtime subset that csrc/cuda uses, for the tests (tests/_cuda_emu.py): the .cu
// files are compiled by the host compiler with this directory first on the include path, every kernel
// launch is rewritten to ltcl_emu::launch, and every thread of a block runs as a fiber on one OS thread.
// A fiber runs until it reaches __syncthreads() or a warp collective (__shfl_xor_sync, __any_sync,
// __ballot_sync), which completes only when all 256 threads of the block (all 32 lanes of the warp) have
// reached it: the barrier and warp-synchronous semantics of the hardware, with a deadlock (a barrier that
// not every thread reaches) reported as a launch error. LTCL_CUDA_EMU_ORDER=reverse resumes the threads in
// the opposite order, so a read of shared memory that lacks its barrier sees other values.
// Blocks run one after another, so __shared__ is a function-local static (one copy, reused by each block).
// Not emulated: the memory model across blocks (no kernel here communicates between blocks), partial warp
// masks (every collective here uses the full mask; another mask is a launch error), timing, and shared
// memory's uninitialised contents.
#pragma once

#include <math.h>
#include <stdint.h>

#include <cstddef>
#include <cstring>
#include <functional>
#include <type_traits>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef void* cudaStream_t;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace ltcl_emu {

// Runs body() once per thread of every block of the grid (threads of one block interleaved as fibers).
// A failure (deadlock, bad configuration) is kept for cudaGetLastError().
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
// Every lane of the calling warp deposits `mine`; returns the warp's 32 values once all have (valid until
// the caller's next collective).
const uint64_t* warp_exchange(unsigned mask, uint64_t mine);
cudaError_t take_last_error();
cudaError_t peek_last_error();

}  // namespace ltcl_emu

#define threadIdx (::ltcl_emu::thread_idx())
#define blockIdx (::ltcl_emu::block_idx())
#define blockDim (::ltcl_emu::block_dim())
#define gridDim (::ltcl_emu::grid_dim())

inline void __syncthreads() { ::ltcl_emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "8-byte scalars only");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const uint64_t* all = ::ltcl_emu::warp_exchange(mask, bits);
  const unsigned lane = threadIdx.x & 31u;
  const unsigned src = (lane ^ static_cast<unsigned>(lane_mask)) & static_cast<unsigned>(width - 1);
  const unsigned from = (lane & ~static_cast<unsigned>(width - 1)) | src;
  T out;
  std::memcpy(&out, &all[from], sizeof(T));
  return out;
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* all = ::ltcl_emu::warp_exchange(mask, pred != 0 ? 1u : 0u);
  unsigned b = 0;
  for (unsigned l = 0; l < 32; ++l) b |= all[l] != 0 ? (1u << l) : 0u;
  return b & mask;
}

inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0u; }

inline int __popc(unsigned v) { return __builtin_popcount(v); }

// One fiber runs at a time and none is preempted: a read-modify-write is atomic as written.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() { return ::ltcl_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::ltcl_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (CUDA emulator)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (CUDA emulator: a barrier or warp collective "
                                        "that not every thread reached)";
  }
  return "unknown error";
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t) {
  if (bytes != 0) std::memset(p, v, bytes);
  return cudaSuccess;
}
