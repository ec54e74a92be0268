// A MoE layer's routed experts on the CPU, each run on just the tokens routed to it: see moe_experts.py.
//
// The (token, expert) pairs are sorted by expert (a counting sort). Each expert's gate and up projections then run
// on its pairs' rows in tiles of up to 8 rows x 32 columns (`tile`); silu(gate) * up times the pair's gate weight
// is rounded to the input's dtype (as the tensor operations round it), the down projection writes each pair's
// output row in float32, and each token's rows are summed, in the order of its experts, and rounded once. Threads
// take runs of (expert, 32-column block) tasks of about equal rows. In bfloat16 on a CPU with AVX512-BF16 the
// products are `vdpbf16ps`, two rows of a weight interleaved on the fly; elsewhere float32 FMAs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace tandem;

constexpr int64_t kCols = 32;     // columns of a tile: two vectors
constexpr int64_t kMaxRows = 8;   // rows of a tile at most
constexpr int64_t kTaskCost = 8;  // a task's cost beyond its rows (reading its weights), in rows

// A weight matrix read by columns: (k, n) at base[k * k_stride + n], each k's columns contiguous.
template <typename W>
struct Columns {
  const W* base;
  int64_t k_stride;
};

// out[r, n] = sum over k < K of a[r][k] * w(k, n), for MR rows a[r] and the 32 columns n from w.base; out is
// [MR, 32] float32
template <int MR, typename A, typename W>
void tile_fma(const A* const* a, Columns<W> w, int64_t K, float* out) {
  f16 acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w.base + k * w.k_stride;
    const f16 w0 = load_float(wk), w1 = load_float(wk + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float x = to_float(a[r][k]);
      acc[r][0] += x * w0;
      acc[r][1] += x * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(out + r * kCols, acc[r][0]);
    store(out + r * kCols + 16, acc[r][1]);
  }
}

#if defined(__AVX512BF16__)
// tile_fma in bfloat16 by `vdpbf16ps`, which sums products of (k, k + 1) pairs: rows k and k + 1 of the 32 columns
// interleaved into a pair per column, times the row's pair (a[r][k], a[r][k + 1]) in every lane; K even
template <int MR>
void tile_dpbf16(const c10::BFloat16* const* a, Columns<c10::BFloat16> w, int64_t K, float* out) {
  const __m512i low = pair_rows_index(0), high = pair_rows_index(16);
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    const __m512i row0 = _mm512_loadu_si512(w.base + k * w.k_stride);
    const __m512i row1 = _mm512_loadu_si512(w.base + (k + 1) * w.k_stride);
    const __m512bh w0 = (__m512bh)_mm512_permutex2var_epi16(row0, low, row1);
    const __m512bh w1 = (__m512bh)_mm512_permutex2var_epi16(row0, high, row1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + k, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(out + r * kCols, acc[r][0]);
    _mm512_storeu_ps(out + r * kCols + 16, acc[r][1]);
  }
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

// One MoE layer's routed experts over T tokens of K experts each, in dtype X: see moe_experts().
template <typename X>
void run_experts(const at::Tensor& x, const std::vector<int64_t>& offsets, const std::vector<int64_t>& pairs,
                 const float* gate_weights, const at::Tensor& gate_up, const at::Tensor& down, int64_t K,
                 at::Tensor& out) {
  const int64_t T = x.size(0), D = x.size(1), P = gate_up.size(0), I = down.size(2), N = T * K;
  const X *xp = x.data_ptr<X>(), *gu = gate_up.data_ptr<X>(), *dn = down.data_ptr<X>();
  std::vector<X> hidden(N * I);     // each pair's silu(gate) * up * gate weight, by expert
  std::vector<float> rows(N * D);   // each pair's output, by pair (token * K + k)
  std::vector<int64_t> task_expert, task_block, costs;
  const auto plan = [&](int64_t blocks) {
    task_expert.clear(), task_block.clear(), costs.clear();
    for (int64_t e = 0; e < P; ++e)
      for (int64_t b = 0; b < blocks && offsets[e + 1] > offsets[e]; ++b) {
        task_expert.push_back(e), task_block.push_back(b);
        costs.push_back(offsets[e + 1] - offsets[e] + kTaskCost);
      }
  };
  // the gate and up projections, 32 columns of each at a time
  plan(I / kCols);
  run_tasks(costs, [&](int64_t i) {
    const int64_t e = task_expert[i], c0 = task_block[i] * kCols;
    const Columns<X> gate{gu + e * gate_up.stride(0) + c0, gate_up.stride(2)};
    const Columns<X> up{gu + e * gate_up.stride(0) + I + c0, gate_up.stride(2)};
    const X* a[kMaxRows];
    float g[kMaxRows * kCols], u[kMaxRows * kCols];
    for (int64_t start = offsets[e]; start < offsets[e + 1]; start += kMaxRows) {
      const int64_t m = std::min(kMaxRows, offsets[e + 1] - start);
      for (int64_t r = 0; r < m; ++r) a[r] = xp + pairs[start + r] / K * x.stride(0);
      tile_rows(m, a, gate, D, g);
      tile_rows(m, a, up, D, u);
      for (int64_t r = 0; r < m; ++r) {
        const float scale = gate_weights[pairs[start + r]];
        for (int64_t v = 0; v < kCols; v += 16)
          store_float(hidden.data() + (start + r) * I + c0 + v,
                      silu(load(g + r * kCols + v)) * load(u + r * kCols + v) * scale);
      }
    }
  });
  // the down projection, 32 output columns at a time
  plan(D / kCols);
  run_tasks(costs, [&](int64_t i) {
    const int64_t e = task_expert[i], c0 = task_block[i] * kCols;
    const Columns<X> w{dn + e * down.stride(0) + c0, down.stride(2)};
    const X* a[kMaxRows];
    float y[kMaxRows * kCols];
    for (int64_t start = offsets[e]; start < offsets[e + 1]; start += kMaxRows) {
      const int64_t m = std::min(kMaxRows, offsets[e + 1] - start);
      for (int64_t r = 0; r < m; ++r) a[r] = hidden.data() + (start + r) * I;
      tile_rows(m, a, w, I, y);
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(&rows[pairs[start + r] * D + c0], y + r * kCols, sizeof(float) * kCols);
    }
  });
  // each token's pairs summed
  X* op = out.data_ptr<X>();
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / (K * D)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t d = 0; d < D; d += 16) {
        f16 sum = load(&rows[t * K * D + d]);
        for (int64_t k = 1; k < K; ++k) sum += load(&rows[(t * K + k) * D + d]);
        store_float(op + t * D + d, sum);
      }
  });
}

