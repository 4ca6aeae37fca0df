-- node_views: load, bound sessions, outcome statistics and cache model of some nodes, read at one instant
-- (Store.node_views).
--
-- KEYS[7i-6..7i]  for the i-th node: {P}node:{node}:leases, :sessions, :stats, :ttft, :total, :lru, :cache
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  session TTL ms - session active ms (a binding is active while its expiry is later than now + this)
-- returns  for each node {live leases, active sessions, stats hash as a flat list, ttft samples, total samples,
--          cache entries, cache hash as a flat list}

local now = now_ms()
local active_after = now + tonumber(ARGV[2])
local views = {}
for i = 1, #KEYS, 7 do
  views[#views + 1] = {
    redis.call("ZCOUNT", KEYS[i], "(" .. int(now), "+inf"),
    redis.call("ZCOUNT", KEYS[i + 1], "(" .. int(math.max(now, active_after)), "+inf"),
    redis.call("HGETALL", KEYS[i + 2]),
    redis.call("LRANGE", KEYS[i + 3], 0, -1),
    redis.call("LRANGE", KEYS[i + 4], 0, -1),
    redis.call("ZCARD", KEYS[i + 5]),
    redis.call("HGETALL", KEYS[i + 6]),
  }
end
return views
