// The one DCNv1 bilinear sampler, shared by the CPU and CUDA kernels (and through them
// the TensorRT plugin). Semantics: docs/op.md, "Semantics: DCNv1, no bias, no
// mask" (as in maskrcnn-benchmark); equal to ONNX DeformConv (opset 19) without mask.
#pragma once

#include <cmath>
#include <cstdint>

#include "deform_conv_shape.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#include <cuda_fp16.h>
#define DMF_HOST_DEVICE __host__ __device__
#define DMF_INLINE __forceinline__
#else
#define DMF_HOST_DEVICE
#define DMF_INLINE inline
#endif

namespace dmf {

// Where one sample point reads and how much each corner weighs. Computed once per
// (offset group, tap, output position) and reused for every channel of the offset group,
// since the offsets are shared by those channels.
template <typename acc_t>
struct BilinearCorners {
  int32_t pixel[4];   // y*W + x of corners (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1); 0 when unused
  acc_t weight[4];    // 0 for a corner outside the image, all 0 for a sample outside
  bool inside[4];     // the corner lies in the image (false for every corner of an invalid sample)
  bool valid;         // the sample point lies in (-1, H) x (-1, W)
};

// Every corner unused: what a sample outside (-1, H) x (-1, W) gives.
template <typename acc_t>
DMF_HOST_DEVICE DMF_INLINE void clear_corners(BilinearCorners<acc_t>& c) {
  c.valid = false;
  for (int k = 0; k < 4; ++k) {
    c.pixel[k] = 0;
    c.weight[k] = acc_t(0);
    c.inside[k] = false;
  }
}

DMF_HOST_DEVICE DMF_INLINE float floor_of(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}
DMF_HOST_DEVICE DMF_INLINE double floor_of(double v) {
#if defined(__CUDA_ARCH__)
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

// Storage type -> arithmetic type (half is widened explicitly: PyTorch builds CUDA code
// with __CUDA_NO_HALF_CONVERSIONS__).
DMF_HOST_DEVICE DMF_INLINE float widen(float v) { return v; }
DMF_HOST_DEVICE DMF_INLINE double widen(double v) { return v; }
#if defined(__CUDACC__) || defined(__HIPCC__)
DMF_HOST_DEVICE DMF_INLINE float widen(__half v) { return __half2float(v); }
#endif

template <typename acc_t>
DMF_HOST_DEVICE DMF_INLINE BilinearCorners<acc_t> bilinear_corners(acc_t py, acc_t px,
                                                                   int32_t height, int32_t width) {
  BilinearCorners<acc_t> c;
  // DCNv1: the whole sample is 0 unless -1 < py < H and -1 < px < W. Written as a
  // negated conjunction so that NaN coordinates (every comparison false) also give 0.
  c.valid = py > acc_t(-1) && px > acc_t(-1) && py < acc_t(height) && px < acc_t(width);
  if (!c.valid) {
    clear_corners(c);
    return c;
  }
  const acc_t y0f = floor_of(py);
  const acc_t x0f = floor_of(px);
  const int32_t y0 = static_cast<int32_t>(y0f);  // in [-1, H-1]
  const int32_t x0 = static_cast<int32_t>(x0f);  // in [-1, W-1]
  const acc_t ly = py - y0f, lx = px - x0f;
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  const bool top = y0 >= 0, bottom = y0 + 1 < height;
  const bool left = x0 >= 0, right = x0 + 1 < width;
  // a corner outside the image contributes 0 (it is not clamped to the border)
  const bool inside[4] = {top && left, top && right, bottom && left, bottom && right};
  const int32_t pixels[4] = {y0 * width + x0, y0 * width + x0 + 1, (y0 + 1) * width + x0,
                             (y0 + 1) * width + x0 + 1};
  const acc_t weights[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  for (int k = 0; k < 4; ++k) {
    c.pixel[k] = inside[k] ? pixels[k] : 0;
    c.weight[k] = inside[k] ? weights[k] : acc_t(0);
    c.inside[k] = inside[k];
  }
  return c;
}

// Corners of kernel tap (ky, kx) at output position (oy, ox), moved by offset (dy, dx).
template <typename acc_t>
DMF_HOST_DEVICE DMF_INLINE BilinearCorners<acc_t> deform_tap_corners(
    const DeformConvShape& s, int64_t oy, int64_t ox, int64_t ky, int64_t kx, acc_t dy, acc_t dx) {
  const acc_t py = static_cast<acc_t>(oy * s.stride_h - s.pad_h + ky * s.dilation_h) + dy;
  const acc_t px = static_cast<acc_t>(ox * s.stride_w - s.pad_w + kx * s.dilation_w) + dx;
  return bilinear_corners(py, px, static_cast<int32_t>(s.height), static_cast<int32_t>(s.width));
}

// Whether all four corners of a sample lie in the image (the common case, where
// bilinear_sample needs no select).
template <typename acc_t>
DMF_HOST_DEVICE DMF_INLINE bool every_corner_inside(const BilinearCorners<acc_t>& c) {
  return c.inside[0] && c.inside[1] && c.inside[2] && c.inside[3];
}

// The sample of one channel: `image` points at the channel's value of pixel 0, and
// consecutive pixels are `pixel_stride` elements apart (1 for NCHW, C for NHWC).
// An unused corner reads pixel 0 (always in bounds) and is dropped by a select, not by
// its weight 0: pixel 0 may be Inf or NaN, and 0 * Inf is NaN where DCNv1 says 0.
// kEveryCornerInside: the caller has checked every_corner_inside (skips the selects).
template <bool kEveryCornerInside = false, typename acc_t, typename scalar_t>
DMF_HOST_DEVICE DMF_INLINE acc_t bilinear_sample(const scalar_t* image, int64_t pixel_stride,
                                                 const BilinearCorners<acc_t>& c) {
  acc_t term[4];
  for (int k = 0; k < 4; ++k) {
    term[k] = c.weight[k] * static_cast<acc_t>(widen(image[c.pixel[k] * pixel_stride]));
    if (!kEveryCornerInside) term[k] = c.inside[k] ? term[k] : acc_t(0);
  }
  return term[0] + term[1] + term[2] + term[3];
}

}  // namespace dmf
