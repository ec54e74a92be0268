// Register tiles of a small matmul shared by the CPU kernels: up to 8 rows times 32 columns of a weight read by
// columns, in float32 FMAs or, for bfloat16 on a CPU with AVX512-BF16, `vdpbf16ps`; and a split of tasks of
// uneven cost between the intra-op threads.

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

// A weight matrix read by columns: (k, n) at base[k * k_stride + n], each k's columns contiguous.
template <typename W>
struct Columns {
  const W* base;
  int64_t k_stride;
};

// out[r, n] = sum over k < K of a[r][k] * w(k, n), for MR rows a[r] and the 16 * NV columns n from w.base (NV
// vectors: 2, a whole tile, or 1, a last half one); out is [MR, kCols] float32
template <int MR, int NV, typename A, typename W>
void tile_fma(const A* const* a, Columns<W> w, int64_t K, float* out) {
  f16 acc[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w.base + k * w.k_stride;
    f16 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load_float(wk + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float x = to_float(a[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * kCols + 16 * v, acc[r][v]);
}

#if defined(__AVX512BF16__)
// tile_fma in bfloat16 by `vdpbf16ps`, which sums products of (k, k + 1) pairs: rows k and k + 1 of the columns
// interleaved into a pair per column, times the row's pair (a[r][k], a[r][k + 1]) in every lane; K even
template <int MR, int NV>
void tile_dpbf16(const c10::BFloat16* const* a, Columns<c10::BFloat16> w, int64_t K, float* out) {
  const __m512i low = pair_rows_index(0), high = pair_rows_index(16);
  // a row's columns: a half tile reads 16, not past them
  const auto columns = [](const c10::BFloat16* p) {
    if constexpr (NV == 2) return _mm512_loadu_si512(p);
    return _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const __m512i row0 = columns(w.base + k * w.k_stride), row1 = columns(w.base + (k + 1) * w.k_stride);
    __m512bh wv[NV];
    wv[0] = (__m512bh)_mm512_permutex2var_epi16(row0, low, row1);
    if constexpr (NV == 2) wv[1] = (__m512bh)_mm512_permutex2var_epi16(row0, high, row1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + k, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, wv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * kCols + 16 * v, acc[r][v]);
}
#endif

template <int MR, int NV, typename A, typename W>
void tile(const A* const* a, Columns<W> w, int64_t K, float* out) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, c10::BFloat16> && std::is_same_v<W, c10::BFloat16>) {
    if (K % 2 == 0) return tile_dpbf16<MR, NV>(a, w, K, out);
  }
#endif
  tile_fma<MR, NV>(a, w, K, out);
}

// tile() of `rows` rows (1 to kMaxRows), with the row count a constant, as the accumulators in registers need
template <typename A, typename W, int NV = 2>
void tile_rows(int64_t rows, const A* const* a, Columns<W> w, int64_t K, float* out) {
  switch (rows) {
    case 1: return tile<1, NV>(a, w, K, out);
    case 2: return tile<2, NV>(a, w, K, out);
    case 3: return tile<3, NV>(a, w, K, out);
    case 4: return tile<4, NV>(a, w, K, out);
    case 5: return tile<5, NV>(a, w, K, out);
    case 6: return tile<6, NV>(a, w, K, out);
    case 7: return tile<7, NV>(a, w, K, out);
    default: return tile<8, NV>(a, w, K, out);
  }
}

// tile_rows() of the first 16 columns only (the last, half tile of a matrix 16 columns short of whole tiles)
template <typename A, typename W>
void half_tile_rows(int64_t rows, const A* const* a, Columns<W> w, int64_t K, float* out) {
  tile_rows<A, W, 1>(rows, a, w, K, out);
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
