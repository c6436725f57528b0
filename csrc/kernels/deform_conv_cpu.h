// DCNv1 deformable im2col on the CPU. Plain C++17: no PyTorch, no threading runtime
// (the caller splits the work items between its threads), 64-bit indexing.
#pragma once

#include <cstdint>

#include "deform_conv_shape.h"

namespace dmf {

// Fills rows [row_begin, row_end) of the column matrix of the kernel taps
// [tap_begin, tap_end) (row-major tap order) for the samples of `input_nhwc`/`offset`.
//
// input_nhwc: [n, H, W, C] (channels last), offset: [n, 2*offset_groups*taps, out_h, out_w],
//             both starting at the first sample of the chunk.
// columns:    one row per output position, row r = sample*out_h*out_w + oy*out_w + ox, each
//             C*(tap_end - tap_begin) long, ordered (group, tap, channel in group). A row
//             times the weight permuted to [O, taps, C/groups] (those taps, per group) is
//             that tap range's share of the output at that position: the rows feed a 1x1
//             convolution / GEMM.
// Rows are independent, so any partition of [0, rows) between threads is valid.
template <typename scalar_t>
void deform_im2col_rows(const scalar_t* input_nhwc, const scalar_t* offset, scalar_t* columns,
                        const DeformConvShape& shape, int64_t tap_begin, int64_t tap_end,
                        int64_t row_begin, int64_t row_end);

// Transposes row-major [rows, cols] matrices (one after another in memory) to [cols, rows]:
// NCHW <-> NHWC per sample. Work items are (matrix, block of kTransposeRows source rows);
// there are matrices * ceil(rows / kTransposeRows) of them.
constexpr int64_t kTransposeRows = 16;
template <typename scalar_t>
void transpose_matrices(const scalar_t* source, scalar_t* target, int64_t rows, int64_t cols,
                        int64_t item_begin, int64_t item_end);

extern template void deform_im2col_rows<float>(const float*, const float*, float*,
                                               const DeformConvShape&, int64_t, int64_t, int64_t,
                                               int64_t);
extern template void deform_im2col_rows<double>(const double*, const double*, double*,
                                                const DeformConvShape&, int64_t, int64_t,
                                                int64_t, int64_t);
extern template void transpose_matrices<float>(const float*, float*, int64_t, int64_t, int64_t,
                                               int64_t);
extern template void transpose_matrices<double>(const double*, double*, int64_t, int64_t,
                                                int64_t, int64_t);

}  // namespace dmf
