// One decode step's forward in one C++ call, token ids in, logits out: the embeddings, every
// transformer layer, ln_f and lm_head (GPT.forward in compute_service/model.py, for a step of
// one new token per sequence), inside ONE parallel region.
//
// Why one region: at batch 1 a step is ~50 matrix-vector products (the time to read their
// weights) and ~150 small operations between them. Run as separate calls, each linear forks and
// joins the threads and the small operations run on one thread while the other spins; ATen's
// layer norms, GELUs, views and allocations: with them, 2.8-2.9 ms of a ~22 ms batch-1 step on
// the AVX2 build machine was outside the linears, ~1.1 ms (mostly attention) now (docs/benchmarks.md,
// "Decode speed", step 9). Here every thread runs the whole step: each streams its own
// slab of every weight matrix (thread_rows, the split skinny_linear makes) and finishes its own
// output columns (bias, residual add, GELU) while they are in cache; the row-wise work (layer
// norms) is split by rows; threads meet at a barrier only where the next phase reads what
// another thread wrote (7 per layer). Each (sequence, head group) task writes its new k/v and
// then reads its context: that no task reads a slot another task writes relies on the block
// manager (a sequence appends only into a block it alone holds: only full blocks are shared);
// the checks below refuse a step where a sequence writes anywhere but the next slot of its own
// table, or into a block another sequence of the step holds.
//
// The linears and the attention are the same loops as skinny_linear and paged_attention_decode
// (same bits); layer norm and GELU are row_ops.cpp's, which differ from ATen's in the last bits,
// so this matches the Python layer loop to a tolerance (tests/test_fused_decode.py). Every
// sequence's result is the same bits whatever else is in the batch and however many threads
// run it (the split changes who computes an element, never the order of its sums).
//
// input_ids, positions (B,) int64; wte (V, C), wpe (T, C) float32
// params        16 tensors per layer: ln_1 w/b; c_attn w/scale/b; attn c_proj w/scale/b; ln_2 w/b;
//               c_fc w/scale/b; mlp c_proj w/scale/b; then 5: ln_f w/b; lm_head w/scale/b
//               (scale empty unless int8, b empty without bias; w the decode copy:
//               float32, bfloat16 or int8)
// pool          (n_layer, 2, num_blocks, nh, block_size, hs) the KV pool (compute_service/kv_cache.py)
// slot_mapping  (B,) int64 where each new token's k/v go: block * block_size + offset, the slot
//               of the context's last token in the sequence's own table
// block_tables  (B, max_blocks) int32, context_lens (B,) int32 (the new token included)
// returns       (B, V) logits
#include "kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace {
constexpr int64_t kParamsPerLayer = 16, kFinalParams = 5;

struct Norm {
  const float* weight;
  const float* bias;  // or nullptr
};

struct Layer {
  Norm ln_1;
  SkinnyWeight c_attn, attn_proj;
  Norm ln_2;
  SkinnyWeight c_fc, mlp_proj;
};

Norm norm_of(const torch::Tensor& weight, const torch::Tensor& bias, int64_t C) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() &&
                  weight.numel() == C,
              "layer norm weight must be float32 (C,)");
  TORCH_CHECK(bias.numel() == 0 || (bias.device().is_cpu() && bias.scalar_type() == torch::kFloat32 &&
                                    bias.is_contiguous() && bias.numel() == C),
              "layer norm bias must be float32 (C,) or empty");
  return Norm{weight.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr};
}

SkinnyWeight linear_of(const torch::Tensor* p, int64_t in, int64_t out) {
  SkinnyWeight w = skinny_weight(p[0], p[1], p[2]);
  TORCH_CHECK(w.cols == in && w.rows == out, "a linear's shape does not match the model");
  return w;
}

// Everything one step reads and writes, shared by the threads of the region.
struct Step {
  int64_t batch, n_embd, n_head, head_dim, block_size, max_blocks, max_ctx;
  float eps, attn_scale;
  float *x, *h, *qkv, *y, *f, *t, *logits;  // (B, C) (B, C) (B, 3C) (B, C) (B, 4C) (B, C) (B, V)
  float* pool;
  int64_t layer_stride, kv_stride, k_block_stride, k_head_stride;  // pool strides
  const int64_t* slots;
  const int32_t* tables;
  const int32_t* lens;
  std::vector<int64_t> order;  // attention_order
};

