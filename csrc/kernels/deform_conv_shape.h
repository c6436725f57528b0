// Sizes and hyper-parameters of one DCNv1 forward, shared by the CPU and CUDA kernels,
// the PyTorch op and the TensorRT plugin. Plain C++ (no PyTorch, no TensorRT).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DMF_SHAPE_INLINE __host__ __device__ inline
#else
#define DMF_SHAPE_INLINE inline
#endif

namespace dmf {

struct DeformConvShape {
  int64_t batch = 0;      // N (offsets and output)
  // Images in the input: sample n reads image n % input_batch, so one image can serve many
  // offset sets (DMF: a prototype for each of its queries) without a copy per sample.
  // 0: as many as samples (image n).
  int64_t input_batch = 0;
  int64_t channels = 0;   // C (input)
  int64_t height = 0;     // H
  int64_t width = 0;      // W
  int64_t out_channels = 0;
  int64_t kernel_h = 1;
  int64_t kernel_w = 1;
  int64_t stride_h = 1;
  int64_t stride_w = 1;
  int64_t pad_h = 0;
  int64_t pad_w = 0;
  int64_t dilation_h = 1;
  int64_t dilation_w = 1;
  int64_t groups = 1;
  int64_t offset_groups = 1;
  int64_t out_h = 0;      // filled by complete_output_size()
  int64_t out_w = 0;

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t channels_per_group() const { return channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  int64_t channels_per_offset_group() const { return channels / offset_groups; }
  int64_t out_positions() const { return out_h * out_w; }
  // offset channels: 2 per tap per offset group, (dy, dx) pairs in row-major tap order
  int64_t offset_channels() const { return 2 * offset_groups * taps(); }
};

// The input image that sample n reads (see input_batch).
DMF_SHAPE_INLINE int64_t image_of(const DeformConvShape& s, int64_t n) {
  return s.input_batch > 0 ? n % s.input_batch : n;
}

// Output size of a convolution along one axis (may be <= 0 for a too-small input).
inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                int64_t dilation) {
  return (in + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

inline void complete_output_size(DeformConvShape& s) {
  s.out_h = conv_output_size(s.height, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h);
  s.out_w = conv_output_size(s.width, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w);
}

// nullptr when the kernels can run `s`; otherwise why not (one line, no sizes: callers
// that own the tensors print those).
inline const char* deform_conv_shape_error(const DeformConvShape& s) {
  if (s.batch < 0 || s.channels < 1 || s.height < 1 || s.width < 1 || s.out_channels < 0)
    return "input needs at least one channel and a non-empty image";
  if (s.input_batch < 0 || (s.input_batch > 0 && s.batch % s.input_batch != 0))
    return "the offsets' batch must be a multiple of the input's";
  if (s.kernel_h < 1 || s.kernel_w < 1) return "kernel size must be positive";
  if (s.stride_h < 1 || s.stride_w < 1) return "stride must be positive";
  if (s.dilation_h < 1 || s.dilation_w < 1) return "dilation must be positive";
  if (s.pad_h < 0 || s.pad_w < 0) return "padding must be non-negative";
  if (s.groups < 1 || s.channels % s.groups != 0 || s.out_channels % s.groups != 0)
    return "groups must divide both the input and the output channels";
  if (s.offset_groups < 1 || s.channels % s.offset_groups != 0)
    return "offset_groups must divide the input channels";
  if (s.out_h < 1 || s.out_w < 1) return "the output would be empty (input smaller than the dilated kernel)";
  // corner indices inside one image plane are 32-bit
  if (s.height * s.width > INT32_MAX) return "height*width must be below 2^31";
  return nullptr;
}

}  // namespace dmf
