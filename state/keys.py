"""Every Redis key of mlxmux, in one place (docs/redis-keys.md documents each for redis-cli users).

All keys start with the configured prefix (`mlxmux:` by default):

    {prefix}session:{pool}:{session}   STRING  node id the session is bound to (TTL: session TTL)
    {prefix}node:{node}:sessions       ZSET    "{pool}:{session}" -> binding expiry ms (counts bound sessions)
    {prefix}node:{node}:leases         ZSET    lease id -> lease expiry ms (counts in-flight requests)
    {prefix}node:{node}:lru            ZSET    entry tip block -> last used ms (the model of the node's prompt cache)
    {prefix}node:{node}:entries        HASH    entry tip block -> "<tokens>:<n>:<since>:<reply>:,<block>,…,"
    {prefix}node:{node}:refs           HASH    block hash -> entries holding it (the blocks the node holds)
    {prefix}node:{node}:cache          HASH    learned capacity and belief-vs-report counters
    {prefix}node:{node}:stats          HASH    outcome counters and token totals
    {prefix}node:{node}:ttft           LIST    recent time-to-first-token samples, ms (capped)
    {prefix}node:{node}:total          LIST    recent total-time samples, ms (capped)
    {prefix}node:{node}:requests       HASH    lease id -> "phase|done|total|started ms|joined|session": what each
                                               request in flight is doing (state.inflight; only live leases)
    {prefix}rr:{pool}                  STRING  round-robin counter of the pool
    {prefix}node-health                HASH    node id -> health record (JSON, state.health.NodeHealth)
    {prefix}probe:{node}               STRING  replica probing the node this interval (TTL: the interval)
    {prefix}registry                   HASH    node id -> node added at run time (JSON), or a removal mark
    {prefix}epoch                      STRING  a token set once by the first replica to find none: a new one
                                               means the store lost its data (replicas then re-assert intent)
    {prefix}key:{name}:inflight        ZSET    lease id -> expiry ms: a team API key's requests in flight
    {prefix}gen:{key}                  HASH    a streamed answer resends may join: owner, state, end record
    {prefix}gen:{key}:events           LIST    its events so far, in order (written while someone waits)
    {prefix}gen:{key}:waiters          ZSET    waiter id -> expiry ms: the resends waiting for it

`{pool}` has `%` and `:` percent-escaped, so `{pool}:{session}` splits unambiguously at its first colon.
Node ids are used as they are: every node key ends in a fixed kind name, which keeps them apart.
The Lua scripts that must build keys at run time get them from `lua_prelude()`, built from these
constants, so this module stays the only place that spells a key.
"""

from __future__ import annotations

SESSION = "session:"
NODE = "node:"
RR = "rr:"
NODE_HEALTH = "node-health"
PROBE = "probe:"
REGISTRY = "registry"
EPOCH = "epoch"
KEY = "key:"
INFLIGHT = "inflight"
GEN = "gen:"

# kinds of per-node keys: {prefix}node:{node}:{kind}
SESSIONS = "sessions"
LEASES = "leases"
LRU = "lru"
ENTRIES = "entries"
REFS = "refs"
CACHE = "cache"
STATS = "stats"
TTFT = "ttft"
TOTAL = "total"
REQUESTS = "requests"
CACHE_KINDS = (LRU, ENTRIES, REFS, CACHE)
"""The model of the node's prompt cache (state.cache_model)."""
NODE_KINDS = (SESSIONS, LEASES, *CACHE_KINDS, STATS, TTFT, TOTAL, REQUESTS)

# fields of {prefix}node:{node}:stats
OK = "ok"
ERRORS = "errors"
CANCELLED = "cancelled"
ERROR_CLASS = "error:"
"""Prefix of the per-class failure counters, e.g. `error:timeout`."""
PROMPT_TOKENS = "prompt_tokens"
CACHED_TOKENS = "cached_tokens"
CLIENT_CANCEL = "client_cancel"
"""The error class of a request its client abandoned: counted apart, not against the node."""

# fields of {prefix}node:{node}:cache (state.cache_model.CacheCounters; the entry count is ZCARD of :lru)
CACHE_FIELDS = ("capacity", "reports", "predicted_tokens", "reported_tokens", "misses", "prompt_bytes", "prompt_tokens")


def escape_pool(pool: str) -> str:
    return pool.replace("%", "%25").replace(":", "%3A")


def unescape_pool(escaped: str) -> str:
    return escaped.replace("%3A", ":").replace("%25", "%")


def session_member(pool: str, session: str) -> str:
    """`{pool}:{session}`: a binding's name inside its node's sessions index and its key's suffix."""
    return f"{escape_pool(pool)}:{session}"


def split_session_member(member: str) -> tuple[str, str]:
    pool, _, session = member.partition(":")
    return unescape_pool(pool), session


def session_key(prefix: str, pool: str, session: str) -> str:
    return f"{prefix}{SESSION}{session_member(pool, session)}"


def node_key(prefix: str, node_id: str, kind: str) -> str:
    return f"{prefix}{NODE}{node_id}:{kind}"


def rr_key(prefix: str, pool: str) -> str:
    return f"{prefix}{RR}{escape_pool(pool)}"


def node_health_key(prefix: str) -> str:
    return f"{prefix}{NODE_HEALTH}"


def probe_key(prefix: str, node_id: str) -> str:
    return f"{prefix}{PROBE}{node_id}"


def registry_key(prefix: str) -> str:
    return f"{prefix}{REGISTRY}"


def epoch_key(prefix: str) -> str:
    return f"{prefix}{EPOCH}"


def key_inflight_key(prefix: str, key_name: str) -> str:
    """The slots of a team API key (by its configured name, never the key itself)."""
    return f"{prefix}{KEY}{key_name}:{INFLIGHT}"


def generation_keys(prefix: str, key: str) -> list[str]:
    """A generation's record, its events and its waiters (state.inflight)."""
    head = f"{prefix}{GEN}{key}"
    return [head, f"{head}:events", f"{head}:waiters"]


def lua_prelude() -> str:
    """Lua prepended to the scripts that build keys at run time; ARGV[1] must be the key prefix."""
    return f"""if redis.replicate_commands then redis.replicate_commands() end
local P = ARGV[1]
local function session_key(member) return P .. "{SESSION}" .. member end
local function node_key(node, kind) return P .. "{NODE}" .. node .. ":" .. kind end
local SESSIONS, LEASES = "{SESSIONS}", "{LEASES}"
local LRU, ENTRIES, REFS, CACHE = "{LRU}", "{ENTRIES}", "{REFS}", "{CACHE}"
local STATS, TTFT, TOTAL, REQUESTS = "{STATS}", "{TTFT}", "{TOTAL}", "{REQUESTS}"
local F_OK, F_ERRORS, F_CANCELLED, F_ERROR_CLASS = "{OK}", "{ERRORS}", "{CANCELLED}", "{ERROR_CLASS}"
local F_PROMPT_TOKENS, F_CACHED_TOKENS, CLIENT_CANCEL = "{PROMPT_TOKENS}", "{CACHED_TOKENS}", "{CLIENT_CANCEL}"
local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format("%d", x) end
local function extend_ttl(key, ttl)
  if redis.call("PTTL", key) < ttl then redis.call("PEXPIRE", key, ttl) end
end
"""
