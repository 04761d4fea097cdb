"""Bad requests raise a clear ValueError naming the field, and leave nothing behind."""

import math

import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return LocalEngine(model="dummy:tiny", kv_budget_tokens=2048)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([50257], SamplingParams(), "prompt"),
        ([1] * 1024, SamplingParams(max_new_tokens=1), "prompt"),
        ("hi", SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ("hi", SamplingParams(max_new_tokens=-3), "max_new_tokens"),
        ("hi", SamplingParams(max_new_tokens=1024), "max_new_tokens"),
        ("hi", SamplingParams(temperature=math.nan), "temperature"),
        ("hi", SamplingParams(temperature=-0.5), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ("hi", SamplingParams(top_p=math.nan), "top_p"),
        ("hi", SamplingParams(top_k=-1), "top_k"),
        ("hi", SamplingParams(seed=-1), "seed"),
        ("hi", SamplingParams(stop=[""]), "stop"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_request_larger_than_the_pool_is_refused():
    small = LocalEngine(model="dummy:tiny", kv_budget_tokens=64, block_size=16)
    with pytest.raises(ValueError, match="pool"):
        small.add_request("hi", SamplingParams(max_new_tokens=100))


def test_duplicate_request_id_is_refused(engine):
    engine.add_request("hi", SamplingParams(max_new_tokens=2), request_id="same")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("hi", SamplingParams(max_new_tokens=2), request_id="same")
    engine.abort("same")
    engine.step()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
