-- node_views: load, bound sessions and outcome statistics of some nodes, read at one instant (Store.node_views).
--
-- KEYS[5i-4..5i]  for the i-th node: {P}node:{node}:leases, :sessions, :stats, :ttft, :total
-- ARGV[1]  key prefix (unused)
-- returns  for each node {live leases, live sessions, stats hash as a flat list, ttft samples, total samples}

local now = now_ms()
local views = {}
for i = 1, #KEYS, 5 do
  views[#views + 1] = {
    redis.call("ZCOUNT", KEYS[i], "(" .. int(now), "+inf"),
    redis.call("ZCOUNT", KEYS[i + 1], "(" .. int(now), "+inf"),
    redis.call("HGETALL", KEYS[i + 2]),
    redis.call("LRANGE", KEYS[i + 3], 0, -1),
    redis.call("LRANGE", KEYS[i + 4], 0, -1),
  }
end
return views