// Rows of `in` (B, C) normalized into `out`, rows split between threads.
void norm_rows(const Step& s, const Norm& norm, const float* in, float* out, int64_t thread, int64_t threads) {
  for (int64_t b = thread; b < s.batch; b += threads)
    layer_norm_row(in + b * s.n_embd, norm.weight, norm.bias, s.n_embd, s.eps, out + b * s.n_embd);
}

// What a thread does to its output columns of a linear once they are computed, while in cache.
enum class Then { kNothing, kGelu, kAddToResidual };

// This thread's output columns of out = in @ W^T (+ bias), then `then` on the same columns:
// GELU in place, or residual += out (the layer's x + sublayer(x), in that order of operands).
void linear_part(const Step& s, const SkinnyWeight& w, const float* in, float* out, int64_t thread,
                 int64_t threads, Then then = Then::kNothing, float* residual = nullptr) {
  int64_t begin, end;
  thread_rows(w.rows, thread, threads, &begin, &end);
  if (begin >= end) return;
  skinny_rows(in, w, s.batch, begin, end, out);
  for (int64_t b = 0; b < s.batch && then != Then::kNothing; ++b) {
    float* row = out + b * w.rows;
    if (then == Then::kGelu) gelu_tanh_inplace(row + begin, end - begin);
    else for (int64_t n = begin; n < end; ++n) residual[b * w.rows + n] = residual[b * w.rows + n] + row[n];
  }
}

// This thread's share of (sequence, head group) tasks: store the new token's k and v of those
// heads in its slot, then attend over the context (paged_attention_decode's loop and split).
void attention_part(const Step& s, int64_t layer, float* scratch, int64_t thread, int64_t threads) {
  const int64_t groups = attention_head_groups(s.batch, s.n_head, threads);
  const int64_t per = (s.n_head + groups - 1) / groups, tasks = s.batch * groups;
  const int64_t chunk = (tasks + threads - 1) / threads;
  float* k_cache = s.pool + layer * s.layer_stride;
  float* v_cache = k_cache + s.kv_stride;
  float* acc = scratch;  // (n_embd,) >= heads x head_dim
  float* stats = scratch + s.n_embd;  // (2 n_head,)
  float* scores = stats + 2 * s.n_head;  // (n_head x max_ctx,)
  for (int64_t i = thread * chunk; i < std::min(tasks, (thread + 1) * chunk); ++i) {
    const int64_t b = s.order[i / groups], g = i % groups;
    const int64_t h0 = g * per, h1 = std::min(s.n_head, h0 + per);
    const int64_t block = s.slots[b] / s.block_size, offset = s.slots[b] % s.block_size;
    const float* row = s.qkv + b * 3 * s.n_embd;
    for (int64_t hd = h0; hd < h1; ++hd) {
      const int64_t dst = block * s.k_block_stride + hd * s.k_head_stride + offset * s.head_dim;
      std::memcpy(k_cache + dst, row + s.n_embd + hd * s.head_dim, s.head_dim * sizeof(float));
      std::memcpy(v_cache + dst, row + 2 * s.n_embd + hd * s.head_dim, s.head_dim * sizeof(float));
    }
    attend_heads(row, k_cache, v_cache, s.tables + b * s.max_blocks, s.lens[b], s.block_size, s.head_dim, h0, h1,
                 s.k_block_stride, s.k_block_stride, s.k_head_stride, s.k_head_stride, s.attn_scale, scores, acc,
                 stats, s.y + b * s.n_embd);
  }
}
}  // namespace

