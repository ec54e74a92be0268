// SwiGLU feed-forward layers on the CPU: a MoE layer's routed experts, each run on just the tokens routed to it, and
// a dense MLP (a dense layer's, or the shared experts'), as one expert every token uses: see ffn.py.
//
// The (token, expert) pairs are sorted by expert (a counting sort). Each expert's gate and up projections then run
// on its pairs' rows in tiles of up to 8 rows x 32 columns (`tile`); silu(gate) * up times the pair's gate weight
// is rounded to the input's dtype (as the tensor operations round it), and the down projection, 32 output columns
// of every expert at a time, sums each token's rows in float32 and rounds them once. Threads take runs of (expert,
// 32-column block) tasks of about equal rows for the gate and up projections, 32-column blocks for the down one.
// The weights are packed for the tiles (`pack`); in bfloat16 on a CPU with AVX512-BF16 the products are
// `vdpbf16ps`, elsewhere float32 FMAs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tiles.h"
#include "vec.h"

namespace {

using namespace tandem;

constexpr int64_t kTaskCost = 8;  // a task's cost beyond its rows (reading its weights), in rows

// The weights of P experts as the tiles read them (`pack`ed): expert e's gate, up and down projections' block b of
// 32 columns, the experts `*_expert_stride` apart
template <typename X>
struct FFNWeights {
  const X *gate, *up, *down;
  int64_t D, I, gate_up_expert_stride, down_expert_stride;

