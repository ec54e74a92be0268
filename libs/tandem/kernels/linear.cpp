// x . W^T for a few rows x on the CPU, in the register tiles of tiles.h: see linear.py.
//
// Each task is one 32-column block of the output, over every row in tiles of up to 8, so each weight column is
// read once; threads split the blocks.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "tiles.h"
#include "vec.h"

namespace {

using namespace tandem;

// x [M, K] . weight^T, weight [N, K] column-major (nn.Linear's weight in the CPU decoding layout), of x's dtype;
// N a multiple of 16 (a last block of 16 columns is a half tile). Returns [M, N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "linear's x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "linear's weight must be [out, ", x.size(1), "] of x's dtype ", x.scalar_type(), ", got ",
              weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(weight.stride(0) == 1, "linear's weight must be column-major, got strides ", weight.strides());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(N % 16 == 0, "linear's output size must be a multiple of 16, got ", N);
  auto out = at::empty({M, N}, x.options());
  dispatch_dtype(x.scalar_type(), "linear", [&](auto zero) {
    using X = decltype(zero);
    const X *xp = x.data_ptr<X>(), *wp = weight.data_ptr<X>();
    X* op = out.data_ptr<X>();
    run_tasks(std::vector<int64_t>((N + kCols - 1) / kCols, M + 8), [&](int64_t block) {
      const int64_t c0 = block * kCols, width = std::min(kCols, N - c0);
      const Columns<X> w{wp + c0, weight.stride(1)};
      const X* a[kMaxRows];
      float tile_out[kMaxRows * kCols];
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
        const int64_t m = std::min(kMaxRows, M - r0);
        for (int64_t r = 0; r < m; ++r) a[r] = xp + (r0 + r) * x.stride(0);
        if (width == kCols)
          tile_rows(m, a, w, K, tile_out);
        else
          half_tile_rows(m, a, w, K, tile_out);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < width; c += 16)
            store_float(op + (r0 + r) * N + c0 + c, load(tile_out + r * kCols + c));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("linear", &linear); }
