// The CPU emulation's entry point: the CUDA kernel's source, its one launch rewritten by
// tests/test_ops.py into an ::emu::launch (deform_conv_cuda_emulated.inc, written beside the
// build), and a C function ctypes calls with the shape as 16 int64 values.
#include "deform_conv_cuda_emulated.inc"

extern "C" int emulated_forward(int dtype, const void* input, const void* offset,
                                const void* weight, void* output, const int64_t* p) {
  dmf::DeformConvShape s;
  s.batch = p[0]; s.channels = p[1]; s.height = p[2]; s.width = p[3]; s.out_channels = p[4];
  s.kernel_h = p[5]; s.kernel_w = p[6]; s.stride_h = p[7]; s.stride_w = p[8]; s.pad_h = p[9];
  s.pad_w = p[10]; s.dilation_h = p[11]; s.dilation_w = p[12]; s.groups = p[13];
  s.offset_groups = p[14]; s.input_batch = p[15];
  if (dtype == 0) return dmf::deform_conv2d_forward_cuda(nullptr, (const float*)input,
      (const float*)offset, (const float*)weight, (float*)output, s);
  if (dtype == 1) return dmf::deform_conv2d_forward_cuda(nullptr, (const double*)input,
      (const double*)offset, (const double*)weight, (double*)output, s);
  return dmf::deform_conv2d_forward_cuda(nullptr, (const __half*)input, (const __half*)offset,
      (const __half*)weight, (__half*)output, s);
}
