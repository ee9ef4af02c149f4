// Kernels that test the CPU emulator itself (tests/test_cuda_emu.py), compiled only into the emulator's
// extension (through the same launch rewriting as csrc/cuda) as ltcl_fused_cuda_emu::_emu_selftest(which):
//   0: a __syncthreads() that half the block skips (a deadlock: the launch must fail);
//   1: a block sum by warp shuffles and shared memory (each warp's lane 0 writes sum(0..255) into out[warp]);
//   2: out[t] = the value thread t + 1 wrote to shared memory, read WITHOUT a barrier (a race);
//   3: the same with the barrier (race-free: the same result in any thread order).
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace ltcl_emu_selftest {
namespace {

__global__ void divergent_barrier(double* out) {
  if (threadIdx.x < 128) __syncthreads();
  out[threadIdx.x] = 1.0;
}

__global__ void block_sum(double* out) {
  __shared__ double warp_sums[8];
  double v = static_cast<double>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    double s = 0.0;
    for (int w = 0; w < 8; ++w) s += warp_sums[w];
    out[threadIdx.x >> 5] = s;
  }
}

__global__ void neighbour_read(double* out, bool barrier) {
  __shared__ double slot[256];
  const unsigned t = threadIdx.x;
  slot[t] = static_cast<double>(t + 1);
  if (barrier) __syncthreads();
  out[t] = slot[(t + 1) % 256];
  __syncthreads();
  slot[t] = 0.0;  // the next launch starts from zeros
}

at::Tensor emu_selftest(int64_t which) {
  at::Tensor out = at::zeros({which == 1 ? 8 : 256}, at::kDouble);
  double* o = out.data_ptr<double>();
  if (which == 0) {
    divergent_barrier<<<1, 256, 0, nullptr>>>(o);
  } else if (which == 1) {
    block_sum<<<1, 256, 0, nullptr>>>(o);
  } else {
    neighbour_read<<<1, 256, 0, nullptr>>>(o, which == 3);
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "_emu_selftest: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace ltcl_emu_selftest

TORCH_LIBRARY_FRAGMENT(ltcl_fused_cuda_emu, m) { m.def("_emu_selftest", &ltcl_emu_selftest::emu_selftest); }
