-- progress: what requests in flight are doing on their nodes (Store.progress, state.inflight).
--
-- ARGV[1]  key prefix {P}; the nodes' keys are built from it
-- ARGV[2]  n, then n times: node id, lease id, "phase|done|total|", age ms, "|joined|session"
-- returns  the number of records written (only requests whose lease is live get one)
-- Cost: O(n).

local now = now_ms()
local written = 0
local pos = 3
for _ = 1, tonumber(ARGV[2]) do
  local node, lease, head, age, tail = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3], ARGV[pos + 4]
  pos = pos + 5
  local leases = node_key(node, LEASES)
  local expiry = redis.call("ZSCORE", leases, lease)
  if expiry and tonumber(expiry) > now then
    local requests = node_key(node, REQUESTS)
    redis.call("HSET", requests, lease, head .. int(now - tonumber(age)) .. tail)
    extend_ttl(requests, redis.call("PTTL", leases))
    written = written + 1
  end
end
return written
