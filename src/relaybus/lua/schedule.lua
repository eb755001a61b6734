-- Schedule events for later: they wait in a log partition's scheduled set until
-- promote.lua appends them to the log (with publish.lua's dedup) at their time.
-- KEYS[1] the scheduled zset (member -> due ms), KEYS[2] the scheduled hash (member ->
-- the event as JSON: {dedup record in hex, N, fields...}). ARGV, per event: its member
-- (the event id), 'd' and a delay in ms
-- from now (the server's clock) or 'a' and a due time in ms since the epoch, its
-- dedup record in hex ('' = none), N, and N field names and values. Scheduling a member
-- again replaces it (a new time and entry). Returns the due time (ms) of each event.
local zset, hash = KEYS[1], KEYS[2]
local now = now_ms()
local out = {}
local i = 1
while i <= #ARGV do
  local member, kind, value = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local n = tonumber(ARGV[i + 4])
  local due = kind == 'd' and now + value or value
  redis.call('HSET', hash, member, cjson.encode({unpack(ARGV, i + 3, i + 4 + n)}))
  redis.call('ZADD', zset, due, member)
  out[#out + 1] = due
  i = i + 5 + n
end
return out
