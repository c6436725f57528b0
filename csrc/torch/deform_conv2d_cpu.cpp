// dmf::deform_conv2d on the CPU: deformable im2col + GEMM, in chunks of samples.
//
// Per chunk: the input goes channels-last (a sample point's channels become contiguous, so
// the sampler runs as vector loops); then, per pass over a range of kernel taps, the
// im2col (csrc/kernels) fills a column buffer with one row per output position and a
// grouped 1x1 convolution over those rows does the GEMM, summed over the passes; finally
// the position-major sums are transposed into the NCHW output.
//
// - The GEMM is a 1x1 convolution rather than addmm because PyTorch hands it to oneDNN,
//   which on some CPUs (AMD with MKL) is twice as fast as the BLAS GEMM. oneDNN wants many
//   rows per call (it re-packs the weight on every call, and PyTorch only picks it for
//   small batches when several threads run), so chunks hold at least 16 samples.
// - The column buffer stays near a budget (16 MB): when 16 samples with all taps would not
//   fit, the taps are split into passes whose products are summed. The budget trades the
//   columns staying in the last-level cache between im2col and GEMM against the barrier
//   every parallel region costs; on DMF's shapes (2-core AMD EPYC, side by side) 16 MB beat
//   64 MB by 30 % for the 1x1 grouped DCN of the weight-first head, 35 % for 640 -> 64 3x3
//   and 3 % for 640 -> 640 3x3, and was steadier than 8 MB.
// - Each step runs in parallel inside (at::parallel_for); chunks run one after another.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#include "../kernels/deform_conv_cpu.h"
#include "deform_conv2d.h"

namespace dmf {
namespace {

// Target size of the column buffer; DMF_EXPORT_CPU_CHUNK_MB overrides it (tests use a tiny
// one to force many chunks and passes).
int64_t column_buffer_bytes() {
  if (const char* forced = std::getenv("DMF_EXPORT_CPU_CHUNK_MB")) {
    const double megabytes = std::atof(forced);
    if (megabytes > 0) return static_cast<int64_t>(megabytes * (1 << 20));
  }
  return int64_t(16) << 20;
}

// oneDNN's GEMM (and PyTorch's choice of it) wants about this many samples per call.
constexpr int64_t kMinChunkSamples = 16;

// Transposes `matrices` row-major [rows, cols] matrices to [cols, rows] in parallel: matrix m
// is read from source_of(m) and written to target + m * rows * cols.
template <typename scalar_t, typename SourceOf>
void transpose_in_parallel(SourceOf source_of, scalar_t* target, int64_t matrices, int64_t rows,
                           int64_t cols) {
  const int64_t blocks = (rows + kTransposeRows - 1) / kTransposeRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(32) << 10) / (kTransposeRows * cols));
  at::parallel_for(0, matrices * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t matrix = item / blocks, block = item % blocks;
      transpose_matrices<scalar_t>(source_of(matrix), target + matrix * rows * cols, rows, cols,
                                   block, block + 1);
    }
  });
}

struct Plan {
  DeformConvShape shape;
  int64_t chunk = 1;      // samples per chunk
  int64_t pass_taps = 1;  // kernel taps per im2col + GEMM pass
  std::vector<at::Tensor> pass_weights;  // [O, pass taps * C/groups, 1, 1] per pass
};

// Buffers reused by the chunks of one call.
struct Buffers {
  at::Tensor images;   // [chunk, H, W, C]
  at::Tensor columns;  // chunk * positions * pass_taps * C
  Buffers(const Plan& p, const at::TensorOptions& options)
      : images(at::empty({p.chunk, p.shape.height, p.shape.width, p.shape.channels}, options)),
        columns(at::empty({p.chunk * p.shape.out_positions() * p.pass_taps * p.shape.channels},
                          options)) {}
};

