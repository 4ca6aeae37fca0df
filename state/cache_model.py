"""What the router believes one node's prompt cache holds, kept the way mlx_lm.server keeps it. Pure, no I/O.

mlx_lm.server keeps an LRU of at most `--prompt-cache-size` *entries*; an entry is a token sequence it
stored after an answer (prompt + reply); storing one deletes the stored entries that are prefixes of it,
so a text conversation holds one entry that grows; a lookup copies and never removes. It tells nobody what
it evicts, but every answer reports `cached_tokens`: how many leading tokens of this prompt it reused.

The model: each entry is a chain of block hashes of the gateway's rendering of a prompt (state.prefix).
Block i's hash commits to blocks 0..i, so an entry is named by its last block (its tip) and the blocks a
node holds are closed under prefixes: `refs` counts the entries holding each block, and the longest held
prefix of a prompt is found by binary search. `MemoryStore` keeps one `NodeCache` per node; the Redis
scripts (state/lua/route.lua and finish.lua) apply the same rules to the node's keys, step for step, and
tests/contract checks that both agree.

The rules (docs/routing.md, "What the router believes"):

predict (at routing time, on the chosen node)
    The node will store this prompt: it becomes the most recent entry (pending: tokens unknown). The
    entry capacity applies when the report comes (the node stores and evicts after answering); only the
    bound on blocks applies at once. A prompt already stored is left as it is.

report (after the answer, from the node's `cached_tokens` c)
    Let `best` be the confirmed entry (one an answer had reported by the time this request was routed:
    entries in flight then were not on the node for its lookup) sharing the most leading blocks with
    the prompt, and `predicted` the tokens the router expected the node to reuse from it (or, if the
    entries that matched when the request was routed have left the model since, what they matched
    then). If c falls short of that by more than a twentieth (at least 8 tokens) — or, for a whole entry
    whose size is known, short of its prompt part by more than a hundredth (its reply may re-render
    differently, as a tool call does) — the node had evicted it (a *miss*): every entry sharing more
    than the k blocks the node really reused is cut back to k; if `best` was the most recent entry, the
    node lost its whole cache (a restart) and every other entry is dropped, else its LRU rank r says the
    node holds fewer than r entries and the learned capacity drops toward r - 1, one step per miss
    (under load mlx_lm's checkpoints of prompts in flight take slots for a while). A hit on the oldest
    entry lets the capacity grow back by one, up to the configured `cache_slots`. Then entries wholly inside
    the reused part whose tokens were all reused are gone (the node's new entry extends them); those
    reused only in part stay beside it (after a tool call the template re-renders the call, so mlx_lm
    keeps both). The prompt's own entry now holds prompt + reply tokens and is the most recent; beyond
    the capacity the least recently used confirmed entries go (entries in flight take no slot).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

MISS_SLACK_TOKENS = 8
"""A report this many tokens short of the prediction (or more, see `NodeCache.report`) is a miss."""


class CacheEntry(msgspec.Struct):
    blocks: tuple[str, ...]
    tokens: int
    """Tokens of the node's entry (prompt + reply) once an answer reported them; 0 while pending."""
    used: int
    """When it was last routed or reported, on the node's own tick (the LRU order; ties broken by tip)."""
    since: int = 0
    """The tick at which an answer first confirmed it (0 while pending): a request routed before then
    could not have reused it, the node had not stored it yet."""
    reply: int = 0
    """Of `tokens`, those the node generated (the reply): a next turn whose template re-renders a tool call
    reuses less than all of it, which is no eviction."""


