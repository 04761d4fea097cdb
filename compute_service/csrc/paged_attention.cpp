// Decode attention over a paged KV cache, reading every block in place (no gather copy).
//
// q            (B, nh, hs)                    one query token per sequence
// k/v_cache    (num_blocks, nh, block_size, hs)
// block_tables (B, max_blocks) int32          logical -> physical block of each sequence
// context_lens (B,) int32                     tokens each query attends to
// returns      (B, nh, hs)
//
// One task per sequence (or per group of its heads when there are fewer sequences than threads):
// for each block of its context, the tiles of all its heads, which lie next to each other in the
// pool (one contiguous run of heads x block_size x hs floats), then a max-subtracted softmax per
// head, then the weighted sum of values the same way. Contiguous runs matter: the tiles of one
// sequence are scattered over the pool, and cold memory served one head's 4 KB tiles at ~22 GB/s
// but a block's 48 KB at ~30 GB/s here (docs/benchmarks.md, "Decode speed"); software prefetching of
// single-head tiles did not help. Sequences run in the order of their first block, so those
// sharing a cached prefix (or n samples) run back to back while its blocks are still in cache.
//
// Build policy (docs/architecture.md, "Native kernels"): compiled for the baseline of the architecture, never
// -march=native, so a binary built on one machine runs on any other of the same architecture.
// On x86-64 the per-task function is compiled three times (AVX-512, AVX2, baseline) and the
// loader picks the widest one this CPU has, once, at load time (GCC/Clang target_clones,
// PICK_ISA_AT_LOAD in kernels.h).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

// Attention of heads [h0, h1) of one sequence: each block's tiles of those heads are adjacent in
// the pool (one run of (h1 - h0) x block_size x hs floats), so they are read as one contiguous
// run, block after block, which memory serves far faster than scattered single-head tiles.
PICK_ISA_AT_LOAD
void attend_heads(const float* q, const float* k_ptr, const float* v_ptr, const int32_t* table, int64_t ctx,
                  int64_t block_size, int64_t head_dim, int64_t h0, int64_t h1, int64_t k_block_stride,
                  int64_t v_block_stride, int64_t k_head_stride, int64_t v_head_stride, float scale,
                  float* scores, float* acc, float* stats, float* out) {
  const int64_t nh = h1 - h0;
  float* max_score = stats;  // (nh,) running max of each head's scores
  float* denom = stats + nh;  // (nh,) each head's softmax denominator
  std::fill(max_score, max_score + nh, -INFINITY);
  for (int64_t start = 0; start < ctx; start += block_size) {
    const float* base = k_ptr + table[start / block_size] * k_block_stride;
    const int64_t n = std::min(block_size, ctx - start);
    for (int64_t h = 0; h < nh; ++h) {
      const float* kb = base + (h0 + h) * k_head_stride;
      const float* qv = q + (h0 + h) * head_dim;
      float* sc = scores + h * ctx + start;
      float m = max_score[h];
      for (int64_t j = 0; j < n; ++j) {
        const float* kv = kb + j * head_dim;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
        s *= scale;
        sc[j] = s;
        m = std::max(m, s);
      }
      max_score[h] = m;
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    float* sc = scores + h * ctx;
    float sum = 0.f;
    for (int64_t t = 0; t < ctx; ++t) {
      sc[t] = std::exp(sc[t] - max_score[h]);
      sum += sc[t];
    }
    denom[h] = sum;
  }
  std::fill(acc, acc + nh * head_dim, 0.f);
  for (int64_t start = 0; start < ctx; start += block_size) {
    const float* base = v_ptr + table[start / block_size] * v_block_stride;
    const int64_t n = std::min(block_size, ctx - start);
    for (int64_t h = 0; h < nh; ++h) {
      const float* vb = base + (h0 + h) * v_head_stride;
      const float* sc = scores + h * ctx + start;
      float* a = acc + h * head_dim;
      for (int64_t j = 0; j < n; ++j) {
        const float w = sc[j];
        const float* vv = vb + j * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) a[d] += w * vv[d];
      }
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const float inv = 1.f / denom[h];
    for (int64_t d = 0; d < head_dim; ++d) out[(h0 + h) * head_dim + d] = acc[h * head_dim + d] * inv;
  }
}

std::vector<int64_t> attention_order(const int32_t* tables, int64_t batch, int64_t max_blocks) {
  std::vector<int64_t> order(batch);
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return tables[a * max_blocks] < tables[b * max_blocks]; });
  return order;
}

