"""Where a model's weights come from: one model spec, understood by every service and script.

Specs:
- `dummy:gpt2`, `dummy:gpt2-medium`, `dummy:tiny`: seeded random weights of that shape
  (benchmarks and tests; `dummy:gpt2@7` picks seed 7);
- a directory holding `config.json` + `model.safetensors`: either a Hugging Face GPT-2 export
  (`"model_type": "gpt2"`; Conv1D weights are transposed, as nanoGPT's from_pretrained does) or
  this project's own checkpoint (nanoGPT parameter names, GPTConfig fields in config.json);
- a name of a model shipped under `models/` (see SHIPPED_MODELS_DIR).
No transformers import at run time: HF checkpoints are read with safetensors alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compute_service.model import GPT, GPTConfig

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DUMMY_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64),
}
# HF GPT-2 uses Conv1D, whose weight is (in, out); nanoGPT's nn.Linear wants (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Build the GPT a spec names, in eval mode on `device` in `dtype`."""
    if spec.startswith("dummy:"):
        model = _dummy_model(spec.removeprefix("dummy:"))
    else:
        model = _model_from_dir(_resolve_dir(spec))
    return model.to(device=device, dtype=dtype).eval()


def _dummy_model(shape_and_seed: str) -> GPT:
    shape, _, seed = shape_and_seed.partition("@")
    if shape not in DUMMY_SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; choose one of {sorted(DUMMY_SHAPES)}")
    model = GPT(GPTConfig(**DUMMY_SHAPES[shape]))
    model.init_weights(seed=int(seed) if seed else 0)
    return model


def _resolve_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists() and (SHIPPED_MODELS_DIR / spec).is_dir():
        path = SHIPPED_MODELS_DIR / spec
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(
            f"model {spec!r}: expected dummy:<shape>, a shipped model name, or a directory with "
            "config.json and model.safetensors"
        )
    return path


def _model_from_dir(path: Path) -> GPT:
    raw = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    if raw.get("model_type") == "gpt2":
        config = GPTConfig(
            context_length=raw["n_positions"],
            vocab_size=raw["vocab_size"],
            n_layer=raw["n_layer"],
            n_head=raw["n_head"],
            n_embd=raw["n_embd"],
            layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        )
        tensors = hf_to_nanogpt_state_dict(tensors)
    else:
        if "block_size" in raw:  # nanoGPT's name for the context length, in older checkpoints
            raw["context_length"] = raw.pop("block_size")
        known = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in raw.items() if k in known})
        tensors.setdefault("lm_head.weight", tensors["transformer.wte.weight"])  # tied, saved once
    model = GPT(config)
    _load_strict(model, tensors)
    return model


def hf_to_nanogpt_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # HF's causal-mask buffers, not weights
        name = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        out[name] = tensor.t().contiguous() if name.endswith(_TRANSPOSED) else tensor
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def nanogpt_to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The inverse mapping: lets tests and benchmark peers load our weights into HF GPT-2."""
    return {
        name: (t.t().contiguous() if name.endswith(_TRANSPOSED) else t.clone())
        for name, t in model.state_dict().items()
    }


def _load_strict(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match GPTConfig: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})


def save_checkpoint(model: GPT, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the project's own checkpoint format (nanoGPT names, GPTConfig as config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
