-- renew: push back the expiry of leases still in flight (Store.renew and Store.renew_slots, a
-- replica's heartbeat). A lease already released (or trimmed after expiring) is not brought back.
--
-- KEYS[i]  {P}node:{node}:leases (or {P}key:{name}:inflight) of the i-th lease
-- ARGV[1]  key prefix (unused)
-- ARGV[2]  new TTL ms
-- ARGV[2+i] lease id of the i-th lease
-- returns  how many leases were renewed

local now = now_ms()
local ttl = tonumber(ARGV[2])
local renewed = 0
for i, key in ipairs(KEYS) do
  renewed = renewed + redis.call("ZADD", key, "XX", "CH", int(now + ttl), ARGV[2 + i])
  extend_ttl(key, ttl)
end
return renewed
