// Causal attention of prompts over their own expanded keys and values on the CPU: see prompt_attention.py.
//
// A task is one (sequence, head): its queries gathered into [L, E] rows and its keys packed as the tiles read a
// weight (`pack`), each from its no-rope part and its rope part (the rope key one row for every head), and its
// values copied into a [L, V] buffer (keys and values zero-padded, so that tiles may read whole blocks); then 8 query
// rows at a time: their scores over the keys up to the block's last row in register tiles (`tiles.h`), softmax in
// float32 with the future masked, the probabilities rounded to the inputs' dtype, and their product with the values
// normalised. Threads take runs of tasks of about equal L^2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tiles.h"
#include "vec.h"

namespace {

using namespace tandem;

constexpr f16 kLanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Rows [T, H, N + R] given as their two parts, each part's dims contiguous: (t, h)'s first N values at
// nope + t * nope_t + h * nope_h, its last R at rope + t * rope_t + h * rope_h (rope_h 0: one rope row for every
// head, as MLA's rope key)
template <typename X>
struct SplitRows {
  const X *nope, *rope;
  int64_t nope_t, nope_h, rope_t, rope_h, N, R;

  SplitRows(const at::Tensor& nope_part, const at::Tensor& rope_part)
      : nope(nope_part.data_ptr<X>()), rope(rope_part.data_ptr<X>()), nope_t(nope_part.stride(0)),
        nope_h(nope_part.stride(1)), rope_t(rope_part.stride(0)),
        rope_h(rope_part.dim() == 3 ? rope_part.stride(1) : 0), N(nope_part.size(2)), R(rope_part.size(-1)) {}

  void copy(int64_t t, int64_t h, X* row) const {
    copy_values(nope + t * nope_t + h * nope_h, N, row);
    copy_values(rope + t * rope_t + h * rope_h, R, row + N);
  }
};

template <typename X>
void attend_sequence(const SplitRows<X>& q, const SplitRows<X>& k, const at::Tensor& v, int64_t start,
                     int64_t length, int64_t h, float scale, at::Tensor& out) {
  const int64_t E = q.N + q.R, V = v.size(2), padded = (length + kCols - 1) / kCols * kCols;
  const X* vp = v.data_ptr<X>();
  X* op = out.data_ptr<X>();
  // queries [L, E]; keys as the weight of the scores' tiles, [L, E] packed (`pack`: blocks of 32 positions, in
  // pairs of key dims where the tiles take pairs, then moved 32 bits at a time); values [L, V]
  const bool paired = packs_pairs(c10::CppTypeToScalarType<X>::value, E);
  // (value-initialised: zero bits, set in one pass, where a fill with X(0.0f) converted element by element)
  std::vector<X> queries(length * E), key(E), keys(E * padded), values(padded * V);
  for (int64_t j = 0; j < length; ++j) {
    q.copy(start + j, h, queries.data() + j * E);
    k.copy(start + j, h, key.data());
    X* block = keys.data() + j / kCols * kCols * E;
    if (paired) {
      for (int64_t e = 0; e < E; e += 2)
        std::memcpy(block + e * kCols + 2 * (j % kCols), key.data() + e, 2 * sizeof(X));
    } else {
      for (int64_t e = 0; e < E; ++e) block[e * kCols + j % kCols] = key[e];
    }
    copy_values(vp + (start + j) * v.stride(0) + h * v.stride(1), V, values.data() + j * V);
  }
  std::vector<float> scores(kMaxRows * padded), tile_out(kMaxRows * kCols);
  std::vector<X> probs(kMaxRows * padded);
  float inv_sum[kMaxRows];
  const X* a[kMaxRows];
  for (int64_t r0 = 0; r0 < length; r0 += kMaxRows) {
    const int64_t m = std::min(kMaxRows, length - r0), seen = r0 + m;  // keys 0 .. seen - 1
    const int64_t blocks = (seen + kCols - 1) / kCols, even = (seen + 1) / 2 * 2;
    for (int64_t r = 0; r < m; ++r) a[r] = queries.data() + (r0 + r) * E;
    for (int64_t b = 0; b < blocks; ++b) {
      tile_rows(m, a, packed_block(keys.data(), E, b), E, tile_out.data());
      for (int64_t r = 0; r < m; ++r)
        copy_values(tile_out.data() + r * kCols, kCols, scores.data() + r * padded + b * kCols);
    }
    for (int64_t r = 0; r < m; ++r) {
      // whole vectors of 16 scores, the future's masked: -inf before the max, 0 after the exponential
      const int64_t visible = r0 + r + 1, whole = (visible + 15) / 16 * 16;
      float* s = scores.data() + r * padded;
      std::fill(s + visible, s + whole, -INFINITY);
      f16 most = load(s);
      for (int64_t j = 16; j < whole; j += 16) {
        const f16 v = load(s + j);
        most = v > most ? v : most;
      }
      float mx = most[0];
      for (int i = 1; i < 16; ++i) mx = std::max(mx, most[i]);
      mx *= scale;  // scale > 0 commutes with max
      X* p = probs.data() + r * padded;
      f16 sums = {};
      for (int64_t j = 0; j < whole; j += 16) {
        const f16 e = exp_nonpositive(load(s + j) * scale - mx);
        const f16 kept = (kLanes + static_cast<float>(j)) < static_cast<float>(visible) ? e : f16{};
        store_float(p + j, kept);
        sums += kept;
      }
      float sum = 0.0f;
      for (int i = 0; i < 16; ++i) sum += sums[i];
      std::fill(p + whole, p + std::max(whole, even), X(0.0f));
      inv_sum[r] = 1.0f / sum;
      a[r] = p;
    }
    for (int64_t c0 = 0; c0 < V; c0 += kCols) {
      tile_rows(m, a, Columns<X>{values.data() + c0, V}, even, tile_out.data());
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < kCols; c += 16)
          store_float(op + (start + r0 + r) * out.stride(0) + h * out.stride(1) + c0 + c,
                      load(tile_out.data() + r * kCols + c) * inv_sum[r]);
    }
  }
}

