-- remove_node: drop everything known of a node (Store.remove_node): the sessions bound to it, the model
-- of its cache, leases, outcome stats and health record.
--
-- KEYS[1]  {P}node-health
-- ARGV[1]  key prefix {P} (the node's keys and binding keys are built from it)
-- ARGV[2]  node id
-- returns  {bindings dropped, cache entries dropped}

local node = ARGV[2]
local sessions = node_key(node, SESSIONS)
local unbound = 0
for _, member in ipairs(redis.call("ZRANGE", sessions, 0, -1)) do
  local key = session_key(member)
  if redis.call("GET", key) == node then
    redis.call("DEL", key)
    unbound = unbound + 1
  end
end
local entries = redis.call("ZCARD", node_key(node, LRU))
for _, kind in ipairs({SESSIONS, LEASES, LRU, ENTRIES, REFS, CACHE, STATS, TTFT, TOTAL, REQUESTS}) do
  redis.call("DEL", node_key(node, kind))
end
redis.call("HDEL", KEYS[1], node)
return {unbound, entries}
