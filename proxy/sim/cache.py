"""The simulated node's prompt cache: an LRU of token sequences matched by prefix, as mlx_lm.server keeps one.

Tokens here are 4-byte cells (see `proxy.sim.model`), so a token sequence is a `bytes` object whose length is
a multiple of `TOKEN_BYTES`, and prefixes are compared with byte slices (memcmp), never with Python lists.

What mlx_lm.server does, and this class reproduces (its `LRUPromptCache`):

- Lookup (`fetch`) for a prompt P, in this order:
  1. exact: an entry equal to P is taken out of the cache; all of P is cached.
  2. shorter: the longest entry (of at least two tokens) that is a prefix of P is taken out of the cache;
     its length is cached. This is the normal multi-turn case, so *extending a conversation replaces its
     entry*: the old entry leaves, and the longer one is stored when the request ends.
  3. longer: otherwise, if some entry shares a prefix with P, a copy of the entry is trimmed to the common
     prefix: `min(len(P) - 1, common)` tokens are cached. The entry stays where it is in the LRU order
     (the lookup does not refresh it).
- Taking out an entry that was stored several times (same tokens inserted twice) only decrements its count.
- After each request, prompt + generated tokens are stored (`insert`): an existing identical entry gets its
  count raised and moves to the most recent end; otherwise a new entry is added and, past capacity, the
  least recently used one is evicted.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

TOKEN_BYTES = 4


class CacheEntry(msgspec.Struct, frozen=True):
    """One stored token sequence, as `/_sim/stats` shows it."""

    tokens: int
    count: int


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
    """Whether `prefix` is a whole-token prefix of `tokens`."""
    if len(prefix) > len(tokens) or not tokens.startswith(prefix):
        return False
    return len(prefix) % TOKEN_BYTES == 0 or len(prefix) == len(tokens)


class PromptCache:
    """LRU prompt cache with mlx_lm.server's lookup and insert rules (see the module docstring)."""

    def __init__(self, capacity: int = 10) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # tokens -> count, least recent first

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        """Stored sequences, least recently used first."""
        return [CacheEntry(token_count(k), c) for k, c in self._entries.items()]

    def clear(self) -> None:
        self._entries.clear()

    def fetch(self, prompt: bytes) -> int:
        """Look `prompt` up and return how many of its tokens come from the cache (0 when none)."""
        if prompt in self._entries:
            self._take(prompt)
            return token_count(prompt)
        shorter = b""
        for key in self._entries:
            if len(key) > len(shorter) and token_count(key) >= 2 and is_token_prefix(key, prompt):
                shorter = key
        if shorter:
            self._take(shorter)
            return token_count(shorter)
        best = 0
        for key in self._entries:
            best = max(best, common_prefix_tokens(key, prompt))
        if best == 0:
            return 0
        return min(token_count(prompt) - 1, best)

    def insert(self, tokens: bytes) -> None:
        """Store prompt + generated tokens after a request."""
        if tokens in self._entries:
            self._entries[tokens] += 1
            self._entries.move_to_end(tokens)
        else:
            self._entries[tokens] = 1
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _take(self, key: bytes) -> None:
        count = self._entries[key]
        if count == 1:
            del self._entries[key]
        else:
            self._entries[key] = count - 1
