-- Copy events into one subscription stream, each event id at most once per window.
-- KEYS[1] subscription stream, KEYS[2] routed zset (event ids already copied)
-- ARGV[1] now ms, ARGV[2] window ms, then per event: event id, field count N, N fields.
-- Returns the number of copies written.
local dst, routed = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local copied = 0
local i = 3
while i <= #ARGV do
  local event_id = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  if redis.call('ZADD', routed, 'NX', now, event_id) == 1 then
    redis.call('XADD', dst, '*', unpack(ARGV, i + 2, i + 1 + n))
    copied = copied + 1
  end
  i = i + 2 + n
end
redis.call('ZREMRANGEBYSCORE', routed, '-inf', now - window)
return copied
