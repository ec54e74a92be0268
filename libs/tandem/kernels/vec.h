// Vector helpers shared by the CPU kernels: 16-float vectors with GCC/Clang vector extensions (compiled to the
// machine's own vector width by -march=native), conversions of the cache and weight dtypes, and an exponential.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace tandem {

typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef double d8 __attribute__((vector_size(64)));
typedef uint32_t u16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));

inline f16 load(const float* p) {
  f16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, f16 v) { std::memcpy(p, &v, sizeof v); }

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {  // a shift, which vectorises, where the conversion operator may not
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 values of a dtype as floats, and back (bfloat16 rounded to nearest even, as c10 converts): whole vectors,
// where a loop over c10's scalar conversions does not vectorise
inline f16 load_float(const float* p) { return load(p); }
inline f16 load_float(const c10::BFloat16* p) {
  h16 half;
  std::memcpy(&half, p, sizeof half);
  const u16 bits = __builtin_convertvector(half, u16) << 16;
  f16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline f16 load_float(const c10::Half* p) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return load(v);
}

inline void store_float(float* p, f16 v) { store(p, v); }
inline void store_float(c10::BFloat16* p, f16 v) {
  u16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  u16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = (u16)(v != v) ? u16{} + 0x7FC0u : rounded;  // NaN stays NaN
  const h16 half = __builtin_convertvector(rounded, h16);
  std::memcpy(p, &half, sizeof half);
}
inline void store_float(c10::Half* p, f16 v) {
  float f[16];
  store(f, v);
  for (int i = 0; i < 16; ++i) p[i] = c10::Half(f[i]);
}

// v rounded to T's precision (what a tensor operation in T leaves between two others)
template <typename T>
inline f16 round_to(f16 v) {
  T t[16];
  store_float(t, v);
  return load_float(t);
}
template <>
inline f16 round_to<float>(f16 v) {
  return v;
}

// e^x lane-wise for x <= 0: 2^n * 2^f, n = floor(x log2 e), 2^f by a degree-6 polynomial on [0, 1)
// (relative error about 2e-7); below -87 it is 0 to float32, within 2e-38
inline f16 exp_nonpositive(f16 x) {
  const f16 lowest = f16{} - 87.0f;
  x = x < lowest ? lowest : x;
  f16 t = x * 1.44269504088896341f;
  i16 n = __builtin_convertvector(t, i16);    // toward zero, so n or n - 1 is floor(t)
  n += __builtin_convertvector(n, f16) > t;   // true is -1
  f16 f = t - __builtin_convertvector(n, f16);
  f16 p = 1.535336188319500e-4f * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  i16 bits = (n + 127) << 23;
  f16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// sigmoid(g) lane-wise, from e = exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, else e / (1 + e)
inline f16 sigmoid(f16 g) {
  const f16 zero = f16{};
  const f16 e = exp_nonpositive(g < zero ? g : zero - g);
  return (g < zero ? e : zero + 1.0f) / (1.0f + e);
}

// silu(g) = g * sigmoid(g) lane-wise
inline f16 silu(f16 g) { return g * sigmoid(g); }

// n values from `from` to `to`, 16 at a time in copies of a fixed size, which the compiler inlines: for rows of a few
// dozen values a call of memmove (what std::copy_n makes of them) cost more than the copy
template <typename T>
inline void copy_values(const T* from, int64_t n, T* to) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) std::memcpy(to + i, from + i, 16 * sizeof(T));
  for (; i < n; ++i) to[i] = from[i];
}

// n floats as T (bfloat16 rounded to nearest even, as c10 rounds), 16 at a time
template <typename T>
inline void round_values(const float* from, int64_t n, T* to) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store_float(to + i, load(from + i));
  for (; i < n; ++i) to[i] = T(from[i]);
}

// A kernel's [rows, columns] input `what` on the CPU, each row contiguous (rows may be strided), or a clear error
inline void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, what,
              " must be a CPU [rows, columns] tensor with contiguous rows, got ", t.sizes(), " strides ", t.strides());
}

// f(T{}) with T the C++ type of a float32, bfloat16 or float16 dtype
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, " takes float32, bfloat16 or float16, got ", dtype);
  }
}

#if defined(__AVX512BF16__)
// The index by which _mm512_permutex2var_epi16(row0, index, row1) interleaves columns offset to offset + 15 of two
// rows of 32 bfloat16 values into a pair per column, (row0's, row1's): the operand `vdpbf16ps` sums the products of
inline __m512i pair_rows_index(int offset) {
  alignas(64) int16_t index[32];
  for (int i = 0; i < 32; ++i) index[i] = static_cast<int16_t>((i & 1) << 5 | (offset + (i >> 1)));
  return _mm512_load_si512(index);
}
#endif

}  // namespace tandem
