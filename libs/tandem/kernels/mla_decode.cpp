// Weight-absorbed MLA attention of decode steps over the paged latent cache, on the CPU: see mla_decode.py.
//
// Each thread takes a run of query rows (a sequence's token, with its heads): their no-rope queries absorbed into
// the latent (W_UK, in the register tiles of tiles.h), then one row at a time its keys read from the cache blocks
// its block table names, scored against every head, softmaxed and summed into the attended latent, and the rows'
// latents projected to each head's value (W_UV, in tiles); nothing of [batch, context] size is written.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tiles.h"
#include "vec.h"

namespace {

using namespace tandem;

// Keys go in pairs: a vector's 16 lanes are 8 heads x 2 keys, lane 2h + j for head h and key j of the pair.
constexpr int64_t kHeads = 8;   // heads per vector
constexpr int64_t kPairs = 8;   // key pairs scored together, each with its own accumulator
constexpr int64_t kLatent = 16; // latent columns summed together per head (two vectors of 8 columns x 2 keys)
constexpr int64_t kPrefetchPairs = 4;  // key pairs ahead whose cache rows are prefetched
constexpr i16 kSwapPairs = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
constexpr i16 kEvenLanes = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};

// the two floats at p in every pair of lanes
inline f16 broadcast_pair(const float* p) {
  double x;
  std::memcpy(&x, p, sizeof x);
  d8 v = {x, x, x, x, x, x, x, x};
  f16 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// lane i and its pair's other lane, combined
inline f16 pair_max(f16 v) {
  f16 w = __builtin_shuffle(v, kSwapPairs);
  return v > w ? v : w;
}
inline f16 pair_sum(f16 v) { return v + __builtin_shuffle(v, kSwapPairs); }

// Scratch of one query row's attention over num_keys positions, with G = H / 8 groups of heads:
// keys [pairs, D, 2], the pair's two keys' values interleaved; queries [D, G, 16], each head's (scaled) value
// twice; probs [pairs, G, 16]. A missing second key of the last pair is zeros, its score -inf.
struct Scratch {
  std::vector<float> keys, queries, probs, inv_sum;
  // attend_row_bf16's: cache rows of the keys, key and query pairs, probabilities as bfloat16 pairs
  std::vector<const c10::BFloat16*> rows;
  std::vector<uint64_t> key_pairs;
  std::vector<uint32_t> query_pairs, prob_pairs, head_pairs;
};

template <typename cache_t>
void gather_keys(const cache_t* cache, const int64_t* block_table, int64_t num_keys, int64_t block_size,
                 int64_t D, float* keys) {
  // position s is offset `offset` of block `block` of the table, kept by increments (a division per key cost
  // more than the key's conversion)
  auto row = [&](int64_t block, int64_t offset) { return cache + (block_table[block] * block_size + offset) * D; };
  int64_t block = 0, offset = 0;
  for (int64_t s = 0; s < num_keys; s += 2) {
    const cache_t* a = row(block, offset);
    if (++offset == block_size) offset = 0, ++block;
    float* k = keys + s * D;  // = pair * 2D
    if (s + 1 < num_keys) {
      const cache_t* b = row(block, offset);
      if (++offset == block_size) offset = 0, ++block;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        k[2 * d] = to_float(a[d]);
        k[2 * d + 1] = to_float(b[d]);
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        k[2 * d] = to_float(a[d]);
        k[2 * d + 1] = 0.0f;
      }
    }
  }
}

