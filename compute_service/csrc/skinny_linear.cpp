// y = x @ W^T * scale + bias for a few rows of x (decode: one row per running sequence),
// reading each weight row from memory once for the whole batch.
//
// x      (M, K) float32, M small (the engine sends M <= SKINNY_MAX_ROWS, see linear.py)
// W      (N, K) float32 | bfloat16 (raw uint16 bits) | int8
// scale  (N,) float32 per output row (int8 only; empty otherwise)
// bias   (N,) float32 or empty
// y      (M, N) float32
//
// Why: at decode batch sizes a linear layer is a matrix-vector product, bound by the bytes of W.
// MKL's small-M sgemm streams W at ~18 GB/s on the AMD machines we measured (docs/benchmarks.md, "Decode
// speed"); this loop reaches the machine's read bandwidth. Output rows are split into contiguous
// ranges, one per thread; each thread reads its slab as kRows long sequential streams (the
// slab's kRows equal parts side by side, skinny_linear_isa.h: linear_rows); a tile of one row
// from each part x up to kBatch input rows keeps kRows x kBatch accumulators in registers, and
// every weight vector loaded is used for all kBatch rows of x (which stay in L1).
// bf16 and int8 weights are widened to float32 in registers: the multiply-adds are float32, only
// the bytes read shrink (2x, 4x).
//
// Build policy (docs/architecture.md, "Native kernels"): the file is compiled for the baseline; the loops
// (skinny_linear_isa.h) are compiled twice more inside target regions, AVX-512 (namespace
// isa_avx512) and AVX2+FMA (isa_avx2), and the entry point picks one per call from what this CPU
// reports. A CPU with neither gets an error here; linear.py then uses torch's F.linear.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace isa_avx512 {
struct Vec {
  using type = __m512;
  static constexpr int64_t kLanes = 16;
  static inline __attribute__((always_inline)) type zero() { return _mm512_setzero_ps(); }
  static inline __attribute__((always_inline)) type load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __attribute__((always_inline)) type load(const uint16_t* p) {  // bfloat16: bits << 16
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  }
  static inline __attribute__((always_inline)) type load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline __attribute__((always_inline)) type fma(type a, type b, type acc) { return _mm512_fmadd_ps(a, b, acc); }
  static inline __attribute__((always_inline)) float sum(type v) { return _mm512_reduce_add_ps(v); }
};
constexpr int kRows = 4, kBatch = 4;  // 16 accumulators of 32 registers
#include "skinny_linear_isa.h"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
struct Vec {
  using type = __m256;
  static constexpr int64_t kLanes = 8;
  static inline __attribute__((always_inline)) type zero() { return _mm256_setzero_ps(); }
  static inline __attribute__((always_inline)) type load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __attribute__((always_inline)) type load(const uint16_t* p) {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  }
  static inline __attribute__((always_inline)) type load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline __attribute__((always_inline)) type fma(type a, type b, type acc) { return _mm256_fmadd_ps(a, b, acc); }
  static inline __attribute__((always_inline)) float sum(type v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
constexpr int kRows = 4, kBatch = 2;  // 8 accumulators + 4 weight vectors of 16 registers
#include "skinny_linear_isa.h"
}  // namespace isa_avx2
#pragma GCC pop_options

namespace {
constexpr int64_t kRowsPerTask = 4;  // thread ranges in multiples of 4 rows (both ISAs' kRows)

enum class Isa { kNone, kAvx2, kAvx512 };
Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kNone;
}
const Isa kIsa = detect_isa();

template <typename W>
void linear_rows(const float* x, const W* w, int64_t M, int64_t K, int64_t N, int64_t begin, int64_t end,
                 const float* scale, const float* bias, float* y) {
  if (kIsa == Isa::kAvx512) {
    isa_avx512::linear_rows(x, w, M, K, N, begin, end, scale, bias, y);
  } else {
    isa_avx2::linear_rows(x, w, M, K, N, begin, end, scale, bias, y);
  }
}
}  // namespace

