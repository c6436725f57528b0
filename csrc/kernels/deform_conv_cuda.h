// DCNv1 forward on CUDA: one self-contained launcher (no PyTorch, no TensorRT, no cuBLAS,
// no workspace), used by the PyTorch op and by the TensorRT plugin.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "deform_conv_shape.h"

namespace dmf {

// output[N, O, out_h, out_w] = deformable convolution of input[N_in, C, H, W] with
// offset[N, 2*offset_groups*kh*kw, out_h, out_w] and weight[O, C/groups, kh, kw] (sample n
// reads input image n % N_in, N_in = shape.input_batch, or n when that is 0), all
// contiguous (NCHW), all of one type; accumulation in float (double for double).
// `shape.out_h/out_w` must be filled (complete_output_size). Enqueues on `stream` and
// returns the launch status (cudaErrorInvalidValue when deform_conv_shape_error(shape)).
cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const float* input,
                                       const float* offset, const float* weight, float* output,
                                       const DeformConvShape& shape);
cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const __half* input,
                                       const __half* offset, const __half* weight,
                                       __half* output, const DeformConvShape& shape);
cudaError_t deform_conv2d_forward_cuda(cudaStream_t stream, const double* input,
                                       const double* offset, const double* weight,
                                       double* output, const DeformConvShape& shape);

}  // namespace dmf
