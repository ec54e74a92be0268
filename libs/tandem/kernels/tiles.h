// Register tiles of a small matmul shared by the CPU kernels: up to 8 rows times 32 columns of a weight read by
// columns (packed by `pack`, or as it lies), in float32 FMAs or, for bfloat16 on a CPU with AVX512-BF16,
// `vdpbf16ps`; and a split of tasks of uneven cost between the intra-op threads.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace tandem {

constexpr int64_t kCols = 32;     // columns of a tile: two vectors
constexpr int64_t kMaxRows = 8;   // rows of a tile at most

// A weight matrix read by columns: (k, n) at base[k * k_stride + n], each k's columns contiguous; or, `paired`, the
// rows in pairs, (k, n) at base[k / 2 * k_stride + 2 * n + k % 2] (a packed block, see `packed_block`).
template <typename W>
struct Columns {
  const W* base;
  int64_t k_stride;
  bool paired = false;
};

// Whether `pack` interleaves a weight's rows in pairs for tile_dpbf16: bfloat16 where the CPU has AVX512-BF16, with
// an even inner size K; otherwise a block's rows lie one after another.
inline bool packs_pairs(at::ScalarType dtype, int64_t K) {
#if defined(__AVX512BF16__)
  return dtype == at::kBFloat16 && K % 2 == 0;
#else
  (void)dtype, (void)K;
  return false;
#endif
}

// A weight [..., N, K] (nn.Linear's [out, in], any strides) packed for the tiles: [..., ceil(N / 32), K, 32], block
// b holding output columns 32b .. 32b + 31 (past N zeros) for every k, contiguous, rows in pairs where
// `packs_pairs`. A decode step reads each block as one stream: read by columns from the weight itself, a block's
// rows lie `N` apart, which the hardware prefetchers do not follow across pages and which, at power-of-two N,
// share a few cache sets (at 1 row, 4x slower with the weights out of cache on a Zen 4 EPYC).
inline at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() >= 2, "pack takes a weight [..., out, in], got ", weight.sizes());
  const int64_t N = weight.size(-2), K = weight.size(-1), blocks = (N + kCols - 1) / kCols;
  auto sizes = weight.sizes().vec();
  sizes[sizes.size() - 2] = blocks * kCols;
  auto padded = at::zeros(sizes, weight.options());
  padded.narrow(-2, 0, N).copy_(weight);
  auto blocked = padded.unflatten(-2, {blocks, kCols});  // [..., blocks, 32, K]
  if (!packs_pairs(weight.scalar_type(), K)) return blocked.transpose(-2, -1).contiguous();
  auto packed_sizes = blocked.transpose(-2, -1).sizes().vec();  // [..., blocks, K, 32], in memory [K / 2, 32, 2]
  return blocked.unflatten(-1, {K / 2, 2}).transpose(-3, -2).contiguous().view(packed_sizes);
}

// Checks that `tiles` is a weight of `dtype` [..., out, K] with `out` columns packed by `pack` (the leading dims
// are the caller's to check)
inline void check_packed(const at::Tensor& tiles, int64_t out, int64_t K, at::ScalarType dtype, const char* what) {
  const int64_t d = tiles.dim();
  TORCH_CHECK(d >= 3 && tiles.size(d - 3) == (out + kCols - 1) / kCols && tiles.size(d - 2) == K &&
                  tiles.size(d - 1) == kCols && tiles.is_contiguous() && tiles.scalar_type() == dtype,
              what, " must be a weight of ", out, " x ", K, " ", dtype, " packed for the tiles ([..., ",
              (out + kCols - 1) / kCols, ", ", K, ", ", kCols, "], contiguous), got ", tiles.sizes(), " ",
              tiles.scalar_type());
}

// Block b of a weight `pack`ed with inner size K, as the tiles read it
template <typename W>
Columns<W> packed_block(const W* packed, int64_t K, int64_t b) {
  const bool paired = packs_pairs(c10::CppTypeToScalarType<W>::value, K);
  return {packed + b * kCols * K, paired ? 2 * kCols : kCols, paired};
}

// out[r, n] = sum over k < K of a[r][k] * w(k, n), for MR rows a[r] and the kCols columns n from w.base; out is
// [MR, kCols] float32. w is not `paired`: rows are packed in pairs only where tile_dpbf16 reads them.
template <int MR, typename A, typename W>
void tile_fma(const A* const* a, Columns<W> w, int64_t K, float* out) {
  f16 acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w.base + k * w.k_stride;
    const f16 wv[2] = {load_float(wk), load_float(wk + 16)};
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float x = to_float(a[r][k]);
      for (int v = 0; v < 2; ++v) acc[r][v] += x * wv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) store(out + r * kCols + 16 * v, acc[r][v]);
}

