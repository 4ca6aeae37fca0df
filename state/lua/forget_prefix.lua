-- forget_prefix: the node no longer holds these blocks: cut every entry of its cache model back to before
-- the first of them (Store.forget_prefix).
--
-- ARGV[1]  key prefix {P} (the node's cache-model keys are built from it)
-- ARGV[2]  node id
-- ARGV[2+i] hash of the i-th block
-- returns  entries left in the node's model

local gone = {}
for i = 3, #ARGV do gone[ARGV[i]] = true end
local k = cm_keys(ARGV[2])
cm_forget(k, gone)
return redis.call("ZCARD", k.lru)
