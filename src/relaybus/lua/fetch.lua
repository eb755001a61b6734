-- Fetch up to COUNT messages for one consumer in one round trip.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] done zset
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] min idle ms (reclaim),
-- ARGV[5] now ms, ARGV[6] '1' to drop entries whose dedup key is in the done set,
-- ARGV[7] where the reclaim scan of the pending list starts (the cursor returned last time)
-- Steps: move due retries back into the stream; reclaim entries idle past the
-- visibility timeout (a dead consumer's); read new entries.
-- Returns {entries, gone, duplicates, next_due_ms, cursor}; entry = {id, fields, deliveries}.
local stream, delayed, done = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local count = tonumber(ARGV[3])
local min_idle = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local check_done = ARGV[6] == '1'
local cursor = ARGV[7] or '0-0'

local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  local entry = cjson.decode(member)
  redis.call('XADD', stream, '*', unpack(entry, 2))
  redis.call('ZREM', delayed, member)
end

local out = {}
local gone = 0
local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, cursor, 'COUNT', count)
for _, e in ipairs(claimed[2]) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
    local deliveries = 1
    if p[1] then deliveries = p[1][4] end
    out[#out + 1] = {e[1], e[2], deliveries}
  elseif type(e) == 'table' and type(e[1]) == 'string' then
    -- Redis 6.2: pending, but the payload was deleted
    redis.call('XACK', stream, group, e[1])
    gone = gone + 1
  end
end
if claimed[3] then
  gone = gone + #claimed[3]  -- Redis 7+: already dropped from the PEL
end

local left = count - #out
if left > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do out[#out + 1] = {e[1], e[2], 1} end
  end
end

local dups = 0
if check_done then
  local kept = {}
  for _, e in ipairs(out) do
    local key = nil
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'k' then key = f[i + 1] end
    end
    if key and redis.call('ZSCORE', done, key) then
      redis.call('XACK', stream, group, e[1])
      redis.call('XDEL', stream, e[1])
      dups = dups + 1
    else
      kept[#kept + 1] = e
    end
  end
  out = kept
end

local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local next_due = -1
if nxt[2] then next_due = tonumber(nxt[2]) end
return {out, gone, dups, next_due, claimed[1]}
