// dmf::deform_conv2d on CUDA: checks, then the self-contained launcher of csrc/kernels on
// PyTorch's current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream getter is the one at::cuda::getCurrentCUDAStream() forwards to;
// ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE headers the op does not need.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/deform_conv_cuda.h"
#include "deform_conv2d.h"

namespace dmf {
namespace {

template <typename scalar_t, typename kernel_t>
void run(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
         at::Tensor& output, const DeformConvShape& s) {
  const cudaError_t status = deform_conv2d_forward_cuda(
      c10::cuda::getCurrentCUDAStream().stream(),
      reinterpret_cast<const kernel_t*>(input.const_data_ptr<scalar_t>()),
      reinterpret_cast<const kernel_t*>(offset.const_data_ptr<scalar_t>()),
      reinterpret_cast<const kernel_t*>(weight.const_data_ptr<scalar_t>()),
      reinterpret_cast<kernel_t*>(output.mutable_data_ptr<scalar_t>()), s);
  TORCH_CHECK(status == cudaSuccess, "dmf::deform_conv2d: CUDA launch failed: ",
              cudaGetErrorString(status));
}

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& weight, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                              int64_t offset_groups) {
  const DeformConvShape s = check_deform_conv2d_args(input, offset, weight, stride, padding,
                                                     dilation, groups, offset_groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;
  const at::Tensor images = input.contiguous();
  const at::Tensor offsets = offset.contiguous();
  const at::Tensor weights = weight.contiguous();
  switch (input.scalar_type()) {
    case at::kFloat:
      run<float, float>(images, offsets, weights, output, s);
      break;
    case at::kHalf:
      run<at::Half, __half>(images, offsets, weights, output, s);
      break;
    case at::kDouble:
      run<double, double>(images, offsets, weights, output, s);
      break;
    default:
      TORCH_CHECK(false, "dmf::deform_conv2d on CUDA supports float32, float16 and float64, got ",
                  input.scalar_type());
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmf, CUDA, m) { m.impl("deform_conv2d", &deform_conv2d_cuda); }

}  // namespace dmf
