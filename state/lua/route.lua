-- route: choose a node for one request and apply the choice, atomically (Store.route).
-- Mirrors state.policy.choose_node step for step, same arithmetic in the same order; keep them in step
-- (tests/contract/test_agreement.py checks both agree).
--
-- KEYS[1]  {P}session:{pool}:{session}  the session's binding (any key when ARGV[2] is "")
-- KEYS[2]  {P}rr:{pool}                 the pool's round-robin counter
-- ARGV[1]  key prefix {P}; per-node keys are built from it (no Redis Cluster)
-- ARGV[2]  session member "{pool}:{session}", "" = no session
-- ARGV[3]  strategy: cache-aware | round-robin | least-loaded | latency-based | random
-- ARGV[4]  lease id
-- ARGV[5]  lease TTL ms            ARGV[6]  session TTL ms
-- ARGV[7]  prefix model TTL ms     ARGV[8]  max blocks per node
-- ARGV[9]  weight load             ARGV[10] weight crowding      ARGV[11] overload factor
-- ARGV[12] weight spread          ARGV[13] random pick in [0, 1) ARGV[14] session active ms
-- ARGV[15] n candidates, then n times: node id, max_concurrency, cache_slots, rendezvous rank
-- then     m, then m node ids fastest first (latency-based)
-- then     t, then t block hashes of the prompt (already capped by the caller)
-- returns  {node id, reason, matched blocks, total blocks, bound (0|1), the chosen node's cache-model tick,
--           blocks its confirmed entries held (the prediction)}
-- Cost: per candidate O(log t) HEXISTS; on the chosen node O(t) to record the prompt (state/lua/cache_model.lua).

local now = now_ms()
local member = ARGV[2]
local strategy = ARGV[3]
local lease_id = ARGV[4]
local lease_ttl = tonumber(ARGV[5])
local session_ttl = tonumber(ARGV[6])
local prefix_ttl = tonumber(ARGV[7])
local max_blocks = tonumber(ARGV[8])
local w_load = tonumber(ARGV[9])
local w_crowding = tonumber(ARGV[10])
local overload_factor = tonumber(ARGV[11])
local w_spread = tonumber(ARGV[12])
local random_pick = tonumber(ARGV[13])
local active_ms = tonumber(ARGV[14])

local pos = 15
local function next_arg()
  local v = ARGV[pos]
  pos = pos + 1
  return v
end

local cands, by_id = {}, {}
local n = tonumber(next_arg())
for i = 1, n do
  local c = {index = i}
  c.id = next_arg()
  c.max_concurrency = tonumber(next_arg())
  c.cache_slots = tonumber(next_arg())
  c.rank = tonumber(next_arg())
  cands[i] = c
  by_id[c.id] = c
end
local latency_order = {}
for i = 1, tonumber(next_arg()) do latency_order[i] = next_arg() end
local blocks = {}
local total = tonumber(next_arg())
for i = 1, total do blocks[i] = next_arg() end

-- load: live leases, active bindings (expired ones trimmed), what each node is believed to hold
local active_after = now + session_ttl - active_ms
for _, c in ipairs(cands) do
  local leases = node_key(c.id, LEASES)
  redis.call("ZREMRANGEBYSCORE", leases, "-inf", now)
  c.inflight = redis.call("ZCARD", leases)
  local sessions = node_key(c.id, SESSIONS)
  redis.call("ZREMRANGEBYSCORE", sessions, "-inf", now)
  c.sessions = redis.call("ZCOUNT", sessions, "(" .. int(active_after), "+inf")
  c.cache = cm_keys(c.id)
  c.matched = cm_matched(c.cache, blocks, total)
  c.capacity = cm_capacity(c.cache, c.cache_slots)
end

local binding = nil
if member ~= "" and strategy == "cache-aware" then
  binding = redis.call("GET", KEYS[1]) or nil
end
local turn = 0
if strategy == "round-robin" then turn = redis.call("INCR", KEYS[2]) - 1 end