int64_t attention_head_groups(int64_t batch, int64_t n_head, int64_t threads) {
  // As many groups as threads per sequence (at most one per head), then as many as the group
  // size needs: 12 heads in 8 wanted groups are groups of 2, so 6 groups (8 would leave two empty).
  const int64_t wanted = std::min<int64_t>(n_head, std::max<int64_t>(1, (threads + batch - 1) / batch));
  const int64_t per = (n_head + wanted - 1) / wanted;
  return (n_head + per - 1) / per;
}

void check_block_tables(const char* entry, const int32_t* tables, const int32_t* lens, int64_t batch,
                        int64_t max_blocks, int64_t block_size, int64_t num_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= max_blocks * block_size, entry, ": context_lens[", b, "] = ", lens[b],
                " outside 1..", max_blocks * block_size, " (block_tables holds ", max_blocks, " blocks of ",
                block_size, " tokens)");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int32_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, entry, ": block_tables[", b, "][", i, "] holds block ", block,
                  " outside the pool of ", num_blocks, " blocks");
    }
  }
}

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale) {
  // Every check before the parallel loop (an exception must not leave it): the shapes that set
  // the strides and loop bounds, then every block id the loop will follow.
  for (const auto* t : {&q, &k_cache, &v_cache, &block_tables, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention_decode: every tensor must be on the CPU");
  TORCH_CHECK(q.dim() == 3, "paged_attention_decode: q must be (B, nh, hs), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_attention_decode: k_cache and v_cache must both be (num_blocks, nh, block_size, hs), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == torch::kFloat32,
              "paged_attention_decode: q, k_cache and v_cache must be float32");
  TORCH_CHECK(q.size(1) == k_cache.size(1) && q.size(2) == k_cache.size(3), "paged_attention_decode: q ", q.sizes(),
              " and k_cache ", k_cache.sizes(), " disagree on heads or head_dim");
  TORCH_CHECK(k_cache.size(2) > 0, "paged_attention_decode: block_size (k_cache.size(2)) must be positive");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && context_lens.scalar_type() == torch::kInt32,
              "paged_attention_decode: block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "paged_attention_decode: block_tables must be (B, max_blocks) with B = ", q.size(0), " (q), got ",
              block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0),
              "paged_attention_decode: context_lens must be (B,) with B = ", q.size(0), " (q), got ",
              context_lens.sizes());
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  v_cache.stride(3) == 1 && v_cache.stride(2) == v_cache.size(3),
              "paged_attention_decode: each block tile must be contiguous");
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
  check_block_tables("paged_attention_decode", tables, lens, batch, max_blocks, block_size, k_cache.size(0));

  const std::vector<int64_t> order = attention_order(tables, batch, max_blocks);
  const int64_t groups = attention_head_groups(batch, n_head, at::get_num_threads());
  const int64_t per = (n_head + groups - 1) / groups;
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(per * head_dim), stats(2 * per);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = order[i / groups], g = i % groups;
      const int64_t h0 = g * per, h1 = std::min(n_head, h0 + per);
      const int64_t ctx = lens[b];
      scores.resize((h1 - h0) * ctx);
      attend_heads(q_ptr + b * n_head * head_dim, k_ptr, v_ptr, tables + b * max_blocks, ctx, block_size, head_dim,
                   h0, h1, k_block_stride, v_block_stride, k_head_stride, v_head_stride, fscale, scores.data(),
                   acc.data(), stats.data(), out_ptr + b * n_head * head_dim);
    }
  });
  return out;
}
