// What the kernel files share: the entry points bindings.cpp exposes, and the loops the fused
// decode step (decode_step.cpp) calls inside its own parallel region, on a range of work it
// chose (so no torch tensors, allocations, checks or anything else that can throw below the
// entry points: an exception cannot leave an OpenMP region).
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

// Element-wise loops are compiled for AVX-512, AVX2 and the baseline; the loader picks the widest
// this CPU has, once, at load time (GCC/Clang target_clones). Build policy: docs/architecture.md, "Native kernels".
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PICK_ISA_AT_LOAD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PICK_ISA_AT_LOAD
#endif

// --- entry points (Python) ---
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);
std::string skinny_linear_isa();
torch::Tensor decode_step(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor wte, torch::Tensor wpe,
                          std::vector<torch::Tensor> params, torch::Tensor pool, torch::Tensor slot_mapping,
                          torch::Tensor block_tables, torch::Tensor context_lens, int64_t n_head, double eps,
                          double attn_scale);
torch::Tensor argmax_rows(torch::Tensor logits);

// --- checks the entry points share (before any parallel region: they throw) ---
// Every sequence's context fits its table (0 < context_lens[b] <= max_blocks * block_size) and
// every block it reads lies in the pool: a bad id would read or write outside the pool.
// `entry` names the caller in the message (paged_attention.cpp).
void check_block_tables(const char* entry, const int32_t* tables, const int32_t* lens, int64_t batch,
                        int64_t max_blocks, int64_t block_size, int64_t num_blocks);

// --- loops shared with the fused decode step ---
// One linear's weights as the skinny kernel reads them (skinny_linear.cpp).
struct SkinnyWeight {
  enum class Type { kFloat32, kBFloat16, kInt8 };
  const void* data;
  Type type;
  int64_t rows, cols;   // N, K
  const float* scale;   // (N,) int8 only, else nullptr
  const float* bias;    // (N,) or nullptr
};
SkinnyWeight skinny_weight(const torch::Tensor& weight, const torch::Tensor& scale, const torch::Tensor& bias);
// y[:, row_begin:row_end] = x @ W[row_begin:row_end]^T * scale + bias for all M rows of x (M, K);
// y is (M, N). The caller splits the rows between threads (thread_rows).
void skinny_rows(const float* x, const SkinnyWeight& w, int64_t M, int64_t row_begin, int64_t row_end, float* y);
// Thread `thread`'s contiguous range of N output rows out of `threads`: whole tiles of 4 rows,
// the split at::parallel_for makes (so each thread streams one slab of W).
void thread_rows(int64_t N, int64_t thread, int64_t threads, int64_t* begin, int64_t* end);

// Attention of heads [h0, h1) of one sequence over its paged context (paged_attention.cpp).
// Scratch: scores (h1 - h0) x ctx, acc (h1 - h0) x head_dim, stats 2 x (h1 - h0) floats.
void attend_heads(const float* q, const float* k_ptr, const float* v_ptr, const int32_t* table, int64_t ctx,
                  int64_t block_size, int64_t head_dim, int64_t h0, int64_t h1, int64_t k_block_stride,
                  int64_t v_block_stride, int64_t k_head_stride, int64_t v_head_stride, float scale,
                  float* scores, float* acc, float* stats, float* out);
// Sequences in the order of their first block (those sharing a prefix run back to back), and
// how many head groups each sequence is split into so that every thread has work (every group
// holds ceil(n_head / groups) heads, the last what is left: never none).
std::vector<int64_t> attention_order(const int32_t* tables, int64_t batch, int64_t max_blocks);
int64_t attention_head_groups(int64_t batch, int64_t n_head, int64_t threads);

// Row-wise element loops (row_ops.cpp), vectorized for the CPU's widest ISA.
// out = (x - mean) / sqrt(var + eps) * weight + bias over one row of C values (bias may be null).
void layer_norm_row(const float* x, const float* weight, const float* bias, int64_t C, float eps, float* out);
// GPT-2's tanh GELU in place: 0.5 x (1 + tanh(z)) computed as x / (1 + exp(-2 z)), the same function.
void gelu_tanh_inplace(float* x, int64_t n);
// Index of the largest value (the first of equal ones; the first NaN if any), as torch.argmax.
int64_t argmax_row(const float* values, int64_t n);
