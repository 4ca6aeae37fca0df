-- tick_generation: the owner renews its generation, appends events, and may end it (Store.tick_generation).
--
-- KEYS[1..3]  {P}gen:{key}, :events, :waiters (open_generation.lua)
-- ARGV[1]  key prefix (unused)   ARGV[2] owner id   ARGV[3] TTL ms   ARGV[4] grace ms (kept after the end)
-- ARGV[5]  end record, "" = not the end
-- ARGV[6..]  events to append, in order
-- returns  live waiters, or -1 when the generation is not the caller's (lapsed, or another owner's)
-- Cost: O(events appended + waiters expired).

local now = now_ms()
if redis.call("HGET", KEYS[1], "owner") ~= ARGV[2] then
  return -1
end
for i = 6, #ARGV, 1000 do  -- in slices: unpack has a limit on how many values it returns
  redis.call("RPUSH", KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if ARGV[5] ~= "" then
  redis.call("HSET", KEYS[1], "state", "ended", "end", ARGV[5])
end
local ttl = tonumber(ARGV[3])
if redis.call("HGET", KEYS[1], "state") == "ended" then ttl = tonumber(ARGV[4]) end
for _, key in ipairs(KEYS) do redis.call("PEXPIRE", key, ttl) end
redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", now)
return redis.call("ZCARD", KEYS[3])
