-- cache_model: the router's model of one node's prompt cache, the Lua twin of state/cache_model.py
-- (same rules, same order of steps; tests/contract checks both agree). Prepended to the scripts that
-- use it, after the key prelude. Keys of a node {n}, built from the prefix:
--   {P}node:{n}:lru      ZSET  entry tip block -> last use, on the node's tick (least recent first; ties by tip)
--   {P}node:{n}:entries  HASH  entry tip block -> "<tokens>:<n blocks>:<since>:,<block>,…,<block>,"
--   {P}node:{n}:refs     HASH  block -> entries holding it (held blocks are closed under prefixes)
--   {P}node:{n}:cache    HASH  capacity (learned, 0 = cache_slots), tick, and belief-vs-report counters

local MISS_SLACK_TOKENS = 8

local function cm_keys(node)
  return {
    lru = node_key(node, LRU), entries = node_key(node, ENTRIES),
    refs = node_key(node, REFS), cache = node_key(node, CACHE),
  }
end

local function cm_expire(k, ttl)
  for _, key in ipairs({k.lru, k.entries, k.refs, k.cache}) do redis.call("PEXPIRE", key, ttl) end
end

-- floor(a / b) for non-negative integers held in doubles, exact
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

-- since: the tick at which an answer first confirmed the entry (0 while pending); reply: of its tokens,
-- those the node generated
local function cm_encode(tokens, blocks, n, since, reply)
  return int(tokens) .. ":" .. int(n) .. ":" .. int(since) .. ":" .. int(reply) .. ":,"
    .. table.concat(blocks, ",", 1, n) .. ","
end

-- tokens, n blocks, ",b1,…,bn,", since, reply
local function cm_decode(v)
  local a = string.find(v, ":", 1, true)
  local b = string.find(v, ":", a + 1, true)
  local c = string.find(v, ":", b + 1, true)
  local d = string.find(v, ":", c + 1, true)
  return tonumber(string.sub(v, 1, a - 1)), tonumber(string.sub(v, a + 1, b - 1)), string.sub(v, d + 1),
    tonumber(string.sub(v, b + 1, c - 1)), tonumber(string.sub(v, c + 1, d - 1))
end

