-- cas_health: replace a node's health record if nobody changed it since it was read (Store.cas_health).
--
-- KEYS[1]  {P}node-health
-- ARGV[1]  key prefix {P} (unused)
-- ARGV[2]  node id
-- ARGV[3]  the version the caller read (0 = no record)
-- ARGV[4]  the new record, JSON, whose "version" is ARGV[3] + 1
-- returns  1 if written, 0 if the stored version differs

local current = redis.call("HGET", KEYS[1], ARGV[2])
local version = 0
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == "table" and tonumber(record.version) then version = tonumber(record.version) end
end
if version ~= tonumber(ARGV[3]) then return 0 end
redis.call("HSET", KEYS[1], ARGV[2], ARGV[4])
return 1
