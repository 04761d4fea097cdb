// The machine's streaming read bandwidth, for the benchmarks' roofline (bench/roofline.py builds
// this file as its own extension: a benchmark tool, not part of the serving kernels): sum a large float32
// buffer with every thread. Each thread reads its slab as kStreams interleaved sequential
// streams (as the skinny kernel reads several weight rows at once), 64 bytes per stream a step
// (as 4x16 bytes in the baseline loop), into independent accumulators, with the widest loads
// this CPU has. Only loads and adds: the variants need avx512f or avx2 alone (the skinny kernel,
// which multiplies, asks for more: FMA, AVX-512 BW/VL/DQ).
//
// Why not plain vectors and target_clones (the first version): GCC's 64-byte generic vectors
// compiled for AVX2 spill to the stack every step, and even clean 16-byte SSE loads measured
// 15 GB/s on a Zen 3 machine where AVX2 loads read 22-26 GB/s (and llama.cpp's decode implied
// 17): the probe measured its own loop, not the memory. Same build policy as the skinny kernel
// (docs/architecture.md, "Native kernels"): baseline code plus AVX2 and AVX-512 target regions, one picked by
// what the CPU reports.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define READ_PROBE_X86 1
#endif

#include <cstring>
#include <vector>

namespace {
constexpr int kStreams = 4;
constexpr int64_t kStepFloats = 16;  // 64 bytes per stream per step

#ifdef READ_PROBE_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace isa_avx512 {  // the names the objdump test knows as AVX-512 variants
float stream_sum(const float* p, int64_t per_stream) {
  __m512 acc[kStreams];
  for (int s = 0; s < kStreams; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t i = 0; i < per_stream; i += kStepFloats)
    for (int s = 0; s < kStreams; ++s) acc[s] = _mm512_add_ps(acc[s], _mm512_loadu_ps(p + s * per_stream + i));
  for (int s = 1; s < kStreams; ++s) acc[0] = _mm512_add_ps(acc[0], acc[s]);
  return _mm512_reduce_add_ps(acc[0]);
}
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
float stream_sum(const float* p, int64_t per_stream) {
  __m256 lo[kStreams], hi[kStreams];
  for (int s = 0; s < kStreams; ++s) lo[s] = hi[s] = _mm256_setzero_ps();
  for (int64_t i = 0; i < per_stream; i += kStepFloats)
    for (int s = 0; s < kStreams; ++s) {
      lo[s] = _mm256_add_ps(lo[s], _mm256_loadu_ps(p + s * per_stream + i));
      hi[s] = _mm256_add_ps(hi[s], _mm256_loadu_ps(p + s * per_stream + i + 8));
    }
  __m256 t = _mm256_setzero_ps();
  for (int s = 0; s < kStreams; ++s) t = _mm256_add_ps(t, _mm256_add_ps(lo[s], hi[s]));
  float out[8];
  _mm256_storeu_ps(out, t);
  float total = 0.f;
  for (float v : out) total += v;
  return total;
}
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

float sum_baseline(const float* p, int64_t per_stream) {
  typedef float v4 __attribute__((vector_size(16)));
  v4 acc[kStreams] = {};
  for (int64_t i = 0; i < per_stream; i += 4)
    for (int s = 0; s < kStreams; ++s) {
      v4 v;
      std::memcpy(&v, p + s * per_stream + i, sizeof v);
      acc[s] += v;
    }
  float total = 0.f;
  for (int s = 0; s < kStreams; ++s) total += acc[s][0] + acc[s][1] + acc[s][2] + acc[s][3];
  return total;
}

using SumFn = float (*)(const float*, int64_t);
SumFn pick() {
#ifdef READ_PROBE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return isa_avx512::stream_sum;
  if (__builtin_cpu_supports("avx2")) return isa_avx2::stream_sum;
#endif
  return sum_baseline;
}
const SumFn kSum = pick();
}  // namespace

// Sum of a contiguous float32 buffer whose length is a multiple of kChunk (64) floats: the work
// is split in whole steps of every stream; the caller times it. Returns the sum so the reads
// cannot be optimised away.
double stream_read_sum(torch::Tensor buffer) {
  constexpr int64_t kChunk = kStreams * kStepFloats;  // one step of every stream
  TORCH_CHECK(buffer.scalar_type() == torch::kFloat32 && buffer.is_contiguous(), "contiguous float32 buffer");
  TORCH_CHECK(buffer.numel() % kChunk == 0, "buffer length must be a multiple of ", kChunk, " floats");
  const float* p = buffer.data_ptr<float>();
  const int64_t chunks = buffer.numel() / kChunk;
  const int threads = at::get_num_threads();
  std::vector<double> partial(threads, 0.0);
  at::parallel_for(0, chunks, (chunks + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    partial[at::get_thread_num()] += kSum(p + begin * kChunk, (end - begin) * kStepFloats);
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read_sum", &stream_read_sum, "sum of a float32 buffer read by every thread (bandwidth probe)");
}
