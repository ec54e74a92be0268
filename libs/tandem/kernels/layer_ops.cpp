// Elementwise layer operations of an eager forward on the CPU, each one pass over its rows: see layer_ops.py.
//
// Every value is computed in float32 from the inputs' dtype and rounded to it once, where the tensor operations
// they replace round after each operation (and pass over memory once per operation).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "vec.h"

namespace {

using namespace tandem;

constexpr int64_t kGrainElements = 1 << 15;  // below this many elements a call runs on one thread

template <typename T>
T from_float(float x);
template <>
float from_float<float>(float x) {
  return x;
}
template <>
c10::Half from_float<c10::Half>(float x) {
  return c10::Half(x);
}
template <>
c10::BFloat16 from_float<c10::BFloat16>(float x) {  // round to nearest even, as c10's conversion, in bit operations
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(std::isnan(x) ? uint16_t{0x7FC0} : rounded, c10::BFloat16::from_bits());
}

int64_t grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

// RMSNorm as DeepSeek's reference computes it: x normalised in float32, rounded to x's dtype, times the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm's x");
  const int64_t rows = x.size(0), D = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.scalar_type() == x.scalar_type(),
              "rms_norm's weight must be [", D, "] of x's dtype, got ", weight.sizes(), " ", weight.scalar_type());
  const auto w = weight.contiguous();
  auto out = at::empty({rows, D}, x.options());
  dispatch_dtype(x.scalar_type(), "rms_norm", [&](auto zero) {
    using T = decltype(zero);
    const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t stride = x.stride(0);
    at::parallel_for(0, rows, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + r * stride;
        T* o = op + r * D;
        const int64_t vectors = D / 16 * 16;
        f16 squares = {};
        for (int64_t d = 0; d < vectors; d += 16) {
          const f16 v = load_float(xr + d);
          squares += v * v;
        }
        float sum = 0.0f;
        for (int i = 0; i < 16; ++i) sum += squares[i];
        for (int64_t d = vectors; d < D; ++d) sum += to_float(xr[d]) * to_float(xr[d]);
        const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
        for (int64_t d = 0; d < vectors; d += 16)
          store_float(o + d, load_float(wp + d) * round_to<T>(load_float(xr + d) * inv));
        for (int64_t d = vectors; d < D; ++d)
          o[d] = from_float<T>(to_float(wp[d]) * to_float(from_float<T>(to_float(xr[d]) * inv)));
      }
    });
  });
  return out;
}

// Rotary embedding of x [T, H, R] (rows of R contiguous) by cos and sin [T, R/2] of x's dtype. With `interleave`
// the rotated pairs are (x0, x1), (x2, x3), ..., else the two halves; either way the output [T, H, R] is laid out
// as [rotated evens | rotated odds].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleave) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope's x must be a CPU [T, heads, R] tensor with contiguous rows of even R, got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), R = x.size(2), half = R / 2;
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->numel() == T * half && table->is_contiguous() && table->scalar_type() == x.scalar_type(),
                "rope's cos and sin must be contiguous [", T, ", ", half, "] of x's dtype, got ", table->sizes(), " ",
                table->scalar_type());
  auto out = at::empty({T, H, R}, x.options());
  dispatch_dtype(x.scalar_type(), "rope", [&](auto zero) {
    using Scalar = decltype(zero);
    const Scalar *xp = x.data_ptr<Scalar>(), *cp = cos.data_ptr<Scalar>(), *sp = sin.data_ptr<Scalar>();
    Scalar* op = out.data_ptr<Scalar>();
    const int64_t st = x.stride(0), sh = x.stride(1), first = interleave ? 2 : 1, second = interleave ? 1 : half;
    at::parallel_for(0, T, grain(H * R), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Scalar *c = cp + t * half, *s = sp + t * half;
        for (int64_t h = 0; h < H; ++h) {
          const Scalar* xr = xp + t * st + h * sh;
          Scalar* o = op + (t * H + h) * R;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float a = to_float(xr[i * first]), b = to_float(xr[i * first + second]);
            const float ci = to_float(c[i]), si = to_float(s[i]);
            o[i] = from_float<Scalar>(a * ci - b * si);
            o[i + half] = from_float<Scalar>(b * ci + a * si);
          }
        }
      }
    });
  });
  return out;
}

// silu(gate) * up [N, I], each row times scale[row] where given (a routed expert's gate weight per token).
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& scale) {
  check_rows(gate, "silu_mul's gate");
  check_rows(up, "silu_mul's up");
  TORCH_CHECK(up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(),
              "silu_mul's gate and up must have one shape and dtype, got ", gate.sizes(), " ", gate.scalar_type(),
              " and ", up.sizes(), " ", up.scalar_type());
  const int64_t N = gate.size(0), I = gate.size(1);
  at::Tensor scales;
  if (scale) {
    TORCH_CHECK(scale->numel() == N, "silu_mul's scale must hold one value per row (", N, "), got ", scale->sizes());
    scales = scale->to(at::kFloat).contiguous();
  }
  auto out = at::empty({N, I}, gate.options());
  dispatch_dtype(gate.scalar_type(), "silu_mul", [&](auto zero) {
    using T = decltype(zero);
    const T *gp = gate.data_ptr<T>(), *upp = up.data_ptr<T>();
    const float* sc = scale ? scales.data_ptr<float>() : nullptr;
    T* op = out.data_ptr<T>();
    const int64_t gs = gate.stride(0), us = up.stride(0);
    at::parallel_for(0, N, grain(I), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T *gr = gp + r * gs, *ur = upp + r * us;
        T* o = op + r * I;
        const float s = sc ? sc[r] : 1.0f;
        int64_t i0 = 0;
        for (; i0 + 16 <= I; i0 += 16) {
          store_float(o + i0, silu(load_float(gr + i0)) * load_float(ur + i0) * s);
        }
        for (int64_t i = i0; i < I; ++i) {
          const float g = to_float(gr[i]);
          o[i] = from_float<T>(g / (1.0f + std::exp(-g)) * to_float(ur[i]) * s);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
}