// Each sequence of `lengths` (one after another along T) attending causally to itself: queries q_nope [T, H, N] and
// q_pe [T, H, R], keys k_nope [T, H, N] and k_pe [T, R] (one rope key for every head), values v [T, H, V], of one
// dtype, each row's last dim contiguous; V a multiple of 32, N + R even. Returns [T, H, V].
at::Tensor prompt_attention(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& k_nope,
                            const at::Tensor& k_pe, const at::Tensor& v, at::IntArrayRef lengths, double scale) {
  TORCH_CHECK(q_nope.device().is_cpu() && q_nope.dim() == 3 && k_nope.sizes() == q_nope.sizes() && q_pe.dim() == 3 &&
                  q_pe.sizes().slice(0, 2) == q_nope.sizes().slice(0, 2) && k_pe.dim() == 2 &&
                  k_pe.size(0) == q_nope.size(0) && k_pe.size(1) == q_pe.size(2) && v.dim() == 3 &&
                  v.sizes().slice(0, 2) == q_nope.sizes().slice(0, 2),
              "prompt_attention's q_nope and k_nope must be CPU [T, H, N], q_pe [T, H, R], k_pe [T, R] and v "
              "[T, H, V], got ", q_nope.sizes(), ", ", k_nope.sizes(), ", ", q_pe.sizes(), ", ", k_pe.sizes(), " and ",
              v.sizes());
  const auto dtype = q_nope.scalar_type();
  for (const auto* t : {&q_pe, &k_nope, &k_pe, &v}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prompt_attention's queries, keys and values must have one dtype");
    TORCH_CHECK(t->stride(-1) == 1, "prompt_attention's inputs must have their last dim contiguous");
  }
  TORCH_CHECK(q_nope.stride(2) == 1, "prompt_attention's inputs must have their last dim contiguous");
  const int64_t T = q_nope.size(0), H = q_nope.size(1), E = q_nope.size(2) + q_pe.size(2), V = v.size(2);
  TORCH_CHECK(V % kCols == 0 && E % 2 == 0, "prompt_attention's value dim must be a multiple of ", kCols,
              " and its key dim even, got ", V, " and ", E);
  std::vector<int64_t> starts;
  int64_t total = 0;
  for (const int64_t n : lengths) {
    TORCH_CHECK(n > 0, "prompt_attention's lengths must be positive, got ", n);
    starts.push_back(total);
    total += n;
  }
  TORCH_CHECK(total == T, "prompt_attention's lengths sum to ", total, ", not the ", T, " tokens of the queries");
  auto out = at::empty({T, H, V}, v.options());
  const int64_t S = static_cast<int64_t>(lengths.size());
  std::vector<int64_t> costs(S * H);
  for (int64_t i = 0; i < S * H; ++i) costs[i] = lengths[i / H] * lengths[i / H] + 64;
  dispatch_dtype(dtype, "prompt_attention", [&](auto zero) {
    using X = decltype(zero);
    const SplitRows<X> q(q_nope, q_pe), k(k_nope, k_pe);
    run_tasks(costs, [&](int64_t i) {
      attend_sequence<X>(q, k, v, starts[i / H], lengths[i / H], i % H, static_cast<float>(scale), out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("prompt_attention", &prompt_attention); }
