-- A maintenance round of an event log partition: promote its scheduled events that
-- are due (as promote.lua), then trim it by retention, never past an entry some group
-- has not yet acknowledged.
-- KEYS[1] stream; KEYS[2..5] (optional: no promotion without them) as promote.lua's.
-- ARGV[1] max entries to keep (0 = no count limit), ARGV[2] longest age to keep, in ms
-- ('' = no age limit), measured on the server's clock; ARGV[3], ARGV[4] as promote.lua's
-- ARGV[1], ARGV[2].
-- Returns {entries trimmed, id the trim was held at ('' when not held), events
-- promoted, ms until the next scheduled one is due (-1: none)}.
local stream = KEYS[1]
local maxlen = tonumber(ARGV[1])
local max_age = ARGV[2]
local promoted, next_due = 0, -1
if #KEYS >= 5 then
  promoted, next_due = promote_due(stream, KEYS[2], KEYS[3], KEYS[4], KEYS[5],
                                   tonumber(ARGV[3]), tonumber(ARGV[4]))
end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local function after(id)
  local ms, seq = parse(id)
  return string.format('%d-%d', ms, seq + 1)
end

local function trim()
if redis.call('EXISTS', stream) == 0 then return 0, '' end
local cut = nil
if max_age ~= '' then cut = string.format('%d-0', now_ms() - tonumber(max_age)) end
if maxlen > 0 then
  local len = redis.call('XLEN', stream)
  if len > maxlen then
    local r = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.min(len - maxlen, 10000))
    local by_count = after(r[#r][1])
    if cut == nil or less(cut, by_count) then cut = by_count end
  end
end
if cut == nil then return 0, '' end

-- never past what a group still needs: its oldest pending entry, or past its last delivery
local held = ''
local groups = redis.call('XINFO', 'GROUPS', stream)
for _, g in ipairs(groups) do
  local name, last = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local safe = after(last)
  local pending = redis.call('XPENDING', stream, name)
  if pending[1] > 0 and less(pending[2], safe) then safe = pending[2] end
  if less(safe, cut) then
    cut = safe
    held = name
  end
end
return redis.call('XTRIM', stream, 'MINID', cut), held
end

local trimmed, held = trim()
return {trimmed, held, promoted, next_due}
