// DCNv1 forward as one fused implicit-GEMM kernel: a block computes a tile of
// [output channels x output positions], walking the reduction (input channel, tap) one tap
// at a time. Per tap each thread computes the bilinear corners of the position it samples
// once (offsets are shared by every channel of an offset group), then per slice of input
// channels the block fills a shared tile of weights and a shared tile of bilinear samples
// and accumulates their product in registers. No column buffer, no workspace, no cuBLAS.
#include "deform_conv_cuda.h"

#include <cstdint>

#include "deform_sampler.h"

namespace dmf {
namespace {

template <typename scalar_t>
struct Accumulate {
  using type = float;  // float and half
};
template <>
struct Accumulate<double> {
  using type = double;
};

__device__ __forceinline__ void store(float* target, float value) { *target = value; }
__device__ __forceinline__ void store(double* target, double value) { *target = value; }
__device__ __forceinline__ void store(__half* target, float value) {
  *target = __float2half_rn(value);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int kTileChannels = 64;   // output channels per block
constexpr int kTilePositions = 64;  // output positions (over the whole batch) per block
constexpr int kTileDepth = 16;      // input channels per reduction step (of one tap)
constexpr int kThreads = 256;       // 16 x 16 threads, each owning 4 x 4 outputs
constexpr int kThreadChannels = kTileChannels / 16;
constexpr int kThreadPositions = kTilePositions / 16;
// For the sample tile, thread t samples position t % kTilePositions at the depths
// t / kTilePositions + k * kSampleRows; for the weight tile, it loads depth t % kTileDepth.
constexpr int kSampleRows = kThreads / kTilePositions;
static_assert(kThreads % kTilePositions == 0 && kTileDepth % kSampleRows == 0, "sample roles");
static_assert(kThreads % kTileDepth == 0, "weight roles");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    deform_conv2d_implicit_gemm(const scalar_t* __restrict__ input,
                                const scalar_t* __restrict__ offset,
                                const scalar_t* __restrict__ weight, scalar_t* __restrict__ output,
                                const DeformConvShape s, const int64_t channel_tiles) {
  using acc_t = typename Accumulate<scalar_t>::type;
  // Rows padded by 4: still 16-byte aligned for vector loads, and the depth-fastest stores
  // of the weight tile spread over the banks.
  __shared__ __align__(16) acc_t weight_tile[kTileDepth][kTileChannels + 4];
  __shared__ __align__(16) acc_t sample_tile[kTileDepth][kTilePositions];

  const int tid = threadIdx.x;
  const int tx = tid % 16;  // owns positions kThreadPositions*tx + j
  const int ty = tid / 16;  // owns output channels kThreadChannels*ty + i
  const int64_t image_positions = s.out_h * s.out_w;
  const int64_t positions = s.batch * image_positions;
  const int64_t position0 = int64_t(blockIdx.x) * kTilePositions;
  const int64_t group = int64_t(blockIdx.y) / channel_tiles;
  const int64_t channel0 = (int64_t(blockIdx.y) % channel_tiles) * kTileChannels;  // in group
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t group_channels = s.channels / s.groups;
  const int64_t group_out_channels = s.out_channels / s.groups;
  const int64_t offset_group_channels = s.channels / s.offset_groups;
  const int64_t pixels = s.height * s.width;
  const int64_t weight_row = group_channels * taps;  // weight elements per output channel

  // The position this thread samples (the same for every tap and channel).
  const int sample_slot = tid % kTilePositions;
  const int sample_depth = tid / kTilePositions;
  const int64_t sample_position = position0 + sample_slot;
  const bool sample_valid = sample_position < positions;
  int64_t sample_n = 0, sample_oy = 0, sample_ox = 0;
  if (sample_valid) {
    sample_n = sample_position / image_positions;
    const int64_t p = sample_position - sample_n * image_positions;
    sample_oy = p / s.out_w;
    sample_ox = p - sample_oy * s.out_w;
  }
  const scalar_t* const sample_image = input + image_of(s, sample_n) * s.channels * pixels;
  const int weight_depth = tid % kTileDepth;

  acc_t acc[kThreadChannels][kThreadPositions];
#pragma unroll
  for (int i = 0; i < kThreadChannels; ++i)
#pragma unroll
    for (int j = 0; j < kThreadPositions; ++j) acc[i][j] = acc_t(0);

  const int64_t c_first = group * group_channels;
  const int64_t c_last = c_first + group_channels;
  // The group's channels in runs that share one offset group (so one set of offsets).
  for (int64_t c_run = c_first; c_run < c_last;) {
    const int64_t og = c_run / offset_group_channels;
    const int64_t c_run_end = min64(c_last, (og + 1) * offset_group_channels);
    for (int64_t tap = 0; tap < taps; ++tap) {
      // Corners of this thread's sample point for this tap: reused for every channel of the
      // run. (The kSampleRows threads that share a position each compute them.)
      BilinearCorners<acc_t> corners;
      if (sample_valid) {
        const scalar_t* dy = offset + ((sample_n * s.offset_groups + og) * taps + tap) * 2 *
                                          image_positions +
                             sample_oy * s.out_w + sample_ox;  // dx is one channel further
        corners = deform_tap_corners<acc_t>(s, sample_oy, sample_ox, tap / s.kernel_w,
                                            tap % s.kernel_w, acc_t(widen(dy[0])),
                                            acc_t(widen(dy[image_positions])));
      } else {  // past the last position: no corner used (reads pixel 0 of sample 0)
        clear_corners(corners);
      }
      for (int64_t c0 = c_run; c0 < c_run_end; c0 += kTileDepth) {
        __syncthreads();  // the previous tiles are consumed
        {
          const int64_t c = c0 + weight_depth;
#pragma unroll
          for (int m = tid / kTileDepth; m < kTileChannels; m += kThreads / kTileDepth) {
            const int64_t oc = channel0 + m;
            acc_t value = acc_t(0);
            if (c < c_run_end && oc < group_out_channels) {
              value = acc_t(widen(weight[(group * group_out_channels + oc) * weight_row +
                                         (c - c_first) * taps + tap]));
            }
            weight_tile[weight_depth][m] = value;
          }
        }
#pragma unroll
        for (int d = sample_depth; d < kTileDepth; d += kSampleRows) {
          const int64_t c = c0 + d;
          sample_tile[d][sample_slot] =
              c < c_run_end ? bilinear_sample(sample_image + c * pixels, 1, corners) : acc_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int d = 0; d < kTileDepth; ++d) {
          acc_t a[kThreadChannels], b[kThreadPositions];
#pragma unroll
          for (int i = 0; i < kThreadChannels; ++i) a[i] = weight_tile[d][kThreadChannels * ty + i];
#pragma unroll
          for (int j = 0; j < kThreadPositions; ++j) b[j] = sample_tile[d][kThreadPositions * tx + j];
#pragma unroll
          for (int i = 0; i < kThreadChannels; ++i)
#pragma unroll
            for (int j = 0; j < kThreadPositions; ++j) acc[i][j] += a[i] * b[j];
        }
      }
    }
    c_run = c_run_end;
  }

#pragma unroll
  for (int i = 0; i < kThreadChannels; ++i) {
    const int64_t oc = channel0 + kThreadChannels * ty + i;
    if (oc >= group_out_channels) continue;
    const int64_t out_channel = group * group_out_channels + oc;
#pragma unroll
    for (int j = 0; j < kThreadPositions; ++j) {
      const int64_t position = position0 + kThreadPositions * tx + j;
      if (position >= positions) continue;
      const int64_t n = position / image_positions;
      const int64_t p = position - n * image_positions;
      store(output + (n * s.out_channels + out_channel) * image_positions + p, acc[i][j]);
    }
  }
}

template <typename scalar_t>
cudaError_t launch(cudaStream_t stream, const scalar_t* input, const scalar_t* offset,
                   const scalar_t* weight, scalar_t* output, const DeformConvShape& shape) {
  DeformConvShape s = shape;
  complete_output_size(s);
  if (deform_conv_shape_error(s) != nullptr) return cudaErrorInvalidValue;
  if (s.batch == 0 || s.out_channels == 0) return cudaSuccess;
  const int64_t channel_tiles =
      (s.out_channels / s.groups + kTileChannels - 1) / kTileChannels;
  const int64_t position_tiles =
      (s.batch * s.out_h * s.out_w + kTilePositions - 1) / kTilePositions;
  if (s.groups * channel_tiles > 65535 || position_tiles > 2147483647) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(position_tiles),
                  static_cast<unsigned>(s.groups * channel_tiles));
  deform_conv2d_implicit_gemm<scalar_t>
      <<<grid, kThreads, 0, stream>>>(input, offset, weight, output, s, channel_tiles);
  return cudaGetLastError();
}

}  // namespace

cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const float* input,
                                       const float* offset, const float* weight, float* output,
                                       const DeformConvShape& shape) {
  return launch(stream, input, offset, weight, output, shape);
}

cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const __half* input,
                                       const __half* offset, const __half* weight,
                                       __half* output, const DeformConvShape& shape) {
  return launch(stream, input, offset, weight, output, shape);
}

cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const double* input,
                                       const double* offset, const double* weight,
                                       double* output, const DeformConvShape& shape) {
  return launch(stream, input, offset, weight, output, shape);
}

}  // namespace dmf
