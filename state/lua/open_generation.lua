-- open_generation: own a new generation, or wait for the live one with this key (Store.open_generation).
--
-- KEYS[1]  {P}gen:{key}           HASH owner, state ("live" | "ended"), end
-- KEYS[2]  {P}gen:{key}:events    LIST
-- KEYS[3]  {P}gen:{key}:waiters   ZSET waiter id -> expiry ms
-- ARGV[1]  key prefix (unused)   ARGV[2] owner id   ARGV[3] waiter id   ARGV[4] TTL ms
-- returns  {"own" | "join" | "none", owner id}

local now = now_ms()
local ttl = tonumber(ARGV[4])
local owner = redis.call("HGET", KEYS[1], "owner")
if not owner then
  redis.call("DEL", KEYS[2], KEYS[3])
  redis.call("HSET", KEYS[1], "owner", ARGV[2], "state", "live")
  redis.call("PEXPIRE", KEYS[1], ttl)
  return {"own", ARGV[2]}
end
if redis.call("HGET", KEYS[1], "state") ~= "live" then
  return {"none", owner}
end
redis.call("ZADD", KEYS[3], int(now + ttl), ARGV[3])
redis.call("PEXPIRE", KEYS[3], redis.call("PTTL", KEYS[1]))
return {"join", owner}
