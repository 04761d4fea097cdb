// Decode attention over a paged KV cache, reading every block in place (no gather copy).
//
// q            (B, nh, hs)                    one query token per sequence
// k/v_cache    (num_blocks, nh, block_size, hs)
// block_tables (B, max_blocks) int32          logical -> physical block of each sequence
// context_lens (B,) int32                     tokens each query attends to
// returns      (B, nh, hs)
//
// One task per (sequence, head): scores for the whole context, a max-subtracted softmax, then
// the weighted sum of values, each block tile (block_size x hs, contiguous) read straight from
// the pool. float32 only; the Python wrapper falls back to PyTorch for anything else.
// Tasks run head by head, and within a head in the order of the sequences' first block, so
// sequences that share blocks (a cached prefix, n samples) run back to back while those blocks'
// tiles of that head are still in the core's L2: a shared prefix is read from memory about once
// per head instead of once per sequence.
//
// Build policy (README, "Native kernels"): compiled for the baseline of the architecture, never
// -march=native, so a binary built on one machine runs on any other of the same architecture.
// On x86-64 the per-task function is compiled three times (AVX-512, AVX2, baseline) and the
// loader picks the widest one this CPU has, once, at load time (GCC/Clang target_clones).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PICK_ISA_AT_LOAD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PICK_ISA_AT_LOAD
#endif

// Attention of one query head over one sequence's context, blocks read in place.
PICK_ISA_AT_LOAD
static void attend_one_head(const float* qv, const float* k_ptr, const float* v_ptr, const int32_t* table,
                            int64_t ctx, int64_t block_size, int64_t head_dim, int64_t k_block_stride,
                            int64_t v_block_stride, int64_t k_head_offset, int64_t v_head_offset, float scale,
                            float* scores, float* acc, float* out) {
  float max_score = -INFINITY;
  for (int64_t start = 0; start < ctx; start += block_size) {
    const float* kb = k_ptr + table[start / block_size] * k_block_stride + k_head_offset;
    const int64_t n = std::min(block_size, ctx - start);
    for (int64_t j = 0; j < n; ++j) {
      const float* kv = kb + j * head_dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
      s *= scale;
      scores[start + j] = s;
      max_score = std::max(max_score, s);
    }
  }
  float denom = 0.f;
  for (int64_t t = 0; t < ctx; ++t) {
    scores[t] = std::exp(scores[t] - max_score);
    denom += scores[t];
  }
  std::fill(acc, acc + head_dim, 0.f);
  for (int64_t start = 0; start < ctx; start += block_size) {
    const float* vb = v_ptr + table[start / block_size] * v_block_stride + v_head_offset;
    const int64_t n = std::min(block_size, ctx - start);
    for (int64_t j = 0; j < n; ++j) {
      const float w = scores[start + j];
      const float* vv = vb + j * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * vv[d];
    }
  }
  const float inv = 1.f / denom;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = acc[d] * inv;
}

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  v_cache.stride(3) == 1 && v_cache.stride(2) == v_cache.size(3),
              "each block tile must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();

  const int64_t batch = q.size(0), n_head = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(2), max_blocks = block_tables.size(1);
  const int64_t k_block_stride = k_cache.stride(0), k_head_stride = k_cache.stride(1);
  const int64_t v_block_stride = v_cache.stride(0), v_head_stride = v_cache.stride(1);
  auto out = torch::empty_like(q);

  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k_cache.data_ptr<float>();
  const float* v_ptr = v_cache.data_ptr<float>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  std::vector<int64_t> order(batch);  // sequences sharing leading blocks end up next to each other
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return tables[a * max_blocks] < tables[b * max_blocks]; });

  at::parallel_for(0, batch * n_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / batch, b = order[i % batch];
      const int64_t task = b * n_head + h;
      const int64_t ctx = lens[b];
      TORCH_CHECK(ctx > 0 && ctx <= max_blocks * block_size, "context length out of range");
      scores.resize(ctx);
      attend_one_head(q_ptr + task * head_dim, k_ptr, v_ptr, tables + b * max_blocks, ctx, block_size, head_dim,
                      k_block_stride, v_block_stride, h * k_head_stride, h * v_head_stride, fscale, scores.data(),
                      acc.data(), out_ptr + task * head_dim);
    }
  });
  return out;
}
