// Row-wise loops of the fused decode step (decode_step.cpp) and the greedy pick of a token:
// layer norm, GPT-2's GELU and argmax over one row. Written as plain `omp simd` loops compiled
// for AVX-512, AVX2 and the baseline (PICK_ISA_AT_LOAD, kernels.h); the GELU's exponential is a
// polynomial so that it vectorizes (a libm call would not).
//
// Why not ATen's: at batch 1 a decode step ran 36 ATen layer norms and GELUs, ~100 views and
// ~130 small allocations between the linears while the second thread waited (docs/benchmarks.md, "Decode
// speed", step 9). The results differ from
// ATen's in the last bits (another summation order, another tanh), so the fused step matches the
// Python layer loop to a tolerance, not bit for bit (tests/test_fused_decode.py).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

PICK_ISA_AT_LOAD
void layer_norm_row(const float* x, const float* weight, const float* bias, int64_t C, float eps, float* out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < C; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(C);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < C; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
  if (bias) {
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) out[i] = (x[i] - mean) * rstd * weight[i];
  }
}

// The exponential and the GELU loop only: no-trapping-math lets GCC turn the clamps into blends
// (if-conversion of float compares), so the loop vectorizes; no value changes.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
namespace {
// e^x, Cephes' expf: range reduction by ln 2, a degree-5 polynomial, 2^n from the exponent bits
// (relative error ~2e-7). No branches or calls, so an `omp simd` loop vectorizes it.
inline float exp_poly(float x) {
  // Clamped so that 2^n stays a normal float (NaN becomes 88: no undefined conversion below).
  // Plain compares, not std::min/max: those are compiled outside this file's optimize region
  // and GCC would not inline them here, which stops the loop from vectorizing.
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;  // in [-125.6, 127]
  const int32_t n = static_cast<int32_t>(t + 126.5f) - 126;  // round to nearest (truncation of a positive)
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;  // ln 2 in two parts, so r keeps its low bits
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * __builtin_bit_cast(float, (n + 127) << 23);
}
}  // namespace

PICK_ISA_AT_LOAD
void gelu_tanh_inplace(float* x, int64_t n) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float z = kSqrt2OverPi * (v + 0.044715f * v * v * v);
    x[i] = v / (1.f + exp_poly(-2.f * z));  // = 0.5 v (1 + tanh z)
  }
}
#pragma GCC pop_options

PICK_ISA_AT_LOAD
int64_t argmax_row(const float* values, int64_t n) {
  float best = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const float v = values[i];
    best = v > best ? v : best;
    nan |= v != v;
  }
  // The first index that matches, 64 values at a time with a vector compare (an element-by-element
  // search with its early exit does not vectorize: ~1 ns a value, half the row on average).
  for (int64_t start = 0; start < n; start += 64) {
    const int64_t stop = std::min(n, start + 64);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = start; i < stop; ++i) hit |= nan ? values[i] != values[i] : values[i] == best;
    if (hit)
      for (int64_t i = start; i < stop; ++i)
        if (nan ? values[i] != values[i] : values[i] == best) return i;
  }
  return 0;  // n == 0
}

// (B, V) float32 logits -> (B,) int64: each row's argmax, as torch.argmax(dim=-1) (56-76 us for
// a 50257-wide row on the AVX2 build machine; this ~20, Python call included).
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 &&
                  logits.size(1) > 0,
              "argmax_rows: logits must be a non-empty (B, V) float32 on the CPU, got ", logits.sizes());
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  const float* values = logits.data_ptr<float>();
  int64_t* picks = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) picks[r] = argmax_row(values + r * n, n);
  });
  return out;
}