// out [H, C] = softmax(scale * q [H, D] . keys^T) . keys[:, :C] over the first num_keys positions of a sequence,
// q being each head's absorbed query q_latent [H, C], then its rope query q_pe [H, D - C]
template <typename cache_t>
void attend_row(const float* q_latent, const float* q_pe, const cache_t* cache, const int64_t* block_table,
                int64_t num_keys, int64_t block_size, int64_t H, int64_t D, int64_t C, float scale, Scratch& scratch,
                float* out) {
  const int64_t G = H / kHeads, pairs = (num_keys + 1) / 2;
  scratch.keys.resize(pairs * D * 2);
  scratch.queries.resize(D * G * 16);
  scratch.probs.resize(pairs * G * 16);
  scratch.inv_sum.resize(G * 16);
  float *keys = scratch.keys.data(), *queries = scratch.queries.data(), *probs = scratch.probs.data();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      float* lanes = queries + (d * G + h / kHeads) * 16 + 2 * (h % kHeads);
      lanes[0] = lanes[1] = (d < C ? q_latent[h * C + d] : q_pe[h * (D - C) + d - C]) * scale;
    }
  gather_keys(cache, block_table, num_keys, block_size, D, keys);
  for (int64_t g = 0; g < G; ++g) {
    // scores, 8 pairs at a time: a pair's values broadcast into every pair of lanes, times the heads' queries
    int64_t p = 0;
    for (; p + kPairs <= pairs; p += kPairs) {
      f16 acc[kPairs] = {};
      for (int64_t d = 0; d < D; ++d) {
        f16 qd = load(queries + (d * G + g) * 16);
#pragma GCC unroll 8
        for (int64_t j = 0; j < kPairs; ++j) acc[j] += broadcast_pair(keys + ((p + j) * D + d) * 2) * qd;
      }
#pragma GCC unroll 8
      for (int64_t j = 0; j < kPairs; ++j) store(probs + ((p + j) * G + g) * 16, acc[j]);
    }
    for (; p < pairs; ++p) {
      f16 acc = {};
      for (int64_t d = 0; d < D; ++d) acc += broadcast_pair(keys + (p * D + d) * 2) * load(queries + (d * G + g) * 16);
      store(probs + (p * G + g) * 16, acc);
    }
    if (num_keys % 2)
      for (int64_t h = 0; h < kHeads; ++h) probs[((pairs - 1) * G + g) * 16 + 2 * h + 1] = -INFINITY;
    // softmax per head, over both lanes of every pair
    f16 mx = load(probs + g * 16);
    for (int64_t p = 1; p < pairs; ++p) {
      f16 v = load(probs + (p * G + g) * 16);
      mx = v > mx ? v : mx;
    }
    mx = pair_max(mx);
    f16 sum = {};
    for (int64_t p = 0; p < pairs; ++p) {
      f16 e = exp_nonpositive(load(probs + (p * G + g) * 16) - mx);
      store(probs + (p * G + g) * 16, e);
      sum += e;
    }
    store(scratch.inv_sum.data() + g * 16, 1.0f / pair_sum(sum));
    // the attended latent, 8 heads x 16 columns at a time: lanes (column, key of the pair), summed at the end
    const float* inv_sum = scratch.inv_sum.data() + g * 16;
    for (int64_t c0 = 0; c0 < C; c0 += kLatent) {
      f16 acc[kHeads][2] = {};
      for (int64_t p = 0; p < pairs; ++p) {
        f16 k0 = load(keys + (p * D + c0) * 2), k1 = load(keys + (p * D + c0 + 8) * 2);
        const float* pp = probs + (p * G + g) * 16;
#pragma GCC unroll 8
        for (int64_t h = 0; h < kHeads; ++h) {
          f16 ph = broadcast_pair(pp + 2 * h);
          acc[h][0] += ph * k0;
          acc[h][1] += ph * k1;
        }
      }
#pragma GCC unroll 8
      for (int64_t h = 0; h < kHeads; ++h) {
        f16 both = __builtin_shuffle(pair_sum(acc[h][0]), pair_sum(acc[h][1]), kEvenLanes);
        store(out + (g * kHeads + h) * C + c0, both * inv_sum[2 * h]);
      }
    }
  }
}

