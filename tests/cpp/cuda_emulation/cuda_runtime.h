// cuda_runtime.h for the CPU emulation of the CUDA kernel (tests/test_ops.py): each block
// is kThreads std::threads meeting at a std::barrier for __syncthreads(), __shared__ arrays
// are shared by the block's threads. It checks the tiling, the indexing and the
// synchronisation of the real kernel (not the hardware) where no GPU is available.
#pragma once
#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct __half { _Float16 v; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
namespace emu {
inline thread_local dim3 thread_index, block_index;
inline std::barrier<>* block_barrier = nullptr;
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] { thread_index = dim3(t); block_index = dim3(x, y, z); body(); });
        for (auto& thread : pool) thread.join();
      }
}
}  // namespace emu
#define threadIdx ::emu::thread_index
#define blockIdx ::emu::block_index
#define __syncthreads() ::emu::block_barrier->arrive_and_wait()
#define __shared__ static
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
