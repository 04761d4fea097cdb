// The machine's streaming read bandwidth, for the benchmark's roofline: sum a large float32
// buffer with every thread, each reading one contiguous slab, 64 bytes a step into independent
// accumulators (enough loads in flight that memory, not the loop, is the limit). Same build
// policy as the other kernels (baseline + x86-64-v3/v4 clones picked at load time).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PICK_ISA_FOR_PROBE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PICK_ISA_FOR_PROBE
#endif

namespace {
typedef float vfloat __attribute__((vector_size(64)));

PICK_ISA_FOR_PROBE float sum_slab(const float* p, int64_t n) {  // n: a multiple of 64
  vfloat a = {}, b = {}, c = {}, d = {};
  for (int64_t i = 0; i < n; i += 64) {
    vfloat v0, v1, v2, v3;
    std::memcpy(&v0, p + i, 64);
    std::memcpy(&v1, p + i + 16, 64);
    std::memcpy(&v2, p + i + 32, 64);
    std::memcpy(&v3, p + i + 48, 64);
    a += v0, b += v1, c += v2, d += v3;
  }
  vfloat s = a + b + c + d;
  float total = 0.f;
  for (int i = 0; i < 16; ++i) total += s[i];
  return total;
}
}  // namespace

// Sum of a contiguous float32 buffer (its numel a multiple of 64 per thread's slab); the caller
// times it. Returns the sum so the reads cannot be optimised away.
double stream_read_sum(torch::Tensor buffer) {
  TORCH_CHECK(buffer.scalar_type() == torch::kFloat32 && buffer.is_contiguous(), "contiguous float32 buffer");
  const float* p = buffer.data_ptr<float>();
  const int64_t chunks = buffer.numel() / 64;
  const int threads = at::get_num_threads();
  std::vector<double> partial(threads, 0.0);
  at::parallel_for(0, chunks, (chunks + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    partial[at::get_thread_num()] += sum_slab(p + begin * 64, (end - begin) * 64);
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}
