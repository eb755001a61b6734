-- The relaybus script library, put in front of every script by scripts.py.
-- "Now" always comes from the server (TIME): no decision depends on a client's clock.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- When an entry with time to live `l` (ms) expires: its stream id's time (the server's
-- clock when it was appended) plus `l`; nil without one. `id` may carry a prefix
-- ('all/<id>').
local function expiry_of(id, l)
  local ttl = l and tonumber(l)
  if not ttl then return nil end
  return tonumber(string.match(id, '(%d+)%-%d+$')) + ttl
end

-- Most values one unpack() may give (Lua's C stack limit is 8000), and the fields
-- relaybus writes: an entry too wide to write back as it is keeps only these.
local MAX_UNPACK = 7000
local OWN_FIELDS = {d = true, t = true, h = true, k = true, e = true, l = true, x = true,
                    n = true, f = true, p = true}

-- Flat fields `f` as XADD can write them back: as they are, or, too wide for one
-- unpack(), only the fields relaybus writes; and how many fields were dropped.
local function writable(f)
  if #f <= MAX_UNPACK then return f, 0 end
  local kept, dropped = {}, 0
  for i = 1, #f, 2 do
    if OWN_FIELDS[f[i]] then
      kept[#kept + 1] = f[i]
      kept[#kept + 1] = f[i + 1]
    else
      dropped = dropped + 1
    end
  end
  return kept, dropped
end

-- Dedup identity `s` as 32 hex digits: the first 16 bytes of its SHA-1.
local function hex_record_of(s)
  return string.sub(redis.sha1hex(s), 1, 32)
end

-- Hex digits `h` as the bytes they spell.
local function from_hex(h)
  return (string.gsub(h, '..', function(x) return string.char(tonumber(x, 16)) end))
end

-- What is stored for dedup identity `s` (codec.dedup_record): the first 16 bytes of
-- its SHA-1.
local function record_of(s)
  return from_hex(hex_record_of(s))
end

-- The value of field `name` in a flat {k1, v1, k2, v2, ...} list, or nil.
local function field_of(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

-- The members of failure list 'f' as JSON text (nil: none), or nil and the old value
-- when it is not a JSON list (written by another tool), to keep in the record as
-- 'invalid_history'. The list is never decoded into Lua and encoded again: cjson
-- would turn an empty list into {} and round large integers.
local function history_items(raw)
  if raw == nil then return nil, nil end
  local items = string.match(raw, '^%s*%[(.*)%]%s*$')
  if items ~= nil and pcall(cjson.decode, raw) then
    if string.match(items, '^%s*$') then return nil, nil end
    return items, nil
  end
  return nil, raw
end

-- Call `cmd key [extra...] ids` for `ids` in chunks (unpack() has a stack limit).
local function chunked(cmd, key, extra, ids)
  local total = 0
  for c = 1, #ids, 500 do
    local part = {}
    for j = c, math.min(c + 499, #ids) do part[#part + 1] = ids[j] end
    local args = {cmd, key}
    for _, e in ipairs(extra) do args[#args + 1] = e end
    for _, p in ipairs(part) do args[#args + 1] = p end
    total = total + redis.call(unpack(args))
  end
  return total
end

-- Flat `fields` (without 'l') of entry `id` gain 'x', the absolute expiry its time to
-- live `ttl` ('l', from the id's time; nil: none) gives, unless they have one.
local function with_expiry(fields, id, ttl)
  local expiry = expiry_of(id, ttl)
  if expiry and field_of(fields, 'x') == nil then
    fields[#fields + 1] = 'x'
    fields[#fields + 1] = string.format('%d', expiry)
  end
end

-- Park an entry (flat fields `f`, delivered `deliveries` times) with failure `record`
-- (a JSON object's text, kept as the client wrote it; it gains message_id, attempt and
-- timestamp): appended to the stream `dst` (a dead-letter queue) when `due` is nil,
-- else added to the sorted set `dst` (retries, score: due ms) as a JSON list {id, k1,
-- v1, ...}. The entry keeps its fields; its failure list 'f' gains the record; a retry
-- adds its deliveries to the attempt count 'n' (a non-numeric 'n' counts as 0).
local function park(f, id, deliveries, record, dst, due, now)
  local fields, items, invalid, attempts, ttl = {}, nil, nil, 0, nil
  for i = 1, #f, 2 do
    if f[i] == 'f' then
      items, invalid = history_items(f[i + 1])
    elseif f[i] == 'n' then
      attempts = tonumber(f[i + 1]) or 0
    elseif f[i] == 'l' then  -- the entry gets a new id: its expiry becomes absolute
      ttl = f[i + 1]
    else
      fields[#fields + 1] = f[i]
      fields[#fields + 1] = f[i + 1]
    end
  end
  local dropped
  fields, dropped = writable(fields)
  local added = '"message_id":' .. cjson.encode(id) ..
    ',"attempt":' .. string.format('%d', attempts + deliveries) ..
    ',"timestamp":' .. string.format('%.3f', now / 1000)
  if dropped > 0 then added = added .. ',"dropped_fields":' .. dropped end
  if invalid then added = added .. ',"invalid_history":' .. cjson.encode(invalid) end
  local members = string.match(record, '^%s*{(.*)}%s*$')
  if members == nil then  -- not an object (not written by relaybus): kept as text
    members = '"record":' .. cjson.encode(record)
  end
  if string.match(members, '^%s*$') then
    record = '{' .. added .. '}'
  else
    record = '{' .. members .. ',' .. added .. '}'
  end
  fields[#fields + 1] = 'f'
  fields[#fields + 1] = '[' .. (items and (items .. ',') or '') .. record .. ']'
  with_expiry(fields, id, ttl)
  if due == nil then
    if attempts > 0 then
      fields[#fields + 1] = 'n'
      fields[#fields + 1] = tostring(attempts)
    end
    return redis.call('XADD', dst, '*', unpack(fields))
  else
    fields[#fields + 1] = 'n'
    fields[#fields + 1] = tostring(attempts + deliveries)
    table.insert(fields, 1, id)
    redis.call('ZADD', dst, due, cjson.encode(fields))
  end
end

-- Deliveries of a pending entry (1 when it is not pending).
local function deliveries_of(key, group, id)
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if p[1] then return tonumber(p[1][4]) end
  return 1
end

-- Where message `id` lives: the source table ({key, group, delete, prefix}) and the
-- bare stream id. Ids that start with the log's prefix ('all/') are event-log entries
-- read through the subscription's own group on the log; the rest are the queue's own.
local function locate(id, own, log)
  if log and string.sub(id, 1, #log.prefix) == log.prefix then
    return log, string.sub(id, #log.prefix + 1)
  end
  return own, id
end

-- The dedup record, as hex, of an entry with flat fields `f`, routing field `e` and dedup
-- key `k` (codec.dedup_identity): of its event type and its key; the type from the
-- routing field, else from the payload (a copy written without one), and the key alone
-- for an entry that is no event.
local function identity_hex_of(f, e, k)
  local payload = not e and field_of(f, 'd')
  -- only a payload that may name a type is decoded (plain messages, the common case, not)
  if payload and string.find(payload, '"event_type"', 1, true) then
    local ok, data = pcall(cjson.decode, payload)
    if ok and type(data) == 'table' and type(data['event_type']) == 'string' then
      e = data['event_type']
    end
  end
  return hex_record_of(e and (e .. '\031' .. k) or k)
end

-- Ordered subscriptions. An entry with a partition key (field 'p') and a dedup key ('k')
-- is handled only while it holds its key: the order hash maps each key in use to its
-- holder (the hex dedup record of the entry being handled, retried or about to be).
-- Entries that find their key held wait, in arrival order, in the held sorted set
-- (score 0, members `key NUL sequence(20 digits) NUL holder(32 hex) fields(JSON)`, so
-- ZRANGEBYLEX finds a key's first); settling the holder (acknowledged or dead-lettered,
-- not retried) hands the key to the next one, appended to the subscription's stream.
-- `ord` = {order = key, held = key, own = own stream key, meta = meta key or nil}.

-- The partition key of flat fields `f` (nil: none, or one with a NUL, which no event can
-- have and the member format could not hold).
local function partition_of(f)
  local p = field_of(f, 'p')
  if p and not string.find(p, '\0', 1, true) then return p end
  return nil
end

-- Flat fields `f` of entry `id` as they may be appended under a new id: a time to live
-- from the old id ('l') becomes an absolute expiry ('x'); too wide ones trimmed.
local function moved_fields(f, id)
  local out, ttl = {}, nil
  for i = 1, #f, 2 do
    if f[i] == 'l' then ttl = f[i + 1] else
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  with_expiry(out, id, ttl)
  return (writable(out))
end

-- The partition key of a held-set member.
local function held_key(member)
  return string.match(member, '^(.-)%z')
end

-- The partition key, holder and flat fields of a held-set member.
local function held_parts(member)
  local pk = held_key(member)
  local rest = string.sub(member, #pk + 23)
  return pk, string.sub(rest, 1, 32), cjson.decode(string.sub(rest, 33))
end

-- Hold entry `id` (fields `f`, holder `ident`) until key `pk` is free.
local function hold(ord, pk, ident, f, id)
  local seq = redis.call('HINCRBY', ord.meta, 'held_seq', 1)
  redis.call('ZADD', ord.held, 0, pk .. '\0' .. string.format('%020d', seq) .. '\0' ..
             ident .. cjson.encode(moved_fields(f, id)))
end

-- The partition key and holder identity of flat fields `f` (nil: not ordered by a key).
local function key_of(f)
  local pk, k = partition_of(f), field_of(f, 'k')
  if pk and k then return pk, identity_hex_of(f, field_of(f, 'e'), k) end
  return nil, nil
end

-- Hand key `pk` on from holder `ident` (nothing when it is not the holder): to the first
-- entry held for it, appended to the own stream, else to no one. Returns 1 when an entry
-- was handed the key.
local function release(ord, pk, ident)
  if redis.call('HGET', ord.order, pk) ~= ident then return 0 end
  local nxt = redis.call('ZRANGEBYLEX', ord.held, '[' .. pk .. '\0', '(' .. pk .. '\1',
                         'LIMIT', 0, 1)
  if nxt[1] then
    redis.call('ZREM', ord.held, nxt[1])
    local _, holder, fields = held_parts(nxt[1])
    redis.call('HSET', ord.order, pk, holder)
    redis.call('XADD', ord.own, '*', unpack(fields))
    return 1
  end
  redis.call('HDEL', ord.order, pk)
  return 0
end

-- Appending events to a log partition, each identity (codec.dedup_record) once per
-- dedup window: publish.lua and promote.lua (scheduled events, at their time).
-- `state` = new_appends(): what this call appended so far.
local function new_appends()
  return {this_call = {}, keyed = {}}
end

-- Append one event (flat fields `...`) to `log` unless its identity `key` ('' = none)
-- was published within `window` ms (zset `zset`: identity -> ms, hash `hash`: identity
-- -> log id) or earlier in this call; returns its log id and whether it was a repeat.
local function append_event(log, zset, hash, window, now, state, key, ...)
  local id = nil
  if key ~= '' then
    id = state.this_call[key]
    if not id then
      local score = redis.call('ZSCORE', zset, key)
      if score and tonumber(score) >= now - window then id = redis.call('HGET', hash, key) end
    end
  end
  if id then return id, true end
  id = redis.call('XADD', log, '*', ...)
  if key ~= '' then
    redis.call('HSET', hash, key, id)
    state.keyed[#state.keyed + 1] = now
    state.keyed[#state.keyed + 1] = key
    state.this_call[key] = id
  end
  return id, false
end

-- Record the identities appended, and forget as many expired ones as were appended
-- (at least 1000): the dedup set stays bounded.
local function finish_appends(zset, hash, window, now, state)
  local keyed = state.keyed
  for c = 1, #keyed, 1000 do
    redis.call('ZADD', zset, unpack(keyed, c, math.min(c + 999, #keyed)))
  end
  local old = redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. (now - window), 'LIMIT', 0,
                         math.max(1000, #keyed))
  if #old > 0 then
    chunked('HDEL', hash, {}, old)
    chunked('ZREM', zset, {}, old)
  end
end

-- Append the scheduled events of `scheduled` (zset: member -> due ms) that are due by
-- the server's clock to `log` (as publish.lua: dedup by `zset`/`hash` within `window`
-- ms), at most `max`; each is appended before it leaves the set and the hash `packed`
-- (member -> JSON {hex dedup record, N, fields...}), so a refused write (out of memory)
-- leaves it scheduled. Returns the number promoted and the ms until the next scheduled
-- one is due (-1: none left).
local function promote_due(log, zset, hash, scheduled, packed, window, max)
  local now = now_ms()
  local due = redis.call('ZRANGEBYSCORE', scheduled, '-inf', now, 'LIMIT', 0, max)
  local promoted = 0
  if #due > 0 then
    local state = new_appends()
    for _, member in ipairs(due) do
      local raw = redis.call('HGET', packed, member)
      if raw then
        local e = cjson.decode(raw)
        append_event(log, zset, hash, window, now, state, from_hex(e[1]),
                     unpack(e, 3, 2 + tonumber(e[2])))
        promoted = promoted + 1
      end
      redis.call('ZREM', scheduled, member)
      redis.call('HDEL', packed, member)
    end
    finish_appends(zset, hash, window, now, state)
  end
  local nxt = redis.call('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
  if #nxt == 0 then return promoted, -1 end
  return promoted, math.max(0, tonumber(nxt[2]) - now)
end
