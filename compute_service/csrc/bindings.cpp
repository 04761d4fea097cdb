// One Python module for every CPU kernel (built by compute_service/native.py).
#include <torch/extension.h>

#include <string>
#include <vector>

torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);
std::string skinny_linear_isa();
double stream_read_sum(torch::Tensor buffer);
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> params, torch::Tensor pool,
                            torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor context_lens,
                            int64_t n_head, double eps, double attn_scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode, "decode attention over a paged KV cache");
  m.def("skinny_linear", &skinny_linear, "x @ W^T * scale + bias for a few rows, W float32/bfloat16/int8");
  m.def("skinny_linear_isa", &skinny_linear_isa, "the ISA skinny_linear runs on here: avx512, avx2 or empty");
  m.def("stream_read_sum", &stream_read_sum, "sum of a float32 buffer read by every thread (bandwidth probe)");
  m.def("decode_layers", &decode_layers, "every transformer layer of one decode step (as GPT.features)");
}