template <typename scalar_t>
void run_chunk(const Plan& plan, Buffers& buffers, const at::Tensor& images,
               const at::Tensor& offsets, at::Tensor& output, int64_t batch_begin) {
  const DeformConvShape& s = plan.shape;
  const int64_t count = std::min(plan.chunk, s.batch - batch_begin);
  const int64_t positions = s.out_positions();
  const int64_t pixels = s.height * s.width;
  const int64_t taps = s.taps();
  const int64_t ones[2] = {1, 1}, zeros[2] = {0, 0};

  // the chunk's samples' images, channels-last (one image may serve several samples)
  const scalar_t* input_data = images.const_data_ptr<scalar_t>();
  transpose_in_parallel(
      [&](int64_t sample) {
        return input_data + image_of(s, batch_begin + sample) * s.channels * pixels;
      },
      buffers.images.mutable_data_ptr<scalar_t>(), count, s.channels, pixels);
  const scalar_t* image_data = buffers.images.const_data_ptr<scalar_t>();
  const scalar_t* offset_data =
      offsets.const_data_ptr<scalar_t>() + batch_begin * s.offset_channels() * positions;

  at::Tensor sums;  // [count, O, out_h, out_w], channels-last
  for (size_t pass = 0; pass < plan.pass_weights.size(); ++pass) {
    const int64_t tap_begin = int64_t(pass) * plan.pass_taps;
    const int64_t tap_end = std::min(taps, tap_begin + plan.pass_taps);
    const int64_t row_length = (tap_end - tap_begin) * s.channels;
    at::Tensor columns = buffers.columns.narrow(0, 0, count * positions * row_length)
                             .view({count, s.out_h, s.out_w, row_length});
    scalar_t* column_data = columns.mutable_data_ptr<scalar_t>();
    const int64_t grain =  // about 32 KiB of columns per task
        std::max<int64_t>(1, (int64_t(32) << 10) / (row_length * int64_t(sizeof(scalar_t))));
    at::parallel_for(0, count * positions, grain, [&](int64_t begin, int64_t end) {
      deform_im2col_rows<scalar_t>(image_data, offset_data, column_data, s, tap_begin, tap_end,
                                   begin, end);
    });
    at::Tensor products =
        at::conv2d(columns.permute({0, 3, 1, 2}), plan.pass_weights[pass], /*bias=*/std::nullopt,
                   /*stride=*/ones, /*padding=*/zeros, /*dilation=*/ones, s.groups);
    sums = pass == 0 ? products : sums.add_(products);
  }
  at::Tensor target = output.narrow(0, batch_begin, count);
  if (sums.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const scalar_t* sums_data = sums.const_data_ptr<scalar_t>();
    transpose_in_parallel(
        [&](int64_t sample) { return sums_data + sample * positions * s.out_channels; },
        target.mutable_data_ptr<scalar_t>(), count, positions, s.out_channels);
  } else {
    target.copy_(sums);
  }
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& offset,
                             const at::Tensor& weight, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                             int64_t offset_groups) {
  Plan plan;
  plan.shape = check_deform_conv2d_args(input, offset, weight, stride, padding, dilation, groups,
                                        offset_groups);
  const DeformConvShape& s = plan.shape;
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "dmf::deform_conv2d on CPU supports float32 and float64, got ",
              input.scalar_type());
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (s.batch == 0 || s.out_channels == 0) return output;

  const at::Tensor images = input.contiguous();
  const at::Tensor offsets = offset.contiguous();
  const int64_t taps = s.taps();
  const int64_t group_channels = s.channels_per_group();

  // Samples per chunk, then taps per pass, so that the columns fit the budget: all taps in
  // one pass when 16 samples fit, else as many samples as fit with one tap (at most 16).
  const int64_t tap_bytes = s.out_positions() * s.channels * int64_t(input.element_size());
  const int64_t budget = column_buffer_bytes();
  int64_t max_chunk = budget / (tap_bytes * taps);
  if (max_chunk < kMinChunkSamples) {
    max_chunk = std::clamp<int64_t>(budget / tap_bytes, 1, kMinChunkSamples);
  }
  const int64_t chunks = (s.batch + max_chunk - 1) / max_chunk;
  plan.chunk = (s.batch + chunks - 1) / chunks;  // even chunks: at most two shapes
  plan.pass_taps = std::clamp<int64_t>(budget / (plan.chunk * tap_bytes), 1, taps);

  // Rows are ordered (group, tap, channel); the weight of each pass matches:
  // [O, C/g, kh, kw] -> [O, taps, C/g] -> [O, pass taps * C/g, 1, 1].
  const at::Tensor weight_by_tap =
      weight.reshape({s.out_channels, group_channels, taps}).permute({0, 2, 1});
  for (int64_t tap = 0; tap < taps; tap += plan.pass_taps) {
    const int64_t count = std::min(plan.pass_taps, taps - tap);
    plan.pass_weights.push_back(weight_by_tap.narrow(1, tap, count)
                                    .contiguous()
                                    .view({s.out_channels, count * group_channels, 1, 1}));
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dmf::deform_conv2d (cpu)", [&] {
    Buffers buffers(plan, input.options());
    for (int64_t c = 0; c < chunks; ++c) {
      run_chunk<scalar_t>(plan, buffers, images, offsets, output, c * plan.chunk);
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmf, CPU, m) { m.impl("deform_conv2d", &deform_conv2d_cpu); }

}  // namespace dmf
