"""The same requests through Hugging Face transformers on the same weights (benchmark peers).

transformers is a benchmark/test extra: this module is never imported by the services.
"""

from __future__ import annotations

import time

import torch

from bench.workloads import Request
from compute_service.weights import load_model, nanogpt_to_hf_state_dict


def hf_model_from_spec(spec: str):
    import transformers

    ours = load_model(spec)
    cfg = ours.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            n_positions=cfg.context_length,
            vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
        )
    )
    missing, unexpected = hf.load_state_dict(nanogpt_to_hf_state_dict(ours), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
    hf.generation_config.eos_token_id = None  # ignore_eos, as every arm
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def static_batches(requests: list[Request], batch_size: int, max_len: int) -> list[list[Request]]:
    """Arrival-order batches of at most batch_size; a batch closes early when its longest prompt
    plus its longest output would pass the context (static batching pads every row to both)."""
    batches: list[list[Request]] = [[]]
    for r in requests:
        batch = batches[-1] + [r]
        fits = max(len(x.prompt_token_ids) for x in batch) + max(x.output_len for x in batch) <= max_len
        if len(batch) > batch_size or not fits:
            batches.append([r])
        else:
            batches[-1] = batch
    return batches


def run_hf_generate(hf, requests: list[Request], batch_size: int, progress=None) -> float:
    """Static batches with `generate` (left padding); each batch runs to its longest output."""
    start = time.perf_counter()
    for batch in static_batches(requests, batch_size, hf.config.n_positions):
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids) :] = 1
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(r.output_len for r in batch))
        if progress is not None:
            progress.update(len(batch))
    return time.perf_counter() - start


def run_hf_generate_batch(hf, requests: list[Request], progress=None) -> float:
    """transformers' own continuous batching (the engine behind `generate_batch`), driven through
    its manager so each request keeps its own output length, as in every other arm."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max(r.output_len for r in requests), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    hints = _workload_hints(requests)
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        hf.continuous_batching_context_manager(
            generation_config=config, block=True, timeout=5, workload_hints=hints
        ) as manager,
    ):
        for r in requests:
            manager.add_request(r.prompt_token_ids, max_new_tokens=r.output_len, eos_token_id=-1)
        finished = 0
        while finished < len(requests):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                finished += 1
                if progress is not None:
                    progress.update(1)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
    return time.perf_counter() - start


def _workload_hints(requests: list[Request]):
    import transformers.generation.continuous_batching.continuous_api as api

    return api.WorkloadHints(
        max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
        max_generated_length=max(r.output_len for r in requests),
        num_requests=len(requests),
    )
