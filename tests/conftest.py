"""Shared fixtures: a Hugging Face GPT-2 directory with seeded random weights (the test oracle)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A small GPT-2 written by transformers' own save_pretrained: the weights both sides load."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=1024, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def hf_model(hf_gpt2_dir):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    model.generation_config.eos_token_id = None  # compare fixed-length outputs
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids) :].tolist()


def random_prompt(rng, length: int) -> list[int]:
    return rng.integers(0, 50257, size=length).tolist()
