// x . W^T for a few rows x on the CPU, in the register tiles of tiles.h: see linear.py.
//
// Each task is one 32-column block of the output, over every row in tiles of up to 8, so each block of the packed
// weight is read once; threads split the blocks.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "tiles.h"
#include "vec.h"

namespace {

using namespace tandem;

// x [M, K] . weight^T for nn.Linear's weight [N, K] `pack`ed for the tiles (`tiles`), of x's dtype; N a multiple
// of 16. Returns [M, N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& tiles, int64_t N) {
  check_rows(x, "linear's x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(N > 0 && N % 16 == 0, "linear's output size must be a positive multiple of 16, got ", N);
  check_packed(tiles, N, K, x.scalar_type(), "linear's weight");
  TORCH_CHECK(tiles.dim() == 3, "linear's weight must be one matrix, got ", tiles.sizes());
  auto out = at::empty({M, N}, x.options());
  dispatch_dtype(x.scalar_type(), "linear", [&](auto zero) {
    using X = decltype(zero);
    const X *xp = x.data_ptr<X>(), *wp = tiles.data_ptr<X>();
    X* op = out.data_ptr<X>();
    run_tasks(std::vector<int64_t>(tiles.size(0), M + 8), [&](int64_t block) {
      const int64_t c0 = block * kCols;
      rows_times_block(xp, x.stride(0), M, packed_block(wp, K, block), K, std::min(kCols, N - c0), op + c0, N);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("linear", &linear); }
