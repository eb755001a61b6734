-- Append the scheduled events that are due (by the server's clock) to the log, with
-- publish.lua's dedup: an event published meanwhile is not appended twice.
-- KEYS[1] the log, KEYS[2] published zset, KEYS[3] published hash (as publish.lua),
-- KEYS[4] the scheduled zset, KEYS[5] the scheduled hash (as schedule.lua).
-- ARGV[1] dedup window ms, ARGV[2] most events to promote.
-- Each event is appended before it leaves the scheduled set, so a refused write
-- (out of memory) leaves it scheduled. Returns {events promoted, ms until the next
-- scheduled one is due (-1: none left)}.
local log, zset, hash, scheduled, packed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local window = tonumber(ARGV[1])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', scheduled, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local state = new_appends()
local promoted = 0
for _, member in ipairs(due) do
  local raw = redis.call('HGET', packed, member)
  if raw then
    local e = cjson.decode(raw)
    append_event(log, zset, hash, window, now, state, from_hex(e[1]), unpack(e, 3, 2 + tonumber(e[2])))
    promoted = promoted + 1
  end
  redis.call('ZREM', scheduled, member)
  redis.call('HDEL', packed, member)
end
finish_appends(zset, hash, window, now, state)
local nxt = redis.call('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
if #nxt == 0 then return {promoted, -1} end
return {promoted, math.max(0, tonumber(nxt[2]) - now)}
