"""The shipped default model: it loads, it is as good as its card says, and it serves exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compute_service.config import DEFAULT_MODEL
from compute_service.engine import InferenceEngine
from compute_service.sampling_params import SamplingParams
from compute_service.tokenizer import get_tokenizer
from compute_service.weights import SHIPPED_MODELS_DIR, load_model
from models.train import windowed_loss
from tests.conftest import hf_greedy

MODEL_DIR = SHIPPED_MODELS_DIR / "shakespeare"


def test_the_default_model_is_the_shipped_checkpoint():
    assert DEFAULT_MODEL == "shakespeare"
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 40 * 1024 * 1024


def test_loss_on_the_fixed_validation_slice_matches_the_card():
    card = json.loads((MODEL_DIR / "training.json").read_text())
    text = (MODEL_DIR / "validation_slice.txt").read_text()
    loss = windowed_loss(load_model("shakespeare"), get_tokenizer().encode(text), card["fixed_slice_window"])
    assert abs(loss - card["fixed_slice_loss"]) <= 0.05
    assert card["val_loss"] <= card["unigram_val_loss"] - 1.5


def test_greedy_output_is_deterministic_and_not_degenerate():
    engine = InferenceEngine(model="shakespeare", kv_budget_tokens=2048)
    params = SamplingParams(max_new_tokens=60, temperature=0)
    first, second = (engine.generate(["ROMEO:\n"], params)[0] for _ in range(2))
    assert first.token_ids == second.token_ids
    assert len(set(first.token_ids)) > 10, f"degenerate output: {first.text!r}"


def test_paged_engine_equals_hf_transformers_on_the_shipped_weights():
    transformers = pytest.importorskip("transformers")
    from bench.hf_peers import hf_model_from_spec

    hf = hf_model_from_spec("shakespeare")
    prompt = get_tokenizer().encode("JULIET:\nO Romeo, Romeo! wherefore art thou")
    engine = InferenceEngine(model="shakespeare", kv_budget_tokens=2048)
    ours = engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    assert ours.token_ids == hf_greedy(hf, prompt, 40)
