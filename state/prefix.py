"""Chained block hashes of a prompt: the affinity key of prefix-aware routing.

The prompt, as the node will see it (tools, then each message, as deterministic bytes), is cut into
fixed-size blocks of bytes standing in for tokens. Block i's hash commits to the salt (the model pool)
and to every byte of blocks 0..i, so two prompts share their first k hashes exactly when they share
their first k blocks, and turn N+1 of a conversation starts with turn N's hashes. Only full blocks
are hashed: a trailing partial block is still changing (the next turn will extend it).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

from state.types import DEFAULT_BLOCK_SIZE

DIGEST_SIZE = 8
"""Bytes per block hash (16 hex characters): collisions are negligible at millions of live blocks."""


def block_hashes(parts: Sequence[bytes], *, salt: str, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[str, ...]:
    """Hex hashes of the prompt's full blocks, each chained to all before it and salted by `salt`.

    `parts` are concatenated in order; where one part ends and the next begins does not matter.
    """
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    data = memoryview(b"".join(parts))
    # Block i's digest is BLAKE2b of its bytes keyed with block i-1's digest (the salt's for block 0).
    previous = blake2b(salt.encode(), digest_size=DIGEST_SIZE, person=b"mlxmux-salt").digest()
    digests: list[bytes] = []
    for start in range(0, len(data) - block_size + 1, block_size):
        previous = blake2b(data[start : start + block_size], digest_size=DIGEST_SIZE, key=previous).digest()
        digests.append(previous)
    return tuple(d.hex() for d in digests)
