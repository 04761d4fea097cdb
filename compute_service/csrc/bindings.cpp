// One Python module for every CPU kernel (built by compute_service/native.py).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode, "decode attention over a paged KV cache");
  m.def("skinny_linear", &skinny_linear, "x @ W^T * scale + bias for a few rows, W float32/bfloat16/int8");
  m.def("skinny_linear_isa", &skinny_linear_isa, "the ISA skinny_linear runs on here: avx512, avx2 or empty");
  m.def("decode_step", &decode_step, "one decode step's forward, token ids to logits (as GPT.forward)");
  m.def("argmax_rows", &argmax_rows, "each row's argmax, as torch.argmax(dim=-1)");
}
