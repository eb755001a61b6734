-- Append events to the event log, each event (type and id) once per dedup window.
-- KEYS[1] the log, KEYS[2] published zset (dedup record -> ms), KEYS[3] published
-- hash (dedup record -> its log id); a dedup record is codec.dedup_record (16 bytes).
-- ARGV[1] dedup window ms, then per event: its dedup record (of its type and id; ''
-- = none), N, and N field names and values.
-- An identity published within the window (or earlier in this call) is not appended
-- again: its first log id is returned for it, and its position among the repeats.
-- The first write is an XADD, so a server out of memory refuses the whole call
-- (nothing written); the identities older than the window are forgotten after the
-- appends. Returns {the log id of each event, positions (1-based) of repeats}.
local log, zset, hash = KEYS[1], KEYS[2], KEYS[3]
local window = tonumber(ARGV[1])
local now = now_ms()
local out, repeats = {}, {}
local keyed = {}
local this_call = {}  -- dedup identity -> log id, for repeats within this call
local i = 2
while i <= #ARGV do
  local key = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local id = nil
  if key ~= '' then
    id = this_call[key]
    if not id then
      local score = redis.call('ZSCORE', zset, key)
      if score and tonumber(score) >= now - window then id = redis.call('HGET', hash, key) end
    end
  end
  if id then
    repeats[#repeats + 1] = #out + 1
  else
    id = redis.call('XADD', log, '*', unpack(ARGV, i + 2, i + 1 + n))
    if key ~= '' then
      redis.call('HSET', hash, key, id)
      keyed[#keyed + 1] = now
      keyed[#keyed + 1] = key
      this_call[key] = id
    end
  end
  out[#out + 1] = id
  i = i + 2 + n
end
for c = 1, #keyed, 1000 do
  redis.call('ZADD', zset, unpack(keyed, c, math.min(c + 999, #keyed)))
end
-- forget as many expired ids as were published (and at least 1000): the set stays bounded
local old = redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. (now - window), 'LIMIT', 0,
                       math.max(1000, #keyed))
if #old > 0 then
  chunked('HDEL', hash, {}, old)
  chunked('ZREM', zset, {}, old)
end
return {out, repeats}