-- choose (state.policy.choose_node)
local function overloaded(c) return c.inflight >= c.max_concurrency * overload_factor end
local function cost(c)
  local crowd = math.max(0, c.sessions + 1 - c.capacity)
  local max_concurrency = math.max(1, c.max_concurrency)
  return (total - c.matched) + total * (w_load * c.inflight / max_concurrency + w_crowding * crowd)
    + w_spread * c.sessions
end
local function less(a, b)
  for i = 1, #a do
    if a[i] < b[i] then return true end
    if a[i] > b[i] then return false end
  end
  return false
end
local function lowest(list, key_of)
  local best, best_key = nil, nil
  for _, c in ipairs(list) do
    local k = key_of(c)
    if best == nil or less(k, best_key) then best, best_key = c, k end
  end
  return best
end

local chosen, reason, bind = nil, nil, false
if strategy == "round-robin" then
  chosen, reason = cands[(turn % n) + 1], "round-robin"
elseif strategy == "random" then
  chosen, reason = cands[math.min(math.floor(random_pick * n), n - 1) + 1], "random"
elseif strategy == "least-loaded" then
  chosen = lowest(cands, function(c)
    return {c.inflight / math.max(1, c.max_concurrency), c.sessions, -c.rank, c.index}
  end)
  reason = "least-loaded"
elseif strategy == "latency-based" then
  local order, placed = {}, {}
  for _, id in ipairs(latency_order) do
    local c = by_id[id]
    if c and not placed[id] then order[#order + 1] = c; placed[id] = true end
  end
  for _, c in ipairs(cands) do
    if not placed[c.id] then order[#order + 1] = c end
  end
  chosen = order[1]
  for _, c in ipairs(order) do
    if not overloaded(c) then chosen = c; break end
  end
  reason = "latency"
else
  bind = member ~= ""
  local all_overloaded = true
  for _, c in ipairs(cands) do
    if not overloaded(c) then all_overloaded = false end
  end
  if bind and binding then
    local b = by_id[binding]
    if b == nil then
      reason = "rebind-unavailable"
    elseif overloaded(b) and not all_overloaded then
      reason = "rebind-overloaded"
    else
      local holds = b.matched + math.max(1, math.floor(total / 4))
      local evicted = false
      for _, c in ipairs(cands) do
        if c.matched >= holds and not overloaded(c) then evicted = true end
      end
      if evicted then reason = "rebind-evicted" else chosen, reason = b, "session" end
    end
  end
  if chosen == nil then
    local eligible = {}
    for _, c in ipairs(cands) do
      if all_overloaded or not overloaded(c) then eligible[#eligible + 1] = c end
    end
    chosen = lowest(eligible, function(c) return {cost(c), c.sessions, -c.rank, c.index} end)
    if reason == "rebind-evicted" and chosen.id == binding then reason = "session" end
    if reason == nil then
      if chosen.matched > 0 then reason = "prefix" else reason = "cold" end
    end
  end
end

-- apply: binding (first writer wins: this script is atomic), lease, predicted entry
local node = chosen.id
if bind then
  if binding ~= node then
    if binding then redis.call("ZREM", node_key(binding, SESSIONS), member) end
    redis.call("SET", KEYS[1], node, "PX", session_ttl)
  else
    redis.call("PEXPIRE", KEYS[1], session_ttl)
  end
  local sessions = node_key(node, SESSIONS)
  redis.call("ZADD", sessions, int(now + session_ttl), member)
  extend_ttl(sessions, session_ttl)
end

local leases = node_key(node, LEASES)
redis.call("ZADD", leases, int(now + lease_ttl), lease_id)
extend_ttl(leases, lease_ttl)

local tick, predicted = 0, 0
if total > 0 then
  predicted = cm_confirmed_match(chosen.cache, blocks, total)
  cm_predict(chosen.cache, blocks, total, max_blocks)
  cm_expire(chosen.cache, prefix_ttl)
  tick = tonumber(redis.call("HGET", chosen.cache.cache, "tick") or "0")
end

return {node, reason, chosen.matched, total, bind and 1 or 0, tick, predicted}