#if defined(__AVX512BF16__)
// attend_row for a bfloat16 cache whose latent width C is a multiple of 32, in `vdpbf16ps` products, each summing
// two bfloat16 products in float32: the scores' queries and the latent sum's probabilities rounded to bfloat16
// (what a GPU's bfloat16 attention rounds), the keys read as cached. Scores take a pair of keys' (d, d + 1) values
// per lane pair (2h + j: head h, key j of the pair), the latent sum a pair of keys per column, both interleaved
// from the cache rows as they are read.
void attend_row_bf16(const float* q_latent, const float* q_pe, const c10::BFloat16* cache, const int64_t* block_table,
                     int64_t num_keys, int64_t block_size, int64_t H, int64_t D, int64_t C, float scale,
                     Scratch& scratch, float* out) {
  const int64_t G = H / kHeads, pairs = (num_keys + 1) / 2, D2 = D / 2;
  const __m512i low = pair_rows_index(0), high = pair_rows_index(16);
  // rows[s]: key s's cache row; a missing second key of the last pair repeats the first (its probability is 0)
  scratch.rows.resize(2 * pairs);
  for (int64_t s = 0, block = 0, offset = 0; s < num_keys; ++s) {
    scratch.rows[s] = cache + (block_table[block] * block_size + offset) * D;
    if (++offset == block_size) offset = 0, ++block;
  }
  if (num_keys % 2) scratch.rows[num_keys] = scratch.rows[num_keys - 1];
  const c10::BFloat16* const* rows = scratch.rows.data();
  // keys [pairs, D/2] of 64 bits: the first key's (d, d + 1) values, then the second's (zeros where missing),
  // 8 at a time: 32-bit lanes of the two rows interleaved
  scratch.key_pairs.resize(pairs * D2 + 8);
  alignas(64) int32_t interleave[16];
  for (int i = 0; i < 16; ++i) interleave[i] = (i & 1) << 4 | i >> 1;
  const __m512i take = _mm512_load_si512(interleave);
  for (int64_t p = 0; p < pairs; ++p) {
    // the keys a few pairs on, from wherever their blocks lie: the hardware prefetchers follow a block, not the
    // jump to the next
    if (p + kPrefetchPairs < pairs)
      for (int64_t j = 0; j < 2; ++j)
        for (int64_t byte = 0; byte < 2 * D; byte += 64)
          _mm_prefetch(reinterpret_cast<const char*>(rows[2 * (p + kPrefetchPairs) + j]) + byte, _MM_HINT_T0);
    const bool both = 2 * p + 1 < num_keys;
    uint64_t* k = scratch.key_pairs.data() + p * D2;
    for (int64_t d2 = 0; d2 < D2; d2 += 8) {
      const __mmask16 valid = static_cast<__mmask16>(D2 - d2 >= 8 ? 0xFF : (1u << (D2 - d2)) - 1);
      const __m512i a = _mm512_maskz_loadu_epi32(valid, rows[2 * p] + 2 * d2);
      const __m512i b = both ? _mm512_maskz_loadu_epi32(valid, rows[2 * p + 1] + 2 * d2) : _mm512_setzero_si512();
      _mm512_storeu_si512(k + d2, _mm512_permutex2var_epi32(a, take, b));  // may spill into the next pair's start
    }
  }
  // queries [D/2, G, 16] of bfloat16 pairs: lane 2h + j holds head h's (d, d + 1) values, scaled, for both keys j;
  // each head's latent values rounded to bfloat16 32 at a time (to nearest even, as c10 rounds), its rope values a
  // pair at a time, then spread over the lanes
  scratch.query_pairs.resize(D2 * G * 16);
  scratch.head_pairs.resize(D2);
  uint32_t* head = scratch.head_pairs.data();  // one head's pairs
  const __m512 scales = _mm512_set1_ps(scale);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t d = 0; d < C; d += 32) {
      const __m512 low_half = _mm512_mul_ps(_mm512_loadu_ps(q_latent + h * C + d), scales);
      const __m512 high_half = _mm512_mul_ps(_mm512_loadu_ps(q_latent + h * C + d + 16), scales);
      _mm512_storeu_si512(head + d / 2, (__m512i)_mm512_cvtne2ps_pbh(high_half, low_half));
    }
    for (int64_t d = C; d < D; d += 2) {
      const c10::BFloat16 two[2] = {c10::BFloat16(q_pe[h * (D - C) + d - C] * scale),
                                    c10::BFloat16(q_pe[h * (D - C) + d + 1 - C] * scale)};
      std::memcpy(head + d / 2, two, sizeof two);
    }
    uint32_t* lanes = scratch.query_pairs.data() + h / kHeads * 16 + 2 * (h % kHeads);
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      const uint64_t both = head[d2] * 0x100000001ull;  // the pair in both keys' lanes
      std::memcpy(lanes + d2 * G * 16, &both, sizeof both);
    }
  }
  scratch.probs.resize(pairs * G * 16);
  scratch.prob_pairs.resize(pairs * kHeads);
  float* probs = scratch.probs.data();
  for (int64_t g = 0; g < G; ++g) {
    int64_t p = 0;
    const uint32_t* queries = scratch.query_pairs.data() + g * 16;
    for (; p + kPairs <= pairs; p += kPairs) {
      __m512 acc[kPairs];
      for (int64_t j = 0; j < kPairs; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d2 = 0; d2 < D2; ++d2) {
        const __m512bh qd = (__m512bh)_mm512_loadu_si512(queries + d2 * G * 16);
        const uint64_t* k = scratch.key_pairs.data() + p * D2 + d2;
#pragma GCC unroll 8
        for (int64_t j = 0; j < kPairs; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi64(k[j * D2]), qd);
      }
      for (int64_t j = 0; j < kPairs; ++j) _mm512_storeu_ps(probs + ((p + j) * G + g) * 16, acc[j]);
    }
    for (; p < pairs; ++p) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d2 = 0; d2 < D2; ++d2)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi64(scratch.key_pairs[p * D2 + d2]),
                               (__m512bh)_mm512_loadu_si512(queries + d2 * G * 16));
      _mm512_storeu_ps(probs + (p * G + g) * 16, acc);
    }
    if (num_keys % 2)
      for (int64_t h = 0; h < kHeads; ++h) probs[((pairs - 1) * G + g) * 16 + 2 * h + 1] = -INFINITY;
    f16 mx = load(probs + g * 16);
    for (int64_t p = 1; p < pairs; ++p) {
      const f16 v = load(probs + (p * G + g) * 16);
      mx = v > mx ? v : mx;
    }
    mx = pair_max(mx);
    f16 sum = {};
    // the probabilities, unnormalised, as bfloat16 pairs: lanes 2h and 2h + 1 are head h's two keys
    for (int64_t p = 0; p < pairs; ++p) {
      const f16 e = exp_nonpositive(load(probs + (p * G + g) * 16) - mx);
      sum += e;
      __m512 ev;
      std::memcpy(&ev, &e, sizeof ev);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(scratch.prob_pairs.data() + p * kHeads),
                          (__m256i)_mm512_cvtneps_pbh(ev));
    }
    float inv_sum[16];
    store(inv_sum, 1.0f / pair_sum(sum));
    // the attended latent, 32 columns at a time: lanes are columns, each summing a pair of keys
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      __m512 acc[kHeads][2];
      for (int64_t h = 0; h < kHeads; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512i row0 = _mm512_loadu_si512(rows[2 * p] + c0), row1 = _mm512_loadu_si512(rows[2 * p + 1] + c0);
        const __m512bh k0 = (__m512bh)_mm512_permutex2var_epi16(row0, low, row1);
        const __m512bh k1 = (__m512bh)_mm512_permutex2var_epi16(row0, high, row1);
        const uint32_t* pp = scratch.prob_pairs.data() + p * kHeads;
#pragma GCC unroll 8
        for (int64_t h = 0; h < kHeads; ++h) {
          const __m512bh ph = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[h]));
          acc[h][0] = _mm512_dpbf16_ps(acc[h][0], ph, k0);
          acc[h][1] = _mm512_dpbf16_ps(acc[h][1], ph, k1);
        }
      }
      for (int64_t h = 0; h < kHeads; ++h) {
        const __m512 inv = _mm512_set1_ps(inv_sum[2 * h]);
        _mm512_storeu_ps(out + (g * kHeads + h) * C + c0, _mm512_mul_ps(acc[h][0], inv));
        _mm512_storeu_ps(out + (g * kHeads + h) * C + c0 + 16, _mm512_mul_ps(acc[h][1], inv));
      }
    }
  }
}
#endif

