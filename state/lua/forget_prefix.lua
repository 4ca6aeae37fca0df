-- forget_prefix: drop blocks from one node's prefix index (Store.forget_prefix).
--
-- KEYS[1]  {P}node:{node}:blocks   the node's block LRU
-- KEYS[1+i] {P}block:{hash} of the i-th block
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  node id
-- ARGV[2+i] hash of the i-th block
-- returns  how many blocks the node's LRU held

local node = ARGV[2]
local dropped = 0
for i = 2, #KEYS do
  redis.call("HDEL", KEYS[i], node)
  dropped = dropped + redis.call("ZREM", KEYS[1], ARGV[1 + i])
end
return dropped
