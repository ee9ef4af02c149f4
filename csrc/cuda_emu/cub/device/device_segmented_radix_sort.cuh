// The CPU emulator's stand-in (see ../../cuda_runtime.h) for the one CUB entry csrc/cuda/ssl_cuda.cu uses:
// DispatchSegmentedRadixSort over keys only, ascending, with is_overwrite_okay false (the sorted keys land
// in the second buffer). The tuning policies are accepted and ignored; the sort is std::sort per segment
// (radix order of the unsigned keys = numeric order).
#pragma once

#include <algorithm>
#include <cstddef>

#include "../../cuda_runtime.h"

namespace cub {

struct NullType {};
enum class SortOrder { Ascending, Descending };
enum BlockLoadAlgorithm { BLOCK_LOAD_TRANSPOSE };
enum CacheLoadModifier { LOAD_DEFAULT };
enum RadixRankAlgorithm { RADIX_RANK_MEMOIZE };
enum BlockScanAlgorithm { BLOCK_SCAN_WARP_SCANS };

template <int kPtx, typename Self, typename Prev>
struct ChainedPolicy {};

template <int kThreadsPerBlock, int kItemsPerThread, typename Key, BlockLoadAlgorithm, CacheLoadModifier,
          RadixRankAlgorithm, BlockScanAlgorithm, int kRadixBits>
struct AgentRadixSortDownsweepPolicy {};

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2] = {nullptr, nullptr};
  int selector = 0;
  DoubleBuffer() = default;
  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate} {}
  T* Current() { return d_buffers[selector]; }
  T* Alternate() { return d_buffers[selector ^ 1]; }
};

template <SortOrder kOrder, typename Key, typename Value, typename BeginOffsets, typename EndOffsets,
          typename OffsetT, typename Policy>
struct DispatchSegmentedRadixSort {
  static_assert(kOrder == SortOrder::Ascending, "the emulator sorts ascending only");
  static cudaError_t Dispatch(void* tmp, size_t& bytes, DoubleBuffer<Key>& keys, DoubleBuffer<Value>&, OffsetT,
                              OffsetT num_segments, BeginOffsets begin, EndOffsets end, int begin_bit, int end_bit,
                              bool is_overwrite_okay, cudaStream_t) {
    if (tmp == nullptr) {
      bytes = 1;
      return cudaSuccess;
    }
    if (begin_bit != 0 || end_bit != static_cast<int>(8 * sizeof(Key)) || is_overwrite_okay)
      return cudaErrorInvalidValue;
    const Key* in = keys.Current();
    Key* out = keys.Alternate();
    for (OffsetT s = 0; s < num_segments; ++s) {
      std::copy(in + begin[s], in + end[s], out + begin[s]);
      std::sort(out + begin[s], out + end[s]);
    }
    keys.selector ^= 1;
    return cudaSuccess;
  }
};

}  // namespace cub