class CacheCounters(msgspec.Struct, frozen=True):
    """How well the router's belief matched what the node reported (shown per node in /cluster)."""

    entries: int = 0
    capacity: int = 0
    """Learned entry capacity (0 = not learned yet: the configured cache_slots)."""
    reports: int = 0
    """Answers whose `cached_tokens` were checked against the belief."""
    predicted_tokens: int = 0
    """Cached tokens the router expected, summed over those answers."""
    reported_tokens: int = 0
    """Cached tokens the node reported, summed over those answers."""
    misses: int = 0
    """Answers where the node had evicted what the router believed it held."""
    prompt_bytes: int = 0
    """Bytes of rendered prompt in those answers (with `prompt_tokens`: the pool's bytes per token)."""
    prompt_tokens: int = 0


class CacheReport(msgspec.Struct, frozen=True):
    """What an answer told of the node's cache, with what the store needs to correct its belief
    (state.cache_model). Sent only when the node reported usage."""

    blocks: tuple[str, ...]
    """The prompt's block hashes, as routed."""
    prompt_bytes: int
    """Bytes of the rendered prompt the blocks were cut from (with prompt_tokens: this prompt's bytes per token)."""
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_slots: int = 10
    """The node's configured cache_slots (the learned capacity never exceeds it)."""
    reported: bool = True
    """False when the answer carried no usage (or the request failed): nothing to learn but that a failed
    request stored nothing."""
    seen_tick: int | None = None
    """The node's tick when the request was routed (`Decision.cache_tick`): only entries confirmed by then
    were on the node for its lookup. None: every confirmed entry."""
    predicted_blocks: int | None = None
    """Blocks the node's confirmed entries matched when the request was routed (`Decision.predicted_blocks`):
    the prediction, even if those entries have left the model since. None: judged from the entries now."""


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """Leading blocks two chains share (binary search: chained hashes agree on a prefix, then never again)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def tokens_of_blocks(blocks: int, report: CacheReport, block_size: int) -> int:
    """Tokens that `blocks` leading blocks of the prompt stand for (this prompt's own bytes per token)."""
    if report.prompt_bytes <= 0:
        return 0
    return min(report.prompt_tokens, (blocks * block_size * report.prompt_tokens) // report.prompt_bytes)


def blocks_of_tokens(tokens: int, report: CacheReport, block_size: int) -> int:
    """Leading blocks of the prompt that `tokens` tokens cover (this prompt's own bytes per token)."""
    if report.prompt_tokens <= 0:
        return 0
    return min(len(report.blocks), (tokens * report.prompt_bytes) // (report.prompt_tokens * block_size))


class NodeCache:
    """The router's belief about one node's prompt cache (module docstring)."""

    def __init__(self) -> None:
        self.entries: dict[str, CacheEntry] = {}
        """tip block -> entry"""
        self.refs: dict[str, int] = {}
        """block -> entries holding it"""
        self.capacity = 0
        """Learned capacity in entries; 0 = the configured cache_slots."""
        self.reports = 0
        self.predicted_tokens = 0
        self.reported_tokens = 0
        self.misses = 0
        self.prompt_bytes = 0
        self.prompt_tokens = 0
        self.tick = 0
        """A counter that orders the node's entries by last use (the same in memory and in Redis, unlike clocks)."""
        self.touched = 0
        """Last change, ms (an idle node's model lapses after the prefix TTL)."""

    # -- reading ---------------------------------------------------------------------------------

    def matched(self, blocks: Sequence[str]) -> int:
        """Leading blocks of `blocks` the node is believed to hold."""
        lo, hi = 0, len(blocks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if blocks[mid - 1] in self.refs:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def confirmed_match(self, blocks: Sequence[str]) -> int:
        """Leading blocks of `blocks` the node's confirmed entries hold (what it can reuse right now)."""
        return max((common_prefix(e.blocks, blocks) for e in self.entries.values() if e.tokens > 0), default=0)

    def effective_capacity(self, slots: int) -> int:
        return min(self.capacity, slots) if self.capacity else slots

    def counters(self) -> CacheCounters:
        return CacheCounters(
            entries=len(self.entries),
            capacity=self.capacity,
            reports=self.reports,
            predicted_tokens=self.predicted_tokens,
            reported_tokens=self.reported_tokens,
            misses=self.misses,
            prompt_bytes=self.prompt_bytes,
            prompt_tokens=self.prompt_tokens,
        )

    # -- changing --------------------------------------------------------------------------------

    def predict(self, blocks: Sequence[str], now: int, max_blocks: int) -> int:
        """The node was chosen for this prompt: it will store it (module docstring, predict). Returns the
        node's tick, for the request's report (`CacheReport.seen_tick`)."""
        self.touched = now
        if not blocks or blocks[-1] in self.entries:
            return self.tick  # a repeat: its report will say whether the node still holds it
        self.tick += 1
        self._add(tuple(blocks), 0, self.tick)
        # Only the block bound applies now: the node stores (and evicts) once it has answered, and the
        # report applies the entry capacity then; until then the entries in flight are at most the leases.
        self._evict(None, max_blocks)
        return self.tick

    def report(self, report: CacheReport, now: int, block_size: int, max_blocks: int) -> None:
        """The node answered this prompt and reported `cached_tokens` (module docstring, report)."""
        self.touched = now
        blocks = report.blocks
        cached = report.cached_tokens
        tip = blocks[-1] if blocks else ""
        # what the node held when this request arrived: confirmed entries only (pending ones are requests in
        # flight, stored only when they finish; a confirmed repeat of this very prompt counts)
        seen = report.seen_tick
        others = [
            t for t in self._lru() if self.entries[t].tokens > 0 and (seen is None or self.entries[t].since <= seen)
        ]
        best, best_common = "", 0
        for t in others:  # most recent wins a tie: later in the LRU order
            c = common_prefix(self.entries[t].blocks, blocks)
            if c >= best_common and c > 0:
                best, best_common = t, c
        predicted = 0
        # the tokens the node surely held if it kept the entry, and how far short a report may fall
        floor, slack = 0, 20
        if best:
            entry = self.entries[best]
            if best_common == len(entry.blocks) and entry.tokens > 0:
                # a whole entry, its size known: it held at least the prompt part (the reply may re-render)
                predicted = min(report.prompt_tokens, entry.tokens)
                floor, slack = min(report.prompt_tokens, entry.tokens - entry.reply), 100
            else:
                predicted = tokens_of_blocks(best_common, report, block_size)
        routed = report.predicted_blocks
        if routed is not None and routed > best_common:
            # what matched when it was routed has left the model since (answers that came first evicted it)
            predicted = tokens_of_blocks(routed, report, block_size)
            floor, slack = 0, 20
        if not floor:
            floor = predicted
        slots = report.cache_slots
        capacity = self.effective_capacity(slots)
        miss = cached + max(MISS_SLACK_TOKENS, floor // slack) < floor
        self.misses += miss
        if best and (routed is None or best_common >= routed):
            rank = len(others) - others.index(best)  # 1 = most recent
            if miss:
                held = min(best_common - 1, blocks_of_tokens(cached, report, block_size))
                if rank == 1:
                    for t in others:
                        self._remove(t)
                else:
                    # one step at a time: a node's room also shrinks for a while under load (mlx_lm saves
                    # checkpoints of prompts in flight as entries), so one miss is not the whole truth
                    self.capacity = max(1, min(capacity, max(capacity - 1, rank - 1)))
                    for t in others:
                        if t in self.entries and common_prefix(self.entries[t].blocks, blocks) > held:
                            self._truncate(t, held, cached)
            elif rank >= capacity:
                self.capacity = min(slots, capacity + 1)
        for t in [t for t in self._lru() if t != tip]:
            entry = self.entries[t]
            if 0 < entry.tokens <= cached + 1 and common_prefix(entry.blocks, blocks) == len(entry.blocks):
                self._remove(t)
        if blocks:
            self.tick += 1
            if tip not in self.entries:
                self._add(tuple(blocks), 0, self.tick)
            entry = self.entries[tip]
            if entry.tokens == 0:
                entry.since = self.tick
            entry.tokens = report.prompt_tokens + report.completion_tokens
            entry.reply = report.completion_tokens
            entry.used = self.tick
        self._evict(self.effective_capacity(slots), max_blocks)
        self.reports += 1
        self.predicted_tokens += predicted
        self.reported_tokens += cached
        self.prompt_bytes += report.prompt_bytes
        self.prompt_tokens += report.prompt_tokens

    def drop_pending(self, blocks: Sequence[str]) -> None:
        """The request failed: the node stored nothing for it (an entry an answer already confirmed stays)."""
        if blocks:
            entry = self.entries.get(blocks[-1])
            if entry is not None and entry.tokens == 0:
                self._remove(blocks[-1])

    def forget(self, blocks: Sequence[str]) -> None:
        """The node no longer holds these blocks: cut every entry back to before the first of them."""
        gone = set(blocks)
        for t in self._lru():
            entry = self.entries.get(t)
            if entry is None:
                continue
            cut = next((i for i, b in enumerate(entry.blocks) if b in gone), None)
            if cut is not None:
                self._truncate(t, cut, 1)  # still confirmed; its size is unknown

    # -- internals -------------------------------------------------------------------------------

    def _lru(self) -> list[str]:
        return sorted(self.entries, key=lambda t: (self.entries[t].used, t))

    def _add(self, blocks: tuple[str, ...], tokens: int, used: int) -> None:
        self.entries[blocks[-1]] = CacheEntry(blocks, tokens, used)
        for b in blocks:
            self.refs[b] = self.refs.get(b, 0) + 1

    def _unref(self, blocks: Sequence[str]) -> None:
        for b in blocks:
            n = self.refs.get(b, 0) - 1
            if n > 0:
                self.refs[b] = n
            else:
                self.refs.pop(b, None)

    def _remove(self, tip: str) -> None:
        entry = self.entries.pop(tip)
        self._unref(entry.blocks)

    def _truncate(self, tip: str, keep: int, tokens: int) -> None:
        """Cut an entry back to its first `keep` blocks (merging into an entry that already ends there)."""
        entry = self.entries[tip]
        if keep >= len(entry.blocks):
            return
        if keep <= 0 or entry.blocks[keep - 1] in self.entries:
            self._remove(tip)
            return
        del self.entries[tip]
        self._unref(entry.blocks[keep:])
        self.entries[entry.blocks[keep - 1]] = CacheEntry(entry.blocks[:keep], tokens, entry.used, entry.since, 0)

    def _evict(self, capacity: int | None, max_blocks: int) -> None:
        """Least recently used first: confirmed entries beyond `capacity` (entries in flight take no slot on
        the node: it stores them when they finish, dropping the older entry they extend), then any entry
        while more than `max_blocks` blocks are held."""
        for t in self._lru():
            entry = self.entries[t]
            over_capacity = capacity is not None and entry.tokens > 0 and self._confirmed() > capacity
            if over_capacity or len(self.refs) > max_blocks:
                self._remove(t)

    def _confirmed(self) -> int:
        return sum(1 for e in self.entries.values() if e.tokens > 0)


def belief_view(cache: CacheCounters, cache_slots: int | None) -> dict[str, object]:
    """How well the router's model of a node's cache matched the node's own reports (GET /cluster, status)."""
    out: dict[str, object] = msgspec.to_builtins(cache)
    if cache_slots is not None:
        out["cache_slots"] = cache_slots
    if cache.prompt_tokens:
        out["predicted_share"] = round(cache.predicted_tokens / cache.prompt_tokens, 3)
        out["reported_share"] = round(cache.reported_tokens / cache.prompt_tokens, 3)
    if cache.reports:
        out["miss_rate"] = round(cache.misses / cache.reports, 3)
    return out
