// Every transformer layer of one decode step in one call: the same operations, in the same
// order, as GPT.features in compute_service/model.py (layer norms and GELU through ATen, the
// linears through skinny_linear, attention through paged_attention_decode), so the output is
// bit for bit the Python path's. What it saves is the Python between them: module calls,
// views and indexing, about 1 ms of a ~14 ms batch-1 step on the build machine (README,
// "Decode speed"). The model calls it only for decode steps whose linears take the skinny path.
//
// x             (B, C)                         hidden states after the embeddings
// params        16 tensors per layer: ln_1 w/b; c_attn w/scale/b; attn c_proj w/scale/b;
//               ln_2 w/b; c_fc w/scale/b; mlp c_proj w/scale/b (scale empty unless int8, b
//               empty without bias; w the decode copy: float32, bfloat16 or int8)
// pool          (n_layer, 2, num_blocks, nh, block_size, hs) the KV pool (compute_service/kv_cache.py)
// slot_mapping  (B,) int64 where each new token's k/v go: block * block_size + offset
// returns       (B, C) hidden states after the last layer (before ln_f)
#include <torch/extension.h>

#include <cstring>
#include <vector>

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);

namespace {
constexpr int64_t kParamsPerLayer = 16;

// k, v (B, nh, hs) into their slots of one layer's caches (num_blocks, nh, block_size, hs).
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const int64_t* slots) {
  const int64_t batch = k.size(0), n_head = k.size(1), head_dim = k.size(2), block_size = k_cache.size(2);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t kb = k_cache.stride(0), kh = k_cache.stride(1), vb = v_cache.stride(0), vh = v_cache.stride(1);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t block = slots[b] / block_size, offset = slots[b] % block_size;
    for (int64_t h = 0; h < n_head; ++h) {
      const int64_t src = (b * n_head + h) * head_dim;
      std::memcpy(kc + block * kb + h * kh + offset * head_dim, kp + src, head_dim * sizeof(float));
      std::memcpy(vc + block * vb + h * vh + offset * head_dim, vp + src, head_dim * sizeof(float));
    }
  }
}
}  // namespace

torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> params, torch::Tensor pool,
                            torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor context_lens,
                            int64_t n_head, double eps, double attn_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (B, C) float32");
  TORCH_CHECK(pool.dim() == 6 && pool.scalar_type() == torch::kFloat32 && pool.is_contiguous(),
              "pool must be a contiguous float32 (n_layer, 2, num_blocks, nh, block_size, hs)");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.numel() == x.size(0),
              "slot_mapping must be (B,) int64");
  const int64_t n_layer = pool.size(0), batch = x.size(0), n_embd = x.size(1), head_dim = n_embd / n_head;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n_layer * kParamsPerLayer, "16 parameters per layer");
  TORCH_CHECK(pool.size(3) == n_head && pool.size(5) == head_dim, "pool does not match the model");
  slot_mapping = slot_mapping.contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const std::vector<int64_t> shape{n_embd};
  for (int64_t layer = 0; layer < n_layer; ++layer) {
    const torch::Tensor* p = params.data() + layer * kParamsPerLayer;
    auto opt = [](const torch::Tensor& t) { return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt; };
    // x = x + attn(ln_1(x))
    torch::Tensor h = at::layer_norm(x, shape, opt(p[0]), opt(p[1]), eps);
    torch::Tensor qkv = skinny_linear(h, p[2], p[3], p[4]);  // (B, 3C)
    torch::Tensor q = qkv.narrow(1, 0, n_embd).view({batch, n_head, head_dim});
    torch::Tensor k = qkv.narrow(1, n_embd, n_embd).contiguous().view({batch, n_head, head_dim});
    torch::Tensor v = qkv.narrow(1, 2 * n_embd, n_embd).contiguous().view({batch, n_head, head_dim});
    torch::Tensor k_cache = pool[layer][0], v_cache = pool[layer][1];
    write_kv(k, v, k_cache, v_cache, slots);
    torch::Tensor y = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, attn_scale);
    x = x + skinny_linear(y.reshape({batch, n_embd}), p[5], p[6], p[7]);
    // x = x + mlp(ln_2(x)), GPT-2's tanh GELU
    h = at::layer_norm(x, shape, opt(p[8]), opt(p[9]), eps);
    torch::Tensor f = at::gelu(skinny_linear(h, p[10], p[11], p[12]), "tanh");
    x = x + skinny_linear(f, p[13], p[14], p[15]);
  }
  return x;
}