// Rows [begin, end) of a step: their queries absorbed into the latent (q_nope . W_UK per head), attended
// (`attend_row`, or `attend_row_bf16` where it serves), and the attended latents projected to each head's value
// (. W_UV^T). Both projections run head by head over all the rows, in the register tiles of tiles.h over weights
// packed for them (`uk_tiles`: W_UK^T [C, N] per head, `uv_tiles`: W_UV [V, C]), bfloat16 products where the cache
// is bfloat16: the queries came from bfloat16, the attended latent is rounded to it (as a bfloat16 GPU rounds it).
template <typename cache_t>
void attend_rows(int64_t begin, int64_t end, const float* q_nope, const float* q_pe, const cache_t* uk_tiles,
                 const cache_t* uv_tiles, const cache_t* cache, const int64_t* block_tables, const int64_t* positions,
                 int64_t Q, int64_t N, int64_t H, int64_t NH, int64_t V, int64_t C, int64_t R, int64_t block_size,
                 float scale, float* out) {
  // the rows' operands of the tiles: bfloat16 for a bfloat16 cache, else float32
  using A = std::conditional_t<std::is_same_v<cache_t, c10::BFloat16>, c10::BFloat16, float>;
  const int64_t rows = end - begin, C_blocks = (C + kCols - 1) / kCols, V_blocks = (V + kCols - 1) / kCols;
  std::vector<A> operands(rows * H * std::max(NH, C));
  std::vector<float> latent(rows * H * C);
  // q_latent[r, h, :] = sum_n q_nope[r, h, n] W_UK[h, n, :]
  round_values(q_nope + begin * H * NH, rows * H * NH, operands.data());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t b = 0; b < C_blocks; ++b)
      rows_times_block(operands.data() + h * NH, H * NH, rows,
                       packed_block(uk_tiles + h * C_blocks * NH * kCols, NH, b), NH, std::min(kCols, C - b * kCols),
                       latent.data() + h * C + b * kCols, H * C);
  auto attend = attend_row<cache_t>;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<cache_t, c10::BFloat16>)
    if (C % 32 == 0 && R % 2 == 0) attend = attend_row_bf16;