#if defined(__AVX512BF16__)
// tile_fma in bfloat16 by `vdpbf16ps`, which sums products of (k, k + 1) pairs: rows k and k + 1 of the columns
// interleaved into a pair per column (as packed, or on the fly by `vpermt2w`), times the row's pair (a[r][k],
// a[r][k + 1]) in every lane; K even
template <int MR>
void tile_dpbf16(const c10::BFloat16* const* a, Columns<c10::BFloat16> w, int64_t K, float* out) {
  const __m512i low = pair_rows_index(0), high = pair_rows_index(16);
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const auto accumulate = [&](int64_t k, __m512bh w0, __m512bh w1) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + k, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
    }
  };
  if (w.paired) {
    for (int64_t k = 0; k < K; k += 2) {
      const c10::BFloat16* p = w.base + k / 2 * w.k_stride;
      accumulate(k, (__m512bh)_mm512_loadu_si512(p), (__m512bh)_mm512_loadu_si512(p + kCols));
    }
  } else {
    for (int64_t k = 0; k < K; k += 2) {
      const __m512i row0 = _mm512_loadu_si512(w.base + k * w.k_stride);
      const __m512i row1 = _mm512_loadu_si512(w.base + (k + 1) * w.k_stride);
      accumulate(k, (__m512bh)_mm512_permutex2var_epi16(row0, low, row1),
                 (__m512bh)_mm512_permutex2var_epi16(row0, high, row1));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) _mm512_storeu_ps(out + r * kCols + 16 * v, acc[r][v]);
}
#endif

template <int MR, typename A, typename W>
void tile(const A* const* a, Columns<W> w, int64_t K, float* out) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, c10::BFloat16> && std::is_same_v<W, c10::BFloat16>) {
    if (K % 2 == 0) return tile_dpbf16<MR>(a, w, K, out);
  }
#endif
  tile_fma<MR>(a, w, K, out);
}

// tile() of `rows` rows (1 to kMaxRows), with the row count a constant, as the accumulators in registers need
template <typename A, typename W>
void tile_rows(int64_t rows, const A* const* a, Columns<W> w, int64_t K, float* out) {
  switch (rows) {
    case 1: return tile<1>(a, w, K, out);
    case 2: return tile<2>(a, w, K, out);
    case 3: return tile<3>(a, w, K, out);
    case 4: return tile<4>(a, w, K, out);
    case 5: return tile<5>(a, w, K, out);
    case 6: return tile<6>(a, w, K, out);
    case 7: return tile<7>(a, w, K, out);
    default: return tile<8>(a, w, K, out);
  }
}

// out [rows, width] = a [rows, K] . the 32 columns of w, in tiles of up to 8 rows: a's rows `a_stride` apart, out's
// `out_stride` apart, as summed in float32 or rounded to O; width is the columns that exist (a packing pads the
// last block)
template <typename A, typename W, typename O>
void rows_times_block(const A* a, int64_t a_stride, int64_t rows, Columns<W> w, int64_t K, int64_t width, O* out,
                      int64_t out_stride) {
  const A* a_rows[kMaxRows];
  float tile_out[kMaxRows * kCols];
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t m = std::min(kMaxRows, rows - r0);
    for (int64_t r = 0; r < m; ++r) a_rows[r] = a + (r0 + r) * a_stride;
    tile_rows(m, a_rows, w, K, tile_out);
    for (int64_t r = 0; r < m; ++r) round_values(tile_out + r * kCols, width, out + (r0 + r) * out_stride);
  }
}

// task(i) for every i < costs.size() on the intra-op threads, each thread a run of consecutive tasks of about equal
// total cost (a task goes to the thread whose share of the total holds its middle)
template <typename F>
void run_tasks(const std::vector<int64_t>& costs, const F& task) {
  const int64_t n = static_cast<int64_t>(costs.size());
  if (n == 0) return;
  std::vector<int64_t> before(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) before[i + 1] = before[i] + costs[i];
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n), total = before[n];
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t twice_middle = (2 * before[i] + costs[i]) * threads;
        if (twice_middle >= 2 * t * total && twice_middle < 2 * (t + 1) * total) task(i);
      }
  });
}

}  // namespace tandem
