-- unbind: remove one session binding and its entry in the node's sessions index (Store.unbind).
--
-- KEYS[1]  {P}session:{pool}:{session}
-- ARGV[1]  key prefix {P} (the node's sessions index is found from the binding)
-- ARGV[2]  session member "{pool}:{session}"
-- returns  the node id the session was bound to, or false

local node = redis.call("GET", KEYS[1])
if node then
  redis.call("DEL", KEYS[1])
  redis.call("ZREM", node_key(node, SESSIONS), ARGV[2])
end
return node
