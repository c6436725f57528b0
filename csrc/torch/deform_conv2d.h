// The PyTorch side of dmf::deform_conv2d: argument checks shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "../kernels/deform_conv_shape.h"

namespace dmf {

// Checks ranks, dtypes, devices and sizes (with messages that name the op and the
// offending sizes) and returns the sizes the kernels need.
DeformConvShape check_deform_conv2d_args(const at::Tensor& input, const at::Tensor& offset,
                                         const at::Tensor& weight, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                         int64_t groups, int64_t offset_groups);

}  // namespace dmf
