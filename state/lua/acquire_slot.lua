-- acquire_slot: take one of a team API key's concurrent-request slots, shared by every replica
-- (Store.acquire_slot). Expired slots (of a replica that died mid-request) are dropped first, and so are
-- the slots the caller gives back with this call (ones whose release could not be sent earlier), so a
-- replica making good after a Redis stall never counts its own phantoms against the key.
-- A lease id already held is only renewed.
--
-- KEYS[1]  {P}key:{name}:inflight   ZSET lease id -> expiry ms
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  lease id
-- ARGV[3]  limit: live slots the key may hold
-- ARGV[4]  TTL ms
-- ARGV[5…] lease ids of this key to release first (none or more)
-- returns  1 if the slot is held, 0 if the key already holds `limit` live slots

local key = KEYS[1]
local now = now_ms()
local ttl = tonumber(ARGV[4])
redis.call("ZREMRANGEBYSCORE", key, "-inf", int(now))
for i = 5, #ARGV do redis.call("ZREM", key, ARGV[i]) end
if not redis.call("ZSCORE", key, ARGV[2]) and redis.call("ZCARD", key) >= tonumber(ARGV[3]) then
  return 0
end
redis.call("ZADD", key, int(now + ttl), ARGV[2])
extend_ttl(key, ttl)
return 1
