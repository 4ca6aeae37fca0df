-- finish: release an in-flight lease and record how the request went on its node (Store.finish).
--
-- KEYS[1]  {P}node:{node}:leases   in-flight leases
-- KEYS[2]  {P}node:{node}:stats    outcome counters and token totals
-- KEYS[3]  {P}node:{node}:ttft     recent time-to-first-token samples (newest first)
-- KEYS[4]  {P}node:{node}:total    recent total-time samples (newest first)
-- KEYS[5]  {P}node:{node}:requests what requests in flight are doing (state.inflight)
-- ARGV[1]  key prefix {P} (the node's cache-model keys are built from it)
-- ARGV[2]  lease id
-- ARGV[3]  1 = ok, 0 = failed
-- ARGV[4]  time to first token ms   ARGV[5] total ms   (samples kept only when ok)
-- ARGV[6]  error class (when failed)
-- ARGV[7]  prompt tokens            ARGV[8] cached prompt tokens
-- ARGV[9]  samples kept per list
-- ARGV[10] cache report: "" none, "learn" (an answer with usage), "drop" (failed: it stored nothing)
-- ARGV[11] node id          ARGV[12] prompt bytes     ARGV[13] reported prompt tokens
-- ARGV[14] cached tokens    ARGV[15] completion tokens ARGV[16] cache_slots
-- ARGV[17] block size       ARGV[18] max blocks per node  ARGV[19] prefix model TTL ms
-- ARGV[20] the node's tick when the request was routed ("" = any confirmed entry counts)
-- ARGV[21] blocks its confirmed entries held then ("" = judge from the entries now)
-- ARGV[22] t, then t block hashes of the prompt (capped by the caller)
-- returns  1 if the lease was still held, else 0
-- Cost: O(entries x log t) to compare, plus the blocks of the entries it changes (state/lua/cache_model.lua).

local released = redis.call("ZREM", KEYS[1], ARGV[2])
redis.call("HDEL", KEYS[5], ARGV[2])
local samples = tonumber(ARGV[9])
if ARGV[3] == "1" then
  redis.call("HINCRBY", KEYS[2], F_OK, 1)
  redis.call("LPUSH", KEYS[3], ARGV[4])
  redis.call("LTRIM", KEYS[3], 0, samples - 1)
  redis.call("LPUSH", KEYS[4], ARGV[5])
  redis.call("LTRIM", KEYS[4], 0, samples - 1)
else
  redis.call("HINCRBY", KEYS[2], F_ERROR_CLASS .. ARGV[6], 1)
  if ARGV[6] == CLIENT_CANCEL then
    redis.call("HINCRBY", KEYS[2], F_CANCELLED, 1)
  else
    redis.call("HINCRBY", KEYS[2], F_ERRORS, 1)
  end
end
redis.call("HINCRBY", KEYS[2], F_PROMPT_TOKENS, ARGV[7])
redis.call("HINCRBY", KEYS[2], F_CACHED_TOKENS, ARGV[8])

local mode = ARGV[10]
if mode ~= "" then
  local total = tonumber(ARGV[22])
  local blocks = {}
  for i = 1, total do blocks[i] = ARGV[22 + i] end
  local k = cm_keys(ARGV[11])
  if mode == "learn" then
    local r = {
      blocks = blocks, total = total, prompt_bytes = tonumber(ARGV[12]), prompt_tokens = tonumber(ARGV[13]),
      cached = tonumber(ARGV[14]), completion = tonumber(ARGV[15]), slots = tonumber(ARGV[16]),
      seen = tonumber(ARGV[20]), routed = tonumber(ARGV[21]),
    }
    cm_report(k, r, tonumber(ARGV[17]), tonumber(ARGV[18]))
    cm_expire(k, tonumber(ARGV[19]))
  else
    cm_drop_pending(k, blocks, total)
  end
end
return released