torch::Tensor decode_step(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor wte, torch::Tensor wpe,
                          std::vector<torch::Tensor> params, torch::Tensor pool, torch::Tensor slot_mapping,
                          torch::Tensor block_tables, torch::Tensor context_lens, int64_t n_head, double eps,
                          double attn_scale) {
  // Every check before the parallel region: nothing inside it may throw.
  for (const auto* t : {&input_ids, &positions, &wte, &wpe, &pool, &slot_mapping, &block_tables, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), "decode_step: every tensor must be on the CPU");
  TORCH_CHECK(wte.dim() == 2 && wpe.dim() == 2 && wte.size(1) == wpe.size(1) && wte.scalar_type() == torch::kFloat32 &&
                  wpe.scalar_type() == torch::kFloat32 && wte.is_contiguous() && wpe.is_contiguous(),
              "wte (V, C) and wpe (T, C) must be contiguous float32");
  TORCH_CHECK(pool.dim() == 6 && pool.size(1) == 2 && pool.scalar_type() == torch::kFloat32 && pool.is_contiguous(),
              "pool must be a contiguous float32 (n_layer, 2, num_blocks, nh, block_size, hs)");
  TORCH_CHECK(n_head > 0, "n_head must be positive");
  const int64_t n_layer = pool.size(0), n_embd = wte.size(1), head_dim = n_embd / n_head;
  const int64_t batch = input_ids.numel(), num_blocks = pool.size(2), block_size = pool.size(4);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n_layer * kParamsPerLayer + kFinalParams,
              "16 parameters per layer and 5 for ln_f and lm_head");
  TORCH_CHECK(pool.size(3) == n_head && pool.size(5) == head_dim && head_dim * n_head == n_embd,
              "pool does not match the model");
  for (const auto* t : {&input_ids, &positions, &slot_mapping})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->numel() == batch,
                "input_ids, positions and slot_mapping must be (B,) int64");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 && block_tables.size(0) == batch &&
                  context_lens.scalar_type() == torch::kInt32 && context_lens.numel() == batch,
              "block_tables (B, max_blocks) and context_lens (B,) must be int32");
  input_ids = input_ids.contiguous(), positions = positions.contiguous(), slot_mapping = slot_mapping.contiguous();
  block_tables = block_tables.contiguous(), context_lens = context_lens.contiguous();
  const int64_t max_blocks = block_tables.size(1);
  const int64_t *ids = input_ids.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int32_t *tables = block_tables.data_ptr<int32_t>(), *lens = context_lens.data_ptr<int32_t>();
  check_block_tables("decode_step", tables, lens, batch, max_blocks, block_size, num_blocks);
  int64_t max_ctx = 1;
  // Where each sequence writes: the slot of its new token (its context's last) in its own table,
  // so no malformed step writes into another sequence's KV (and, the blocks being checked, in the pool).
  std::vector<std::pair<int64_t, int64_t>> writes(batch);  // (block, sequence), sorted by block below
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(ids[b] >= 0 && ids[b] < wte.size(0), "token id out of range");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < wpe.size(0), "position out of range");
    const int64_t last = lens[b] - 1, block = tables[b * max_blocks + last / block_size];
    const int64_t own = block * block_size + last % block_size;
    TORCH_CHECK(slots[b] == own, "decode_step: slot_mapping[", b, "] = ", slots[b],
                " is not the next slot of its sequence's own table (", own, ": block_tables[", b, "][",
                last / block_size, "] = block ", block, ", offset ", last % block_size, ")");
    writes[b] = {block, b};
    max_ctx = std::max<int64_t>(max_ctx, lens[b]);
  }
  // ...and into a block no other sequence of the step holds (the same block in two tables is a
  // shared prefix: read-only). O(B x blocks x log B) integer work.
  const auto by_block = [](const std::pair<int64_t, int64_t>& x, const std::pair<int64_t, int64_t>& y) {
    return x.first < y.first;
  };
  std::sort(writes.begin(), writes.end(), by_block);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t last_block = (lens[b] - 1) / block_size;
    for (int64_t i = 0; i <= last_block; ++i) {
      const int64_t block = tables[b * max_blocks + i];
      const auto [first, stop] = std::equal_range(writes.begin(), writes.end(), std::make_pair(block, b), by_block);
      for (auto w = first; w != stop; ++w)
        TORCH_CHECK(w->second == b && i == last_block, "decode_step: block_tables[", b, "][", i, "] holds block ",
                    block, ", which sequence ", w->second,
                    " writes into this step (only the one sequence holding a block may write it)");
    }
  }
  std::vector<Layer> layers;
  for (int64_t l = 0; l < n_layer; ++l) {
    const torch::Tensor* p = params.data() + l * kParamsPerLayer;
    layers.push_back(Layer{norm_of(p[0], p[1], n_embd), linear_of(p + 2, n_embd, 3 * n_embd),
                           linear_of(p + 5, n_embd, n_embd), norm_of(p[8], p[9], n_embd),
                           linear_of(p + 10, n_embd, 4 * n_embd), linear_of(p + 13, 4 * n_embd, n_embd)});
  }
  const torch::Tensor* end = params.data() + n_layer * kParamsPerLayer;
  const Norm ln_f = norm_of(end[0], end[1], n_embd);
  const SkinnyWeight head = linear_of(end + 2, n_embd, wte.size(0));

  auto opts = wte.options();
  auto logits = torch::empty({batch, head.rows}, opts);
  if (batch == 0) return logits;
  auto work = torch::empty({batch * 11 * n_embd}, opts);  // x, h, qkv (3), y, f (4), t: 11 rows of C
  Step s{batch, n_embd, n_head, head_dim, block_size, max_blocks, max_ctx, static_cast<float>(eps),
         static_cast<float>(attn_scale)};
  s.x = work.data_ptr<float>(), s.h = s.x + batch * n_embd, s.qkv = s.h + batch * n_embd;
  s.y = s.qkv + batch * 3 * n_embd, s.f = s.y + batch * n_embd, s.t = s.f + batch * 4 * n_embd;
  s.logits = logits.data_ptr<float>();
  s.pool = pool.data_ptr<float>();
  s.layer_stride = pool.stride(0), s.kv_stride = pool.stride(1), s.k_block_stride = pool.stride(2);
  s.k_head_stride = pool.stride(3);
  s.slots = slots, s.tables = tables, s.lens = lens;
  s.order = attention_order(tables, batch, max_blocks);
  const float *wte_p = wte.data_ptr<float>(), *wpe_p = wpe.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t scratch_size = n_embd + 2 * n_head + n_head * max_ctx;  // attention's acc, stats, scores
  std::vector<float> scratch(threads * scratch_size);

