-- remove_node: drop everything known of a node (Store.remove_node): the sessions bound to it, its
-- prefix-index entries, leases, outcome stats and health record.
--
-- KEYS[1]  {P}node:{node}:sessions   KEYS[2] {P}node:{node}:blocks   KEYS[3] {P}node:{node}:leases
-- KEYS[4]  {P}node:{node}:stats      KEYS[5] {P}node:{node}:ttft     KEYS[6] {P}node:{node}:total
-- KEYS[7]  {P}node-health
-- ARGV[1]  key prefix {P} (binding and block keys are built from it)
-- ARGV[2]  node id
-- returns  {bindings dropped, blocks dropped}

local node = ARGV[2]
local unbound = 0
for _, member in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local key = session_key(member)
  if redis.call("GET", key) == node then
    redis.call("DEL", key)
    unbound = unbound + 1
  end
end
local blocks = redis.call("ZRANGE", KEYS[2], 0, -1)
for _, block in ipairs(blocks) do
  redis.call("HDEL", block_key(block), node)
end
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call("HDEL", KEYS[7], node)
return {unbound, #blocks}
