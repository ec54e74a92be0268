// DeepSeekMoE's routing on the CPU, one pass over each token's router logits: see routing.py.
//
// Per token: the sigmoid scores (16 at a time), the bias-corrected choice values, each group's best two summed, the
// best groups kept, the top-k experts of those by insertion into a sorted list of k (ties: the lower index first),
// and their uncorrected scores normalised and scaled as the gating weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

using namespace tandem;

constexpr int64_t kGrainScores = 1 << 13;  // expert scores a thread takes at least

// The k largest of values[i] for the indices i in [0, n) that `allowed(i)` names, into ids in descending order of
// value, ties in ascending order of index; at least k indices must be allowed.
template <typename Allowed>
void top_k(const float* values, int64_t n, int64_t k, const Allowed& allowed, int64_t* ids) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!allowed(i) || (kept == k && !(values[i] > values[ids[k - 1]]))) continue;
    int64_t p = kept < k ? kept++ : k - 1;  // the slot it takes before moving up
    for (; p > 0 && values[i] > values[ids[p - 1]]; --p) ids[p] = ids[p - 1];
    ids[p] = i;
  }
}

// (weights [T, K] float32, expert ids [T, K] int64) from router logits [T, E] float32 and the correction bias [E]
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k_experts,
                                         int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                         double routed_scaling_factor) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "route's logits must be CPU [tokens, experts] float32, got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t T = logits.size(0), E = logits.size(1), K = top_k_experts;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == E && bias.scalar_type() == at::kFloat,
              "route's bias must be [", E, "] float32, got ", bias.sizes(), " ", bias.scalar_type());
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "route's ", E, " experts do not split into ", n_group, " groups");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "route's topk_group must be in [1, ", n_group, "], got ",
              topk_group);
  TORCH_CHECK(K >= 1 && K <= topk_group * (E / n_group), "route cannot pick ", K, " experts from ", topk_group,
              " groups of ", E / n_group);
  const auto x = logits.contiguous(), b = bias.contiguous();
  auto weights = at::empty({T, K}, logits.options());
  auto ids = at::empty({T, K}, logits.options().dtype(at::kLong));
  const float *xp = x.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t group_size = E / n_group, best_per_group = std::min<int64_t>(2, group_size);
  const float scale = static_cast<float>(routed_scaling_factor);
  at::parallel_for(0, T, std::max<int64_t>(1, kGrainScores / E), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(E), choice(E), group_scores(n_group);
    std::vector<int64_t> best(best_per_group), groups(topk_group);
    std::vector<char> kept_group(n_group);
    for (int64_t t = begin; t < end; ++t) {
      int64_t e = 0;
      for (; e + 16 <= E; e += 16) {
        const f16 s = sigmoid(load(xp + t * E + e));
        store(scores.data() + e, s);
        store(choice.data() + e, s + load(bp + e));
      }
      if (e < E) {  // the last E % 16 through a padded vector: every score from the same exponential
        float tail[16] = {};
        copy_values(xp + t * E + e, E - e, tail);
        store(tail, sigmoid(load(tail)));
        for (int64_t i = 0; e + i < E; ++i) {
          scores[e + i] = tail[i];
          choice[e + i] = tail[i] + bp[e + i];
        }
      }
      if (n_group > 1) {  // a group is as good as its best two
        for (int64_t g = 0; g < n_group; ++g) {
          const float* in_group = choice.data() + g * group_size;
          top_k(in_group, group_size, best_per_group, [](int64_t) { return true; }, best.data());
          group_scores[g] = 0.0f;
          for (const int64_t i : best) group_scores[g] += in_group[i];
        }
        top_k(group_scores.data(), n_group, topk_group, [](int64_t) { return true; }, groups.data());
        std::fill(kept_group.begin(), kept_group.end(), 0);
        for (const int64_t g : groups) kept_group[g] = 1;
      }
      int64_t* chosen = ip + t * K;
      top_k(choice.data(), E, K, [&](int64_t e) { return n_group == 1 || kept_group[e / group_size]; }, chosen);
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += scores[chosen[k]];
      const float denominator = norm_topk_prob ? sum + 1e-20f : 1.0f;
      for (int64_t k = 0; k < K; ++k) wp[t * K + k] = scores[chosen[k]] / denominator * scale;
    }
  });
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("route", &route); }