local function cm_list(body)
  local out = {}
  for block in string.gmatch(body, "[^,]+") do out[#out + 1] = block end
  return out
end

-- leading blocks of `blocks` the node is believed to hold
local function cm_matched(k, blocks, total)
  local lo, hi = 0, total
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if redis.call("HEXISTS", k.refs, blocks[mid]) == 1 then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- leading blocks an entry shares with `blocks` (chained hashes: once they differ they never agree again)
local function cm_common(n, body, blocks, total)
  local lo, hi = 0, math.min(n, total)
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if string.find(body, "," .. blocks[mid] .. ",", 1, true) then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- leading blocks of `blocks` the node's confirmed entries hold (what it can reuse right now)
local function cm_confirmed_match(k, blocks, total)
  local best = 0
  for _, t in ipairs(redis.call("ZRANGE", k.lru, 0, -1)) do
    local tokens, n, body = cm_decode(redis.call("HGET", k.entries, t))
    if tokens > 0 then best = math.max(best, cm_common(n, body, blocks, total)) end
  end
  return best
end

local function cm_capacity(k, slots)
  local learned = tonumber(redis.call("HGET", k.cache, "capacity") or "0")
  if learned > 0 and learned < slots then return learned end
  return slots
end

local function cm_unref(k, list, from)
  for i = from, #list do
    if redis.call("HINCRBY", k.refs, list[i], -1) <= 0 then redis.call("HDEL", k.refs, list[i]) end
  end
end

local function cm_add(k, blocks, n, tokens, used)
  redis.call("HSET", k.entries, blocks[n], cm_encode(tokens, blocks, n, 0, 0))
  redis.call("ZADD", k.lru, int(used), blocks[n])
  for i = 1, n do redis.call("HINCRBY", k.refs, blocks[i], 1) end
end

local function cm_remove(k, tip)
  local v = redis.call("HGET", k.entries, tip)
  if v then
    local _, _, body = cm_decode(v)
    cm_unref(k, cm_list(body), 1)
    redis.call("HDEL", k.entries, tip)
  end
  redis.call("ZREM", k.lru, tip)
end

-- cut an entry back to its first `keep` blocks, which are prefix[1..keep] (merging into an entry ending there)
local function cm_truncate(k, tip, keep, tokens, prefix)
  local v = redis.call("HGET", k.entries, tip)
  if not v then return end
  local _, n, body, since = cm_decode(v)
  if keep >= n then return end
  if keep <= 0 or redis.call("HEXISTS", k.entries, prefix[keep]) == 1 then
    cm_remove(k, tip)
    return
  end
  local used = redis.call("ZSCORE", k.lru, tip)
  cm_unref(k, cm_list(body), keep + 1)
  redis.call("HDEL", k.entries, tip)
  redis.call("ZREM", k.lru, tip)
  redis.call("HSET", k.entries, prefix[keep], cm_encode(tokens, prefix, keep, since, 0))
  redis.call("ZADD", k.lru, used, prefix[keep])
end

local function cm_tokens(v)
  return tonumber(string.sub(v, 1, string.find(v, ":", 1, true) - 1))
end

-- least recently used first: confirmed entries beyond `capacity` (nil: no capacity check; entries in
-- flight take no slot), then any entry while more than `max_blocks` blocks are held
local function cm_evict(k, capacity, max_blocks)
  if capacity == nil and redis.call("HLEN", k.refs) <= max_blocks then return end
  local order = redis.call("ZRANGE", k.lru, 0, -1)
  local tokens_of, confirmed = {}, 0
  for _, t in ipairs(order) do
    tokens_of[t] = cm_tokens(redis.call("HGET", k.entries, t))
    if tokens_of[t] > 0 then confirmed = confirmed + 1 end
  end
  for _, t in ipairs(order) do
    local over = capacity ~= nil and tokens_of[t] > 0 and confirmed > capacity
    if over or redis.call("HLEN", k.refs) > max_blocks then
      if tokens_of[t] > 0 then confirmed = confirmed - 1 end
      cm_remove(k, t)
    end
  end
end

local function cm_tick(k) return redis.call("HINCRBY", k.cache, "tick", 1) end

-- the node was chosen for this prompt: it will store it
local function cm_predict(k, blocks, total, max_blocks)
  if total == 0 then return end
  if redis.call("HEXISTS", k.entries, blocks[total]) == 1 then return end
  cm_add(k, blocks, total, 0, cm_tick(k))
  cm_evict(k, nil, max_blocks)
end

-- the request failed: the node stored nothing for it
local function cm_drop_pending(k, blocks, total)
  if total == 0 then return end
  local v = redis.call("HGET", k.entries, blocks[total])
  if v and cm_tokens(v) == 0 then cm_remove(k, blocks[total]) end
end

-- r = {blocks, total, prompt_bytes, prompt_tokens, cached, completion, slots}: the node answered and reported
local function cm_report(k, r, block_size, max_blocks)
  local blocks, total, cached = r.blocks, r.total, r.cached
  local tip = ""
  if total > 0 then tip = blocks[total] end
  local others = {}
  for _, t in ipairs(redis.call("ZRANGE", k.lru, 0, -1)) do
    local tokens, _, _, since = cm_decode(redis.call("HGET", k.entries, t))
    if tokens > 0 and (r.seen == nil or since <= r.seen) then others[#others + 1] = t end
  end
  local best, best_common, best_i = nil, 0, 0
  for i, t in ipairs(others) do
    local _, n, body = cm_decode(redis.call("HGET", k.entries, t))
    local c = cm_common(n, body, blocks, total)
    if c >= best_common and c > 0 then best, best_common, best_i = t, c, i end
  end
  local predicted = 0
  local floor, slack = 0, 20
  if best then
    local tokens, n, _, _, reply = cm_decode(redis.call("HGET", k.entries, best))
    if best_common == n and tokens > 0 then
      predicted = math.min(r.prompt_tokens, tokens)
      floor, slack = math.min(r.prompt_tokens, tokens - reply), 100
    elseif r.prompt_bytes > 0 then
      predicted = math.min(r.prompt_tokens, idiv(best_common * block_size * r.prompt_tokens, r.prompt_bytes))
    end
  end
  if r.routed ~= nil and r.routed > best_common then
    predicted = 0
    if r.prompt_bytes > 0 then
      predicted = math.min(r.prompt_tokens, idiv(r.routed * block_size * r.prompt_tokens, r.prompt_bytes))
    end
    floor, slack = 0, 20
  end
  if floor == 0 then floor = predicted end
  local slots = r.slots
  local capacity = cm_capacity(k, slots)
  local miss = cached + math.max(MISS_SLACK_TOKENS, idiv(floor, slack)) < floor
  if miss then redis.call("HINCRBY", k.cache, "misses", 1) end
  if best and (r.routed == nil or best_common >= r.routed) then
    local rank = #others - best_i + 1
    if miss then
      local held = best_common - 1
      if r.prompt_tokens > 0 then
        held = math.min(held, math.min(total, idiv(cached * r.prompt_bytes, r.prompt_tokens * block_size)))
      else
        held = math.min(held, 0)
      end
      if rank == 1 then
        for _, t in ipairs(others) do cm_remove(k, t) end
      else
        local learned = math.max(1, math.min(capacity, math.max(capacity - 1, rank - 1)))
        redis.call("HSET", k.cache, "capacity", int(learned))
        for _, t in ipairs(others) do
          local v = redis.call("HGET", k.entries, t)
          if v then
            local _, n, body = cm_decode(v)
            if cm_common(n, body, blocks, total) > held then cm_truncate(k, t, held, cached, blocks) end
          end
        end
      end
    elseif rank >= capacity then
      redis.call("HSET", k.cache, "capacity", int(math.min(slots, capacity + 1)))
    end
  end
  for _, t in ipairs(redis.call("ZRANGE", k.lru, 0, -1)) do
    if t ~= tip then
      local tokens, n, body = cm_decode(redis.call("HGET", k.entries, t))
      if tokens > 0 and tokens <= cached + 1 and cm_common(n, body, blocks, total) == n then cm_remove(k, t) end
    end
  end
  if total > 0 then
    local tokens = r.prompt_tokens + r.completion
    local tick = cm_tick(k)
    local v = redis.call("HGET", k.entries, tip)
    if v == false then
      cm_add(k, blocks, total, 0, tick)
      v = redis.call("HGET", k.entries, tip)
    end
    local old_tokens, _, _, since = cm_decode(v)
    if old_tokens == 0 then since = tick end
    redis.call("HSET", k.entries, tip, cm_encode(tokens, blocks, total, since, r.completion))
    redis.call("ZADD", k.lru, int(tick), tip)
  end
  cm_evict(k, cm_capacity(k, slots), max_blocks)
  redis.call("HINCRBY", k.cache, "reports", 1)
  redis.call("HINCRBY", k.cache, "predicted_tokens", int(predicted))
  redis.call("HINCRBY", k.cache, "reported_tokens", int(cached))
  redis.call("HINCRBY", k.cache, "prompt_bytes", int(r.prompt_bytes))
  redis.call("HINCRBY", k.cache, "prompt_tokens", int(r.prompt_tokens))
end

-- the node no longer holds these blocks: cut every entry back to before the first of them
local function cm_forget(k, gone)
  for _, t in ipairs(redis.call("ZRANGE", k.lru, 0, -1)) do
    local v = redis.call("HGET", k.entries, t)
    if v then
      local _, _, body = cm_decode(v)
      local list = cm_list(body)
      for i, block in ipairs(list) do
        if gone[block] then
          cm_truncate(k, t, i - 1, 1, list)
          break
        end
      end
    end
  end
end