#pragma omp parallel num_threads(threads)
  {
    const int64_t thread = omp_get_thread_num(), team = omp_get_num_threads();
    float* my_scratch = scratch.data() + thread * scratch_size;
    // x = wte[id] + wpe[pos], rows split as norm_rows splits them: ln_1 reads only this
    // thread's rows, so no barrier yet.
    for (int64_t b = thread; b < batch; b += team)
      for (int64_t c = 0; c < n_embd; ++c) s.x[b * n_embd + c] = wte_p[ids[b] * n_embd + c] + wpe_p[pos[b] * n_embd + c];
    for (int64_t l = 0; l < n_layer; ++l) {
      const Layer& L = layers[l];
      norm_rows(s, L.ln_1, s.x, s.h, thread, team);  // x = x + attn(ln_1(x))
#pragma omp barrier
      linear_part(s, L.c_attn, s.h, s.qkv, thread, team);
#pragma omp barrier
      attention_part(s, l, my_scratch, thread, team);
#pragma omp barrier
      linear_part(s, L.attn_proj, s.y, s.t, thread, team, Then::kAddToResidual, s.x);
#pragma omp barrier
      norm_rows(s, L.ln_2, s.x, s.h, thread, team);  // x = x + mlp(ln_2(x))
#pragma omp barrier
      linear_part(s, L.c_fc, s.h, s.f, thread, team, Then::kGelu);
#pragma omp barrier
      linear_part(s, L.mlp_proj, s.f, s.t, thread, team, Then::kAddToResidual, s.x);
#pragma omp barrier
    }
    norm_rows(s, ln_f, s.x, s.h, thread, team);
#pragma omp barrier
    linear_part(s, head, s.h, s.logits, thread, team);
  }
  return logits;
}
