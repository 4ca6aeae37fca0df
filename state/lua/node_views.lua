-- node_views: load, bound sessions, outcome statistics and cache model of some nodes, read at one instant
-- (Store.node_views).
--
-- KEYS[8i-7..8i]  for the i-th node: {P}node:{node}:leases, :sessions, :stats, :ttft, :total, :lru, :cache,
--                  :requests
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  session TTL ms - session active ms (a binding is active while its expiry is later than now + this)
-- returns  {now ms, then for each node {live leases, active sessions, stats hash as a flat list, ttft samples,
--          total samples, cache entries, cache hash as a flat list, requests of live leases as a flat list}}
-- Cost: O(leases + requests) per node; records of requests whose lease is gone are dropped on the way.

local now = now_ms()
local active_after = now + tonumber(ARGV[2])
local views = {now}
for i = 1, #KEYS, 8 do
  local requests = {}
  local flat = redis.call("HGETALL", KEYS[i + 7])
  for j = 1, #flat, 2 do
    local expiry = redis.call("ZSCORE", KEYS[i], flat[j])
    if expiry and tonumber(expiry) > now then
      requests[#requests + 1] = flat[j]
      requests[#requests + 1] = flat[j + 1]
    else
      redis.call("HDEL", KEYS[i + 7], flat[j])
    end
  end
  views[#views + 1] = {
    redis.call("ZCOUNT", KEYS[i], "(" .. int(now), "+inf"),
    redis.call("ZCOUNT", KEYS[i + 1], "(" .. int(math.max(now, active_after)), "+inf"),
    redis.call("HGETALL", KEYS[i + 2]),
    redis.call("LRANGE", KEYS[i + 3], 0, -1),
    redis.call("LRANGE", KEYS[i + 4], 0, -1),
    redis.call("ZCARD", KEYS[i + 5]),
    redis.call("HGETALL", KEYS[i + 6]),
    requests,
  }
end
return views
