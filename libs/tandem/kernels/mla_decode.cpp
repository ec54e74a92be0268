// Weight-absorbed MLA attention of decode steps over the paged latent cache, on the CPU: see mla_decode.py.
//
// One query row (a sequence's token, with its heads) at a time: its keys are read from the cache blocks its
// block table names, converted to float32 once into a buffer of the thread's own, scored against every head,
// softmaxed, and summed into the attended latent; nothing of [batch, context] size is written to memory.
// Written with GCC/Clang vector extensions, which compile to the machine's own vector width.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));

constexpr int64_t kHeads = 8;    // heads per vector of scores
constexpr int64_t kKeys = 8;     // keys scored together, each with its own accumulator
constexpr int64_t kLatent = 32;  // latent columns summed together per head (two 16-float vectors)

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {  // a shift, which vectorises, where the conversion operator may not
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x lane-wise for x <= 0: 2^n * 2^f, n = floor(x log2 e), 2^f by a degree-6 polynomial on [0, 1)
// (relative error about 2e-7); below -87 it is 0 to float32 anyway
inline f8 exp_nonpositive(f8 x) {
  const f8 floor_x = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
  x = x < floor_x ? floor_x : x;
  f8 t = x * 1.44269504088896341f;
  i8 n = __builtin_convertvector(t, i8);        // toward zero, so n or n + 1 is floor(t)
  n += __builtin_convertvector(n, f8) > t;      // true is -1
  f8 f = t - __builtin_convertvector(n, f8);
  f8 p = 1.535336188319500e-4f * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  i8 bits = (n + 127) << 23;
  f8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// out [H, C] = softmax(scale * q [H, D] . keys^T) . keys[:, :C] over the first num_keys positions of a sequence.
// Scratch: keys [num_keys, D], qt [D, H], probs [num_keys, H].
template <typename cache_t>
void attend_row(const float* q, const cache_t* cache, const int64_t* block_table, int64_t num_keys,
                int64_t block_size, int64_t H, int64_t D, int64_t C, float scale, float* keys, float* qt,
                float* probs, float* out) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) qt[d * H + h] = q[h * D + d] * scale;
  for (int64_t s = 0; s < num_keys; ++s) {
    const cache_t* row = cache + (block_table[s / block_size] * block_size + s % block_size) * D;
    float* k = keys + s * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) k[d] = to_float(row[d]);
  }
  // scores, 8 heads x 8 keys at a time: the heads are a vector's lanes, each key's value a broadcast
  for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
    int64_t s = 0;
    for (; s + kKeys <= num_keys; s += kKeys) {
      f8 acc[kKeys] = {};
      const float* k = keys + s * D;
      for (int64_t d = 0; d < D; ++d) {
        f8 qd = load<f8>(qt + d * H + h0);
#pragma GCC unroll 8
        for (int64_t j = 0; j < kKeys; ++j) acc[j] += k[j * D + d] * qd;
      }
#pragma GCC unroll 8
      for (int64_t j = 0; j < kKeys; ++j) store(probs + (s + j) * H + h0, acc[j]);
    }
    for (; s < num_keys; ++s) {
      f8 acc = {};
      const float* k = keys + s * D;
      for (int64_t d = 0; d < D; ++d) acc += k[d] * load<f8>(qt + d * H + h0);
      store(probs + s * H + h0, acc);
    }
  }
  // softmax per head; the heads' 1 / sum go where the queries were (qt is no longer read)
  float* inv_sum = qt;
  for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
    f8 mx = load<f8>(probs + h0), sum = {};
    for (int64_t s = 1; s < num_keys; ++s) {
      f8 v = load<f8>(probs + s * H + h0);
      mx = v > mx ? v : mx;
    }
    for (int64_t s = 0; s < num_keys; ++s) {
      f8 e = exp_nonpositive(load<f8>(probs + s * H + h0) - mx);
      store(probs + s * H + h0, e);
      sum += e;
    }
    store(inv_sum + h0, 1.0f / sum);
  }
  // the attended latent, 8 heads x 32 columns at a time
  for (int64_t h0 = 0; h0 < H; h0 += kHeads) {
    for (int64_t c0 = 0; c0 < C; c0 += kLatent) {
      f16 acc[kHeads][2] = {};
      for (int64_t s = 0; s < num_keys; ++s) {
        f16 k0 = load<f16>(keys + s * D + c0), k1 = load<f16>(keys + s * D + c0 + 16);
        const float* p = probs + s * H + h0;
#pragma GCC unroll 8
        for (int64_t h = 0; h < kHeads; ++h) {
          acc[h][0] += p[h] * k0;
          acc[h][1] += p[h] * k1;
        }
      }
#pragma GCC unroll 8
      for (int64_t h = 0; h < kHeads; ++h) {
        store(out + (h0 + h) * C + c0, acc[h][0] * inv_sum[h0 + h]);
        store(out + (h0 + h) * C + c0 + 16, acc[h][1] * inv_sum[h0 + h]);
      }
    }
  }
}

at::Tensor mla_paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                            const at::Tensor& positions, int64_t block_size, int64_t latent_dim, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "mla_paged_decode runs on the CPU");
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat, "q must be [B, Q, H, D] float32, got ", q.sizes(),
              " ", q.scalar_type());
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3), C = latent_dim;
  TORCH_CHECK(H % kHeads == 0, "the heads must be a multiple of ", kHeads, ", got ", H);
  TORCH_CHECK(C % kLatent == 0 && C <= D, "latent_dim must be a multiple of ", kLatent, " and at most ", D,
              ", got ", C);
  TORCH_CHECK(cache.dim() == 2 && cache.size(1) == D && cache.is_contiguous(), "cache must be contiguous [slots, ",
              D, "], got ", cache.sizes());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong,
              "block_tables must be [", B, ", N] int64");
  TORCH_CHECK(positions.numel() == B * Q && positions.scalar_type() == at::kLong, "positions must be [", B * Q,
              "] int64");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto pos = positions.contiguous();
  const int64_t N = tables.size(1), num_blocks = cache.size(0) / block_size;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * Q; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < N * block_size, "position ", pp[i], " outside the ", N * block_size,
                " positions of the block table");
  for (int64_t i = 0; i < B * N; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < num_blocks, "block ", tp[i], " outside the cache's ", num_blocks);
  auto out = at::empty({B, Q, H, C}, q.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto run = [&](auto* cp) {
    at::parallel_for(0, B * Q, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> keys, probs, qt(D * H);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t num_keys = pp[i] + 1;
        keys.resize(num_keys * D);
        probs.resize(num_keys * H);
        attend_row(qp + i * H * D, cp, tp + (i / Q) * N, num_keys, block_size, H, D, C, static_cast<float>(scale),
                   keys.data(), qt.data(), probs.data(), op + i * H * C);
      }
    });
  };
  switch (cache.scalar_type()) {
    case at::kFloat: run(cache.data_ptr<float>()); break;
    case at::kBFloat16: run(cache.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(cache.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "cache must be float32, bfloat16 or float16, got ", cache.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tandem, m) {
  m.def("mla_paged_decode(Tensor q, Tensor cache, Tensor block_tables, Tensor positions, int block_size, "
        "int latent_dim, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("mla_paged_decode", &mla_paged_decode); }
