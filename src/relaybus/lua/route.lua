-- Copy events into one subscription stream, each event id at most once per window.
-- KEYS[1] subscription stream, KEYS[2] routed zset (event ids already copied, score ms)
-- ARGV[1] now ms, ARGV[2] window ms, then per event: event id, N, and
--   N > 0: the entry's N field names and values, copied as they are;
--   N = 0: three values d, t, e: the fields of an entry written by EventBus.publish
--          (d, t, k = the event id, e), sent compactly.
-- An id remembered for longer than the window counts as new (it is copied again); an
-- id seen twice in the batch is copied once. The first write is an XADD, so a server
-- out of memory refuses the whole call; the routed set is updated after the copies,
-- so a call that fails half-way can at worst copy an event twice, never lose it.
-- Returns the number of copies written.
local dst, routed = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local oldest = now - tonumber(ARGV[2])
local CHUNK = 500  -- keeps unpack() far below Lua's stack limit

local ids, starts, n_ids = {}, {}, 0
local last = #ARGV
local i = 3
while i <= last do
  n_ids = n_ids + 1
  ids[n_ids] = ARGV[i]
  starts[n_ids] = i
  local n = tonumber(ARGV[i + 1])
  if n == 0 then i = i + 5 else i = i + 2 + n end
end

local copied = 0
local fresh, n_fresh = {}, 0
local seen = {}
for c = 1, n_ids, CHUNK do
  local upto = math.min(c + CHUNK - 1, n_ids)
  local scores = redis.call('ZMSCORE', routed, unpack(ids, c, upto))
  for j = c, upto do
    local id = ids[j]
    local score = scores[j - c + 1]
    if not seen[id] and (not score or tonumber(score) <= oldest) then
      seen[id] = true
      local s = starts[j]
      local n = tonumber(ARGV[s + 1])
      if n == 0 then
        redis.call('XADD', dst, '*', 'd', ARGV[s + 2], 't', ARGV[s + 3], 'k', id, 'e', ARGV[s + 4])
      else
        redis.call('XADD', dst, '*', unpack(ARGV, s + 2, s + 1 + n))
      end
      fresh[n_fresh + 1] = now
      fresh[n_fresh + 2] = id
      n_fresh = n_fresh + 2
      copied = copied + 1
    end
  end
end
for c = 1, n_fresh, 2 * CHUNK do
  redis.call('ZADD', routed, unpack(fresh, c, math.min(c + 2 * CHUNK - 1, n_fresh)))
end
redis.call('ZREMRANGEBYSCORE', routed, '-inf', oldest)
return copied