SkinnyWeight skinny_weight(const torch::Tensor& weight, const torch::Tensor& scale, const torch::Tensor& bias) {
  TORCH_CHECK(kIsa != Isa::kNone, "skinny_linear needs AVX2+FMA or AVX-512 (use F.linear)");
  // The kernel reads N x K weights and N scales and biases through raw pointers: CPU memory of those shapes.
  for (const auto* t : {&weight, &scale, &bias})
    TORCH_CHECK(t->device().is_cpu(), "skinny_linear: weight, scale and bias must be on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (N, K)");
  TORCH_CHECK(weight.size(1) % 16 == 0, "K must be a multiple of 16");
  const auto wtype = weight.scalar_type();
  TORCH_CHECK(wtype == torch::kFloat32 || wtype == torch::kBFloat16 || wtype == torch::kChar,
              "weight must be float32, bfloat16 or int8");
  const int64_t N = weight.size(0);
  const bool has_scale = scale.numel() > 0, has_bias = bias.numel() > 0;
  TORCH_CHECK(wtype == torch::kChar ? has_scale : !has_scale, "int8 weights need per-row scales, others none");
  TORCH_CHECK(!has_scale || (scale.scalar_type() == torch::kFloat32 && scale.numel() == N && scale.is_contiguous()),
              "scale must be float32 (N,)");
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "bias must be float32 (N,)");
  const auto type = wtype == torch::kFloat32 ? SkinnyWeight::Type::kFloat32
                    : wtype == torch::kBFloat16 ? SkinnyWeight::Type::kBFloat16 : SkinnyWeight::Type::kInt8;
  return SkinnyWeight{weight.data_ptr(), type, N, weight.size(1), has_scale ? scale.data_ptr<float>() : nullptr,
                      has_bias ? bias.data_ptr<float>() : nullptr};
}

void skinny_rows(const float* x, const SkinnyWeight& w, int64_t M, int64_t row_begin, int64_t row_end, float* y) {
  const int64_t K = w.cols, N = w.rows;
  switch (w.type) {
    case SkinnyWeight::Type::kFloat32:
      linear_rows(x, static_cast<const float*>(w.data), M, K, N, row_begin, row_end, w.scale, w.bias, y);
      break;
    case SkinnyWeight::Type::kBFloat16:  // raw bits, widened in registers
      linear_rows(x, static_cast<const uint16_t*>(w.data), M, K, N, row_begin, row_end, w.scale, w.bias, y);
      break;
    case SkinnyWeight::Type::kInt8:
      linear_rows(x, static_cast<const int8_t*>(w.data), M, K, N, row_begin, row_end, w.scale, w.bias, y);
      break;
  }
}

void thread_rows(int64_t N, int64_t thread, int64_t threads, int64_t* begin, int64_t* end) {
  const int64_t tiles = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t per_thread = (tiles + threads - 1) / threads;
  *begin = std::min(N, thread * per_thread * kRowsPerTask);
  *end = std::min(N, (thread + 1) * per_thread * kRowsPerTask);
}

// "avx512", "avx2" or "" (no kernel: the caller uses torch).
std::string skinny_linear_isa() {
  return kIsa == Isa::kAvx512 ? "avx512" : kIsa == Isa::kAvx2 ? "avx2" : "";
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(x.device().is_cpu(), "skinny_linear: x must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x (M, K) and weight (N, K), got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x ", x.sizes(), " and weight ", weight.sizes(),
              " disagree on K");
  const SkinnyWeight w = skinny_weight(weight, scale, bias);
  x = x.contiguous();
  auto y = torch::empty({x.size(0), w.rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Ranges of whole tiles per thread, so each thread streams one contiguous slab of W.
  const int64_t tiles = (w.rows + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    skinny_rows(xp, w, x.size(0), begin * kRowsPerTask, std::min(w.rows, end * kRowsPerTask), yp);
  });
  return y;
}