// Each token's sum over its K experts (slot_ids [T, K], local slots) of weight [T, K] * the expert's FFN, the
// weight scaling the expert's intermediate: down(silu(gate(x)) * up(x) * weight). x [T, D]; gate_up [P, 2I, D]
// (each expert's gate rows, then its up rows) and down [P, D, I], of x's dtype, with their second dim contiguous
// (the CPU decoding layouts); D and I multiples of 32.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& slot_ids, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "moe_experts' x must be a CPU [tokens, hidden] tensor with contiguous rows, got ", x.sizes(),
              " strides ", x.strides());
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(slot_ids.dim() == 2 && slot_ids.size(0) == T && slot_ids.scalar_type() == at::kLong,
              "moe_experts' slot_ids must be [", T, ", K] int64, got ", slot_ids.sizes(), " ", slot_ids.scalar_type());
  const int64_t K = slot_ids.size(1);
  TORCH_CHECK(K >= 1, "moe_experts needs at least one expert per token");
  TORCH_CHECK(weights.sizes() == slot_ids.sizes() && at::isFloatingType(weights.scalar_type()),
              "moe_experts' weights must be floats of slot_ids' shape ", slot_ids.sizes(), ", got ", weights.sizes(),
              " ", weights.scalar_type());
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0) && gate_up.size(2) == D &&
                  down.size(1) == D && gate_up.size(1) == 2 * down.size(2),
              "moe_experts' gate_up must be [P, 2I, ", D, "] and down [P, ", D, ", I], got ", gate_up.sizes(), " and ",
              down.sizes());
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type(),
              "moe_experts' weights must be of x's dtype ", x.scalar_type(), ", got ", gate_up.scalar_type(), " and ",
              down.scalar_type());
  TORCH_CHECK(gate_up.stride(1) == 1 && down.stride(1) == 1,
              "moe_experts' gate_up and down must have their second dim contiguous, got strides ", gate_up.strides(),
              " and ", down.strides());
  const int64_t P = gate_up.size(0), I = down.size(2);
  TORCH_CHECK(D % kCols == 0 && I % kCols == 0, "moe_experts' hidden and intermediate sizes must be multiples of ",
              kCols, ", got ", D, " and ", I);
  const auto slots = slot_ids.contiguous();
  const auto gate_weights = weights.to(at::kFloat).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  // the pairs (token * K + k) sorted by slot, stably: offsets[e] to offsets[e + 1] are slot e's
  std::vector<int64_t> offsets(P + 1, 0), pairs(T * K);
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(sp[p] >= 0 && sp[p] < P, "moe_experts' slot ", sp[p], " outside the ", P, " slots");
    ++offsets[sp[p] + 1];
  }
  for (int64_t e = 0; e < P; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t p = 0; p < T * K; ++p) pairs[next[sp[p]]++] = p;
  auto out = at::empty({T, D}, x.options());
  dispatch_dtype(x.scalar_type(), "moe_experts", [&](auto zero) {
    run_experts<decltype(zero)>(x, offsets, pairs, gate_weights.data_ptr<float>(), gate_up, down, K, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("moe_experts", &moe_experts); }
