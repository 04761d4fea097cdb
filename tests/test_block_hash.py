"""Block hashes are the prefix cache's keys and (later) the gateway's routing keys: they must be
the same in every process and on every machine, and differ for anything the k/v depend on."""

from __future__ import annotations

import os
import subprocess
import sys

from common.block_hash import block_hash, extend_block_hashes, num_leading, prompt_block_hashes, root_hash

NAMESPACE = "dummy:gpt2|float32|float32"


def test_known_answer_pins_the_scheme():
    """A change to the hash scheme must be deliberate: it invalidates every cache and router."""
    assert prompt_block_hashes(list(range(40)), 16, NAMESPACE)[1].hex() == "f2cd3d8c28f23dd8bb556e216d750c92"


def test_same_hashes_in_another_process_with_another_hash_seed():
    code = (
        "from common.block_hash import prompt_block_hashes as h; "
        f"print(','.join(x.hex() for x in h(list(range(100)), 16, {NAMESPACE!r}, 'tenant')))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {",".join(x.hex() for x in prompt_block_hashes(list(range(100)), 16, NAMESPACE, "tenant"))}


def test_only_full_blocks_are_hashed_and_extension_matches_hashing_at_once():
    tokens = list(range(50))
    assert len(prompt_block_hashes(tokens, 16, NAMESPACE)) == 3
    grown: list[bytes] = []
    root = root_hash(NAMESPACE)
    for end in (5, 16, 17, 40, 50):  # as a sequence grows, each block is hashed once
        extend_block_hashes(grown, tokens[:end], 16, root)
    assert grown == prompt_block_hashes(tokens, 16, NAMESPACE)


def test_hashes_depend_on_everything_before_the_block_the_model_and_the_salt():
    tokens = list(range(32))
    base = prompt_block_hashes(tokens, 16, NAMESPACE)
    other_first_block = prompt_block_hashes([99] + tokens[1:], 16, NAMESPACE)
    assert other_first_block[1] != base[1]  # same second block's tokens, different prefix
    assert prompt_block_hashes(tokens, 16, "dummy:gpt2|bfloat16|bfloat16") != base
    assert prompt_block_hashes(tokens, 16, NAMESPACE, cache_salt="a") != base
    assert block_hash(root_hash(NAMESPACE), tokens[:16]) == base[0]


def test_a_prefix_matches_its_leading_run_only():
    """An evicted parent ends the match even if a child block is still held (LRU can evict a
    parent before its child): the cache, the scheduler's estimate and the router all stop there."""
    a, b, c = prompt_block_hashes(list(range(48)), 16, "ns")
    assert num_leading([a, b, c], {a, b, c}) == 3
    assert num_leading([a, b, c], {a, c}) == 1
    assert num_leading([a, b, c], {b: 0, c: 1}) == 0
    assert num_leading([], {a}) == 0
