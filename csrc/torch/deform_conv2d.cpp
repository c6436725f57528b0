// dmf::deform_conv2d: the schema (defined once, here) and the checks every backend runs.
#include "deform_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace dmf {

DeformConvShape check_deform_conv2d_args(const at::Tensor& input, const at::Tensor& offset,
                                         const at::Tensor& weight, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                         int64_t groups, int64_t offset_groups) {
  TORCH_CHECK(input.dim() == 4, "dmf::deform_conv2d: input must be [N, C, H, W], got ",
              input.sizes());
  TORCH_CHECK(offset.dim() == 4,
              "dmf::deform_conv2d: offset must be [N, 2*offset_groups*kh*kw, out_h, out_w], got ",
              offset.sizes());
  TORCH_CHECK(weight.dim() == 4, "dmf::deform_conv2d: weight must be [O, C/groups, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dmf::deform_conv2d: stride, padding and dilation must have two values each");
  TORCH_CHECK(input.scalar_type() == offset.scalar_type() &&
                  input.scalar_type() == weight.scalar_type(),
              "dmf::deform_conv2d: input, offset and weight must have one dtype, got ",
              input.scalar_type(), ", ", offset.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(input.device() == offset.device() && input.device() == weight.device(),
              "dmf::deform_conv2d: input, offset and weight must be on one device, got ",
              input.device(), ", ", offset.device(), ", ", weight.device());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "dmf::deform_conv2d: stride must be positive, got ",
              stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1,
              "dmf::deform_conv2d: dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0,
              "dmf::deform_conv2d: padding must be non-negative, got ", padding);

  // The input may hold fewer images than there are offset sets: sample n reads image
  // n % N_in (DMF: each prototype serves its queries without a copy per pair).
  TORCH_CHECK(offset.size(0) == input.size(0) ||
                  (input.size(0) > 0 && offset.size(0) % input.size(0) == 0),
              "dmf::deform_conv2d: the offset batch (", offset.size(0),
              ") must equal the input batch (", input.size(0), ") or be a multiple of it");
  DeformConvShape s;
  s.batch = offset.size(0);
  s.input_batch = input.size(0);
  s.channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.groups = groups;
  s.offset_groups = offset_groups;
  complete_output_size(s);

  TORCH_CHECK(s.channels >= 1 && s.height >= 1 && s.width >= 1,
              "dmf::deform_conv2d: input must have channels and a non-empty image, got ",
              input.sizes());
  TORCH_CHECK(s.kernel_h >= 1 && s.kernel_w >= 1,
              "dmf::deform_conv2d: weight must have a non-empty kernel, got ", weight.sizes());
  TORCH_CHECK(groups >= 1 && s.channels % groups == 0 && s.out_channels % groups == 0,
              "dmf::deform_conv2d: groups=", groups, " must divide the input channels (",
              s.channels, ") and the output channels (", s.out_channels, ")");
  TORCH_CHECK(weight.size(1) * groups == s.channels, "dmf::deform_conv2d: weight ",
              weight.sizes(), " needs C/groups = ", s.channels, "/", groups,
              " input channels per group, got ", weight.size(1));
  TORCH_CHECK(offset_groups >= 1 && s.channels % offset_groups == 0,
              "dmf::deform_conv2d: offset_groups=", offset_groups,
              " must divide the input channels (", s.channels, ")");
  TORCH_CHECK(s.out_h >= 1 && s.out_w >= 1, "dmf::deform_conv2d: input ", input.sizes(),
              " is smaller than the dilated kernel ", weight.sizes(), " with padding ", padding,
              " and dilation ", dilation);
  TORCH_CHECK(offset.size(1) == s.offset_channels() && offset.size(2) == s.out_h &&
                  offset.size(3) == s.out_w,
              "dmf::deform_conv2d: offset must have shape [N, 2*offset_groups*kh*kw, out_h, out_w] = [",
              s.batch, ", ", s.offset_channels(), ", ", s.out_h, ", ", s.out_w, "], got ",
              offset.sizes());
  const char* error = deform_conv_shape_error(s);
  TORCH_CHECK(error == nullptr, "dmf::deform_conv2d: ", error ? error : "");
  return s;
}

TORCH_LIBRARY(dmf, m) {
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int offset_groups) -> Tensor");
}

}  // namespace dmf