#endif
  Scratch scratch;
  std::vector<float> attended(H * C);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = begin + r;
    attend(latent.data() + r * H * C, q_pe + i * H * R, cache, block_tables + (i / Q) * N, positions[i] + 1,
           block_size, H, C + R, C, scale, scratch, attended.data());
    std::copy(attended.begin(), attended.end(), latent.begin() + r * H * C);  // the row's query is spent
  }
  // out[r, h, :] = latent[r, h, :] . W_UV[h]^T
  round_values(latent.data(), rows * H * C, operands.data());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t b = 0; b < V_blocks; ++b)
      rows_times_block(operands.data() + h * C, H * C, rows, packed_block(uv_tiles + h * V_blocks * C * kCols, C, b),
                       C, std::min(kCols, V - b * kCols), out + (begin * H + h) * V + b * kCols, H * V);
}

at::Tensor mla_paged_decode(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& uk_tiles,
                            const at::Tensor& uv_tiles, int64_t value_dim, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& positions, int64_t block_size,
                            double scale) {
  TORCH_CHECK(q_nope.device().is_cpu() && cache.device().is_cpu(), "mla_paged_decode runs on the CPU");
  TORCH_CHECK(q_nope.dim() == 4 && q_nope.scalar_type() == at::kFloat && q_pe.dim() == 4 &&
                  q_pe.scalar_type() == at::kFloat && q_pe.sizes().slice(0, 3) == q_nope.sizes().slice(0, 3),
              "q_nope and q_pe must be [B, Q, H, *] float32, got ", q_nope.sizes(), " ", q_nope.scalar_type(),
              " and ", q_pe.sizes(), " ", q_pe.scalar_type());
  const int64_t B = q_nope.size(0), Q = q_nope.size(1), H = q_nope.size(2), NH = q_nope.size(3), R = q_pe.size(3);
  const int64_t V = value_dim;
  TORCH_CHECK(H % kHeads == 0, "the heads must be a multiple of ", kHeads, ", got ", H);
  TORCH_CHECK(cache.dim() == 2 && cache.is_contiguous(), "cache must be contiguous [slots, C + R], got ",
              cache.sizes());
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16 ||
                  cache.scalar_type() == at::kHalf,
              "cache must be float32, bfloat16 or float16, got ", cache.scalar_type());
  const int64_t C = cache.size(1) - R;
  TORCH_CHECK(C > 0 && C % kLatent == 0, "the cache's latent width must be a multiple of ", kLatent, ", got ", C);
  TORCH_CHECK(V > 0 && uk_tiles.dim() == 4 && uk_tiles.size(0) == H && uv_tiles.dim() == 4 && uv_tiles.size(0) == H,
              "uk_tiles and uv_tiles must be ", H, " heads' W_UK^T and W_UV packed for the tiles, got ",
              uk_tiles.sizes(), " and ", uv_tiles.sizes(), " (value dim ", V, ")");
  check_packed(uk_tiles, C, NH, cache.scalar_type(), "uk_tiles (W_UK^T, per head)");
  check_packed(uv_tiles, V, C, cache.scalar_type(), "uv_tiles (W_UV, per head)");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong,
              "block_tables must be [", B, ", N] int64");
  TORCH_CHECK(positions.numel() == B * Q && positions.scalar_type() == at::kLong, "positions must be [", B * Q,
              "] int64");
  const auto qn = q_nope.contiguous(), qp = q_pe.contiguous();
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
  auto out = at::empty({B, Q, H, V}, q_nope.options());
  dispatch_dtype(cache.scalar_type(), "mla_paged_decode", [&](auto zero) {
    using cache_t = decltype(zero);
    at::parallel_for(0, B * Q, 1, [&](int64_t begin, int64_t end) {
      attend_rows(begin, end, qn.data_ptr<float>(), qp.data_ptr<float>(), uk_tiles.data_ptr<cache_t>(),
                  uv_tiles.data_ptr<cache_t>(), cache.data_ptr<cache_t>(), tp, pp, Q, N, H, NH, V, C, R, block_size,
                  static_cast<float>(scale), out.data_ptr<float>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) { m.impl("mla_paged_decode", &mla_paged_decode); }
