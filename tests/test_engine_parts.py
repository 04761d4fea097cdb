"""Smaller parts of the engine: the project's checkpoint format, the pipelined memory call, and
the streaming form of generation."""

from __future__ import annotations

import torch

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from compute_service.kv_cache import KVCache
from compute_service.model import AttentionMetadata
from compute_service.weights import load_model, save_checkpoint


def test_own_checkpoint_round_trips_to_the_same_logits(tmp_path):
    model = load_model("dummy:tiny@3")
    save_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    reloaded = load_model(str(tmp_path / "ckpt"))
    ids = torch.tensor([15496, 995, 11, 262])
    meta = AttentionMetadata(seq_lens=[4])
    with torch.inference_mode():
        assert torch.equal(model(ids, torch.arange(4), meta), reloaded(ids, torch.arange(4), meta))


def test_half_precision_checkpoint_loads_into_the_configured_dtype(tmp_path):
    save_checkpoint(load_model("dummy:tiny"), tmp_path / "fp16")  # stored as float16
    reloaded = load_model(str(tmp_path / "fp16"))
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())


def test_write_puts_each_token_at_its_slot():
    cache = KVCache(n_layer=1, n_head=2, head_dim=3, num_blocks=4, block_size=4)
    k = torch.randn(3, 2, 3)
    cache.write(0, k, -k, torch.tensor([5, 14, 0]))  # block 1 offset 1, block 3 offset 2, block 0 offset 0
    k_cache, v_cache = cache.layer(0)
    assert (
        torch.equal(k_cache[1, :, 1], k[0])
        and torch.equal(k_cache[3, :, 2], k[1])
        and torch.equal(k_cache[0, :, 0], k[2])
    )
    assert torch.equal(v_cache[3, :, 2], -k[1])


def test_stream_yields_the_tokens_generate_returns():
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=1024)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    expected = engine.generate(["Streaming works"], params)[0]
    outputs = list(engine.stream("Streaming works", params))
    assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert all(not o.finished for o in outputs[:-1])
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_the_next_steps_memory_call_travels_during_each_forward():
    """Async scheduling: the request for step N+1 is sent before step N's forward and read after
    it, one call per step; the last forward (everyone ends by length) has nothing in flight."""
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=1024)
    events: list[str] = []
    memory, execute = engine.kv.memory, engine.runner.execute
    send, receive = memory.send, memory.receive
    memory.send = lambda request: events.append("send") or send(request)
    memory.receive = lambda: events.append("receive") or receive()
    engine.runner.execute = lambda prepared: events.append("forward") or execute(prepared)
    engine.generate(["a b c", "d e f g"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    forwards = [i for i, e in enumerate(events) if e == "forward"]
    assert len(forwards) == 8  # one prefill of both, then seven decode steps
    for i in forwards[:-1]:
        assert events[i - 1] == "send" and events[i + 1] == "receive"
    assert events[forwards[-1] - 1] == "receive"
    assert events.count("send") == events.count("receive") == len(forwards) + 1  # + the final free
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
