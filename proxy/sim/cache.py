"""The simulated node's prompt cache: mlx_lm.server's `LRUPromptCache` rules over token sequences.

Tokens here are 4-byte cells (see `proxy.sim.model`), so a token sequence is a `bytes` object whose length is
a multiple of `TOKEN_BYTES`, and prefixes are compared with byte slices (memcmp), never with Python lists.

The rules (mlx-lm 0.32.2, `mlx_lm/models/cache.py`, read and measured against the real server):

- Lookup (`fetch`) for a prompt P never removes an entry and never changes the LRU order; the node works on a
  copy. Let `deepest` be the longest common prefix of P with any stored entry and `shorter` the longest stored
  entry (of at least two tokens) that is a prefix of P:
  1. an entry equal to P: `len(P) - 1` tokens are reused (the last one is computed again for its logits);
  2. if `deepest` is longer than `shorter`, a longer entry is copied and trimmed to the common prefix:
     `min(len(P) - 1, deepest)` tokens. This is the usual case for the next turn of a conversation, whose
     entry is prompt + reply: an identical repeat reuses `len(P) - 1`;
  3. else `shorter`, if any, is reused whole; else nothing.
- Insert (`insert`, after each request and at checkpoints during prefill) stores a sequence with a kind
  ("assistant": prompt + generated tokens; "user" and "system": checkpoints at the ends of prompt segments),
  deletes every stored entry that is a strict prefix of it (so a text conversation keeps one entry that grows),
  re-inserting an identical sequence refreshes it; then, past capacity, one entry is evicted.
- Eviction: the oldest entry of the first kind, in the order assistant, user, system, that holds at least as
  many entries as the next kind (so assistant entries go first unless checkpoints outnumber them).

Capacity counts entries, not conversations (`--prompt-cache-size`, default 10); `--prompt-cache-bytes` is not
modelled.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import msgspec

TOKEN_BYTES = 4

EntryKind = Literal["assistant", "user", "system"]
EVICTION_ORDER: tuple[EntryKind, ...] = ("assistant", "user", "system")


class CacheEntry(msgspec.Struct, frozen=True):
    """One stored token sequence, as `/_sim/stats` shows it."""

    tokens: int
    kind: str


def token_count(cells: bytes) -> int:
    """Number of tokens in a cell sequence (a partial trailing cell counts as one token)."""
    return -(-len(cells) // TOKEN_BYTES)


def common_prefix_tokens(a: bytes, b: bytes) -> int:
    """Number of leading tokens that `a` and `b` share.

    A token is equal only when all of its bytes are, so the byte-level common prefix is rounded down to a
    token boundary, except when the two sequences are identical (then a partial last token matches too).
    Binary search over slice comparisons keeps this fast on 100 KB prompts.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        if len(a) == len(b):
            return token_count(a)
        return n // TOKEN_BYTES
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo // TOKEN_BYTES


def is_token_prefix(prefix: bytes, tokens: bytes) -> bool:
    """Whether `prefix` is a whole-token prefix of `tokens` (or equal to it)."""
    if len(prefix) > len(tokens) or not tokens.startswith(prefix):
        return False
    return len(prefix) % TOKEN_BYTES == 0 or len(prefix) == len(tokens)


class PromptCache:
    """LRU prompt cache with mlx_lm.server's lookup, insert and eviction rules (see the module docstring)."""

    def __init__(self, capacity: int = 10) -> None:
        self.capacity = capacity
        self._entries: dict[bytes, EntryKind] = {}  # tokens -> kind, least recently inserted first

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        """Stored sequences, least recently inserted first."""
        return [CacheEntry(token_count(k), kind) for k, kind in self._entries.items()]

    def sequences(self) -> list[bytes]:
        """The stored token sequences themselves, least recently inserted first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def fetch(self, prompt: bytes) -> int:
        """How many of `prompt`'s tokens the node reuses from its cache (0 when none). Changes nothing."""
        n = token_count(prompt)
        if prompt in self._entries:
            return max(n - 1, 0)
        deepest = 0
        shorter = 0
        for key in self._entries:
            common = common_prefix_tokens(key, prompt)
            deepest = max(deepest, common)
            if common == token_count(key) >= 2:  # a stored prefix of the prompt
                shorter = max(shorter, common)
        if deepest > shorter:
            return min(n - 1, deepest)
        return shorter

    def insert(self, tokens: bytes, kind: EntryKind = "assistant") -> None:
        """Store `tokens` (prompt + generated, or a prefill checkpoint) and drop the entries it extends."""
        self._entries.pop(tokens, None)
        self._entries[tokens] = kind
        for key in [k for k in self._entries if len(k) < len(tokens) and is_token_prefix(k, tokens)]:
            del self._entries[key]
        if len(self._entries) > self.capacity:
            self._evict()

    def _evict(self) -> None:
        counts = {k: 0 for k in EVICTION_ORDER}
        for kind in self._entries.values():
            counts[kind] += 1
        victim_kind = EVICTION_ORDER[-1]
        for this, after in pairwise(EVICTION_ORDER):
            if counts[this] and counts[this] >= counts[after]:
                victim_kind = this
                break
        victim = next(k for k, kind in self._entries.items() if kind == victim_kind)
        del self._entries[victim]
