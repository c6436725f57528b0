#include "deform_conv_cpu.h"

#include <algorithm>

#include "deform_sampler.h"

namespace dmf {
namespace {

// One sample point for a run of consecutive channels (NHWC: contiguous), the hot loop.
// Indexing the four corner rows directly lets the compiler vectorise over channels.
template <typename scalar_t>
void sample_channel_run(const scalar_t* __restrict image, int64_t channels,
                        const BilinearCorners<scalar_t>& corners, scalar_t* __restrict out,
                        int64_t count) {
  if (!corners.valid) {
    std::fill(out, out + count, scalar_t(0));
    return;
  }
  if (every_corner_inside(corners)) {
    for (int64_t c = 0; c < count; ++c) out[c] = bilinear_sample<true>(image + c, channels, corners);
  } else {  // at the border: select the corners inside
    for (int64_t c = 0; c < count; ++c) out[c] = bilinear_sample(image + c, channels, corners);
  }
}

}  // namespace

template <typename scalar_t>
void deform_im2col_rows(const scalar_t* input_nhwc, const scalar_t* offset, scalar_t* columns,
                        const DeformConvShape& s, int64_t tap_begin, int64_t tap_end,
                        int64_t row_begin, int64_t row_end) {
  const int64_t positions = s.out_positions();
  const int64_t taps = s.taps();
  const int64_t row_taps = tap_end - tap_begin;
  const int64_t channels = s.channels;
  const int64_t group_channels = s.channels_per_group();
  const int64_t offset_group_channels = s.channels_per_offset_group();
  const int64_t row_length = channels * row_taps;
  const int64_t image_size = s.height * s.width * channels;

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / positions;
    const int64_t position = row % positions;
    const int64_t oy = position / s.out_w, ox = position % s.out_w;
    const scalar_t* image = input_nhwc + n * image_size;
    const scalar_t* offsets = offset + n * s.offset_channels() * positions + position;
    scalar_t* out_row = columns + row * row_length;

    for (int64_t og = 0; og < s.offset_groups; ++og) {
      const int64_t c_begin = og * offset_group_channels;
      const int64_t c_end = c_begin + offset_group_channels;
      for (int64_t tap = tap_begin; tap < tap_end; ++tap) {
        const int64_t channel = (og * taps + tap) * 2;  // dy, then dx
        const BilinearCorners<scalar_t> corners = deform_tap_corners<scalar_t>(
            s, oy, ox, tap / s.kernel_w, tap % s.kernel_w, offsets[channel * positions],
            offsets[(channel + 1) * positions]);
        // the offset group's channels, cut where a convolution group ends
        for (int64_t c = c_begin; c < c_end;) {
          const int64_t g = c / group_channels;
          const int64_t run_end = std::min(c_end, (g + 1) * group_channels);
          scalar_t* out = out_row + (g * row_taps + tap - tap_begin) * group_channels +
                          (c - g * group_channels);
          sample_channel_run(image + c, channels, corners, out, run_end - c);
          c = run_end;
        }
      }
    }
  }
}

template <typename scalar_t>
void transpose_matrices(const scalar_t* source, scalar_t* target, int64_t rows, int64_t cols,
                        int64_t item_begin, int64_t item_end) {
  const int64_t row_blocks = (rows + kTransposeRows - 1) / kTransposeRows;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t matrix = item / row_blocks;
    const int64_t row_begin = (item % row_blocks) * kTransposeRows;
    const int64_t row_end = std::min(rows, row_begin + kTransposeRows);
    const scalar_t* __restrict from = source + matrix * rows * cols;
    scalar_t* __restrict to = target + matrix * rows * cols;
    for (int64_t col = 0; col < cols; ++col) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        to[col * rows + row] = from[row * cols + col];
      }
    }
  }
}

template void transpose_matrices<float>(const float*, float*, int64_t, int64_t, int64_t,
                                        int64_t);
template void transpose_matrices<double>(const double*, double*, int64_t, int64_t, int64_t,
                                         int64_t);
template void deform_im2col_rows<float>(const float*, const float*, float*,
                                        const DeformConvShape&, int64_t, int64_t, int64_t,
                                        int64_t);
template void deform_im2col_rows<double>(const double*, const double*, double*,
                                         const DeformConvShape&, int64_t, int64_t, int64_t,
                                         int64_t);

}  // namespace dmf
