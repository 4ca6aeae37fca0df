from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from state.prefix import block_hashes

TOOLS = random.Random(1).randbytes(64 * 1024)


def turn_parts(n: int) -> list[bytes]:
    """Tools, then n messages of a growing conversation (each message's bytes fixed once written)."""
    rng = random.Random(2)
    return [TOOLS] + [rng.randbytes(rng.randrange(200, 5000)) for _ in range(n)]


@pytest.mark.parametrize("turn", [1, 2, 5, 9])
def test_each_turn_starts_with_the_previous_turns_hashes(turn: int) -> None:
    before = block_hashes(turn_parts(turn), salt="pool")
    after = block_hashes(turn_parts(turn + 1), salt="pool")
    assert len(after) >= len(before)
    assert after[: len(before)] == before


@pytest.mark.parametrize("position", [0, 1023, 1024, 40_000, 64 * 1024 - 1])
def test_an_early_byte_changes_every_later_hash(position: int) -> None:
    parts = turn_parts(3)
    data = bytearray(b"".join(parts))
    data[position] ^= 0xFF
    original = block_hashes(parts, salt="pool")
    changed = block_hashes([bytes(data)], salt="pool")
    first_changed = position // 1024
    assert changed[:first_changed] == original[:first_changed]
    assert all(a != b for a, b in zip(changed[first_changed:], original[first_changed:], strict=True))


def test_salt_separates_pools() -> None:
    parts = turn_parts(3)
    a, b = block_hashes(parts, salt="qwen"), block_hashes(parts, salt="llama")
    assert len(a) == len(b) > 0
    assert not set(a) & set(b)


@pytest.mark.parametrize(
    ("size", "block_size", "blocks"),
    [(0, 1024, 0), (1023, 1024, 0), (1024, 1024, 1), (2047, 1024, 1), (10_000, 1000, 10), (5, 1, 5)],
)
def test_only_full_blocks_are_hashed(size: int, block_size: int, blocks: int) -> None:
    hashes = block_hashes([b"x" * size], salt="p", block_size=block_size)
    assert len(hashes) == blocks
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)


@pytest.mark.parametrize("cut", [1, 100, 1024, 5000])
def test_where_parts_are_split_does_not_matter(cut: int) -> None:
    data = b"".join(turn_parts(2))
    assert block_hashes([data[:cut], data[cut:]], salt="p") == block_hashes([data], salt="p")


def test_repeated_blocks_hash_differently() -> None:
    hashes = block_hashes([b"a" * 4096], salt="p")
    assert len(set(hashes)) == 4


def test_rejects_empty_blocks() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([b"abc"], salt="p", block_size=0)


def test_a_300_kb_prompt_hashes_in_about_a_millisecond() -> None:
    parts = turn_parts(120)
    assert sum(map(len, parts)) > 300_000
    best = min(_timed(lambda: block_hashes(parts, salt="p")) for _ in range(5))
    assert best < 0.005  # ~0.6 ms on one core; generous for a loaded CI machine


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_max_blocks_hashes_only_the_first_blocks_and_they_are_the_same() -> None:
    parts = [b"a" * 1000, b"b" * 5000, b"c" * 100_000]
    whole = block_hashes(parts, salt="p", block_size=64)
    assert block_hashes(parts, salt="p", block_size=64, max_blocks=10) == whole[:10]
    assert block_hashes(parts, salt="p", block_size=64, max_blocks=10_000) == whole
