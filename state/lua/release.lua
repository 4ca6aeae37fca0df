-- release: give back in-flight leases and team-key slots by id, recording nothing else (Store.release).
-- What a replica sends to make good a store call that timed out (it may still have run in Redis) or a
-- release it skipped while Redis could not be reached. Ids not held are ignored.
--
-- KEYS[i]  {P}node:{node}:leases or {P}key:{name}:inflight of the i-th id
-- ARGV[1]  key prefix (unused)
-- ARGV[1+i] the i-th lease id
-- returns  how many were still held

local released = 0
for i, key in ipairs(KEYS) do
  released = released + redis.call("ZREM", key, ARGV[1 + i])
end
return released
