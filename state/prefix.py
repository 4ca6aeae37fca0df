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


def block_hashes(
    parts: Sequence[bytes], *, salt: str, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int | None = None
) -> tuple[str, ...]:
    """Hex hashes of the prompt's full blocks, each chained to all before it and salted by `salt`.

    `parts` are concatenated in order; where one part ends and the next begins does not matter. With
    `max_blocks`, only the first that many blocks are hashed, and only their bytes are joined (a 30 MB
    prompt costs what its first blocks do).
    """
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    data = memoryview(_head(parts, None if max_blocks is None else max_blocks * block_size))
    # Block i's digest is BLAKE2b of its bytes keyed with block i-1's digest (the salt's for block 0).
    previous = blake2b(salt.encode(), digest_size=DIGEST_SIZE, person=b"mlxmux-salt").digest()
    digests: list[bytes] = []
    for start in range(0, len(data) - block_size + 1, block_size):
        previous = blake2b(data[start : start + block_size], digest_size=DIGEST_SIZE, key=previous).digest()
        digests.append(previous)
    return tuple(d.hex() for d in digests)


def _head(parts: Sequence[bytes], limit: int | None) -> bytes:
    """The parts joined, or only their first `limit` bytes."""
    if limit is None:
        return b"".join(parts)
    out: list[bytes] = []
    size = 0
    for part in parts:
        if size >= limit:
            break
        out.append(part[: limit - size])
        size += len(out[-1])
    return b"".join(out)
