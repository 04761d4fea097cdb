"""Content hashes of full KV blocks: the keys of the prefix cache.

A full block's hash covers everything its k/v depend on: its tokens and every token before it
(through the parent block's hash), the model and weights that computed them (the namespace), and
the request's `cache_salt` (a block computed under one salt never matches a request with
another). The gateway folds the caller's tenant into that salt once (`tenant_cache_salt`), so
every later hash (its router's, the replicas', the memory service's index) keeps tenants apart
without knowing about tenants. Only full blocks are hashed: a partial block is still
being written.

No torch, no Python `hash()` (randomised per process): SHA-256 over fixed-width little-endian
integers, so every process and machine computes the same hashes (the gateway will compute them
to route by). Hashes are truncated to 16 bytes: a collision among 2^40 blocks has probability
about 2^-49.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Container

HASH_BYTES = 16


def root_hash(namespace: str, cache_salt: str = "") -> bytes:
    """The parent of a sequence's first block: the model's namespace and the tenant's salt."""
    payload = b"paged-nanogpt/v1\0" + namespace.encode() + b"\0" + cache_salt.encode()
    return hashlib.sha256(payload).digest()[:HASH_BYTES]


def tenant_cache_salt(tenant: str, cache_salt: str) -> str:
    """The salt a request is cached under: its own `cache_salt` within its tenant's namespace
    (the anonymous tenant "" of a gateway without keys included): a digest of both,
    length-prefixed so that no (tenant, salt) pair can spell another's. A client cannot pick a
    salt that lands in another tenant's namespace, even through a keyless gateway beside a keyed
    one on the same replicas."""
    payload = b"tenant\0" + struct.pack("<I", len(tenant.encode())) + tenant.encode() + cache_salt.encode()
    return "t-" + hashlib.sha256(payload).hexdigest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block: its parent's hash (root_hash for the first) and its tokens."""
    payload = parent + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return hashlib.sha256(payload).digest()[:HASH_BYTES]


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, root: bytes) -> list[bytes]:
    """Append the hashes of the full blocks of `token_ids` that `hashes` does not cover yet (in
    place; returns it). Called as a sequence grows, so each block is hashed once."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else root
        hashes.append(block_hash(parent, token_ids[start : start + block_size]))
    return hashes


def num_leading(block_hashes: list[bytes], held: Container[bytes]) -> int:
    """How many leading blocks of `block_hashes` are in `held` (stops at the first miss): a
    block's hash covers its whole prefix, so a prefix cache matches the leading run only. The one
    lookup rule of the memory service's cache, the scheduler's estimate and the gateway's router."""
    n = 0
    for h in block_hashes:
        if h not in held:
            break
        n += 1
    return n


def prompt_block_hashes(token_ids: list[int], block_size: int, namespace: str, cache_salt: str = "") -> list[bytes]:
    """The hashes of every full block of a token sequence."""
    return extend_block_hashes([], token_ids, block_size, root_hash(namespace, cache_salt))
