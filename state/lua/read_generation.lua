-- read_generation: a waiter reads the events after the ones it has, and stays a waiter (Store.read_generation).
--
-- KEYS[1..3]  {P}gen:{key}, :events, :waiters (open_generation.lua)
-- ARGV[1]  key prefix (unused)   ARGV[2] waiter id   ARGV[3] events the waiter has   ARGV[4] TTL ms
-- returns  {state ("live" | "ended" | "gone"), end record, events…}

local state = redis.call("HGET", KEYS[1], "state")
if not state then
  return {"gone", ""}
end
if state == "live" then
  redis.call("ZADD", KEYS[3], int(now_ms() + tonumber(ARGV[4])), ARGV[2])
  redis.call("PEXPIRE", KEYS[3], redis.call("PTTL", KEYS[1]))
end
local out = {state, redis.call("HGET", KEYS[1], "end") or ""}
for _, event in ipairs(redis.call("LRANGE", KEYS[2], tonumber(ARGV[3]), -1)) do out[#out + 1] = event end
return out