  Columns<X> gate_columns(int64_t e, int64_t b) const { return packed_block(gate + e * gate_up_expert_stride, D, b); }
  Columns<X> up_columns(int64_t e, int64_t b) const { return packed_block(up + e * gate_up_expert_stride, D, b); }
  Columns<X> down_columns(int64_t e, int64_t b) const { return packed_block(down + e * down_expert_stride, I, b); }
};

// The FFN of T tokens of K experts each (x [T, D] of dtype X, intermediate size I) into out [T, D]: pairs (token
// * K + k) sorted by expert, offsets[e] to offsets[e + 1] expert e's; each pair's intermediate times its gate weight
// (none: 1).
template <typename X>
void run_ffn(const at::Tensor& x, const std::vector<int64_t>& offsets, const std::vector<int64_t>& pairs,
             const float* gate_weights, const FFNWeights<X>& w, int64_t K, int64_t I, at::Tensor& out) {
  const int64_t T = x.size(0), D = x.size(1), P = static_cast<int64_t>(offsets.size()) - 1, N = T * K;
  const X* xp = x.data_ptr<X>();
  std::vector<X> hidden(N * I);  // each pair's silu(gate) * up * gate weight, by expert
  // the gate and up projections, 32 columns of each at a time: a task per (expert with rows, column block)
  std::vector<int64_t> task_expert, task_block, costs;
  for (int64_t e = 0; e < P; ++e)
    for (int64_t b = 0; b < I / kCols && offsets[e + 1] > offsets[e]; ++b) {
      task_expert.push_back(e), task_block.push_back(b);
      costs.push_back(offsets[e + 1] - offsets[e] + kTaskCost);
    }
  run_tasks(costs, [&](int64_t i) {
    const int64_t e = task_expert[i], c0 = task_block[i] * kCols;
    const Columns<X> gate = w.gate_columns(e, task_block[i]), up = w.up_columns(e, task_block[i]);
    const X* a[kMaxRows];
    float g[kMaxRows * kCols], u[kMaxRows * kCols];
    for (int64_t start = offsets[e]; start < offsets[e + 1]; start += kMaxRows) {
      const int64_t m = std::min(kMaxRows, offsets[e + 1] - start);
      for (int64_t r = 0; r < m; ++r) a[r] = xp + pairs[start + r] / K * x.stride(0);
      tile_rows(m, a, gate, D, g);
      tile_rows(m, a, up, D, u);
      for (int64_t r = 0; r < m; ++r) {
        const float scale = gate_weights ? gate_weights[pairs[start + r]] : 1.0f;
        for (int64_t v = 0; v < kCols; v += 16)
          store_float(hidden.data() + (start + r) * I + c0 + v,
                      silu(load(g + r * kCols + v)) * load(u + r * kCols + v) * scale);
      }
    }
  });
  // the down projection, 32 output columns at a time over every expert, each token's rows summed in float32 (in
  // the order of its experts' slots) and rounded once
  X* op = out.data_ptr<X>();
  run_tasks(std::vector<int64_t>(D / kCols, 1), [&](int64_t b) {
    const int64_t c0 = b * kCols;
    std::vector<float> sums(T * kCols, 0.0f);  // the tokens' outputs in these columns
    const X* a[kMaxRows];
    float y[kMaxRows * kCols];
    for (int64_t e = 0; e < P; ++e) {
      const Columns<X> down = w.down_columns(e, b);
      for (int64_t start = offsets[e]; start < offsets[e + 1]; start += kMaxRows) {
        const int64_t m = std::min(kMaxRows, offsets[e + 1] - start);
        for (int64_t r = 0; r < m; ++r) a[r] = hidden.data() + (start + r) * I;
        tile_rows(m, a, down, I, y);
        for (int64_t r = 0; r < m; ++r) {
          float* sum = sums.data() + pairs[start + r] / K * kCols;
          for (int64_t v = 0; v < kCols; v += 16) store(sum + v, load(sum + v) + load(y + r * kCols + v));
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t v = 0; v < kCols; v += 16) store_float(op + t * D + c0 + v, load(sums.data() + t * kCols + v));
  });
}

void check_sizes(int64_t D, int64_t I, const char* op) {
  TORCH_CHECK(D % kCols == 0 && I % kCols == 0, op, "'s hidden and intermediate sizes must be multiples of ", kCols,
              ", got ", D, " and ", I);
}

// Each token's sum over its K experts (slot_ids [T, K], local slots) of weight [T, K] * the expert's FFN, the
// weight scaling the expert's intermediate: down(silu(gate(x)) * up(x) * weight). x [T, D]; gate_up [P, 2I, D]
// (each expert's gate rows, then its up rows) and down [P, D, I], of x's dtype, `pack`ed for the tiles; D and I
// multiples of 32.
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& slot_ids, const at::Tensor& weights,
                       const at::Tensor& gate_up, const at::Tensor& down) {
  check_rows(x, "moe_experts' x");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(slot_ids.dim() == 2 && slot_ids.size(0) == T && slot_ids.scalar_type() == at::kLong,
              "moe_experts' slot_ids must be [", T, ", K] int64, got ", slot_ids.sizes(), " ", slot_ids.scalar_type());
  const int64_t K = slot_ids.size(1);
  TORCH_CHECK(K >= 1, "moe_experts needs at least one expert per token");
  TORCH_CHECK(weights.sizes() == slot_ids.sizes() && at::isFloatingType(weights.scalar_type()),
              "moe_experts' weights must be floats of slot_ids' shape ", slot_ids.sizes(), ", got ", weights.sizes(),
              " ", weights.scalar_type());
  TORCH_CHECK(gate_up.dim() == 4 && down.dim() == 4 && gate_up.size(0) == down.size(0),
              "moe_experts' gate_up and down must be [P, 2I, D] and [P, D, I] packed for the tiles, got ",
              gate_up.sizes(), " and ", down.sizes());
  const int64_t P = gate_up.size(0), I = down.size(2);
  check_sizes(D, I, "moe_experts");
  check_packed(gate_up, 2 * I, D, x.scalar_type(), "moe_experts' gate_up");
  check_packed(down, D, I, x.scalar_type(), "moe_experts' down");
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
    using X = decltype(zero);
    const X* gu = gate_up.data_ptr<X>();
    const FFNWeights<X> w{gu, gu + I * D, down.data_ptr<X>(), D, I, 2 * I * D, D * I};
    run_ffn(x, offsets, pairs, gate_weights.data_ptr<float>(), w, K, I, out);
  });
  return out;
}

// down(silu(gate(x)) * up(x)) of a dense SwiGLU MLP: x [T, D]; gate and up [I, D] and down [D, I] (nn.Linear's
// weights) of x's dtype, `pack`ed for the tiles; D and I multiples of 32.
at::Tensor mlp(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down) {
  check_rows(x, "mlp's x");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(gate.dim() == 3 && down.dim() == 3, "mlp's gate, up and down must be single weights packed for the "
              "tiles, got ", gate.sizes(), ", ", up.sizes(), " and ", down.sizes());
  const int64_t I = down.size(1);
  check_sizes(D, I, "mlp");
  check_packed(gate, I, D, x.scalar_type(), "mlp's gate");
  check_packed(up, I, D, x.scalar_type(), "mlp's up");
  check_packed(down, D, I, x.scalar_type(), "mlp's down");
  std::vector<int64_t> offsets{0, T}, pairs(T);
  for (int64_t t = 0; t < T; ++t) pairs[t] = t;
  auto out = at::empty({T, D}, x.options());
  dispatch_dtype(x.scalar_type(), "mlp", [&](auto zero) {
    using X = decltype(zero);
    const FFNWeights<X> w{gate.data_ptr<X>(), up.data_ptr<X>(), down.data_ptr<X>(), D, I, 0, 0};
    run_ffn(x, offsets, pairs, nullptr, w, 1, I, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("mlp", &mlp);
}
