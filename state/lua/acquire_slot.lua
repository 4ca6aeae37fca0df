-- acquire_slot: take one of a team API key's concurrent-request slots, shared by every replica
-- (Store.acquire_slot). Expired slots (of a replica that died mid-request) are dropped first.
-- A lease id already held is only renewed.
--
-- KEYS[1]  {P}key:{name}:inflight   ZSET lease id -> expiry ms
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  lease id
-- ARGV[3]  limit: live slots the key may hold
-- ARGV[4]  TTL ms
-- returns  1 if the slot is held, 0 if the key already holds `limit` live slots

local key = KEYS[1]
local now = now_ms()
local ttl = tonumber(ARGV[4])
redis.call("ZREMRANGEBYSCORE", key, "-inf", int(now))
if not redis.call("ZSCORE", key, ARGV[2]) and redis.call("ZCARD", key) >= tonumber(ARGV[3]) then
  return 0
end
redis.call("ZADD", key, int(now + ttl), ARGV[2])
extend_ttl(key, ttl)
return 1
