-- Deliver up to COUNT messages to one consumer, in one round trip.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] done zset, KEYS[4] dead-letter stream,
-- KEYS[5] leases hash (consumer -> its visibility timeout, ms); a subscription adds
-- KEYS[6] the event log, KEYS[7] its meta hash, KEYS[8] its order hash and KEYS[9] its
-- held sorted set (an ordered subscription's, see lib.lua).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] this consumer's visibility
-- timeout ms (its lease), ARGV[5] queue name (failure records), ARGV[6] max deliveries,
-- ARGV[7] reclaim cursor, ARGV[8] '1' to screen entries (expired, over-delivered, done;
-- '0' for a dead-letter queue, which shows what it holds as it is), ARGV[9] '1' to do
-- the periodic work first (due retries back into the stream; entries whose holder's
-- lease lapsed reclaimed), ARGV[10] idle ms after which a consumer holding nothing is
-- pruned from the group(s) ('' or 0: not this time); a subscription adds ARGV[11] its
-- group on the log, ARGV[12] its reclaim cursor there, ARGV[13] the id prefix of log
-- entries ('all/').
-- New entries are read from the queue's own stream. A subscription's new log entries
-- are read by the client with a plain XREADGROUP (the hot path); here only its
-- reclaimed ones (periodic work) are screened. An ordered subscription (meta 'ordered'
-- '1') reads its new log entries here too: every entry with a partition key is
-- delivered only while it holds its key, else held back (lib.lua); its periodic work
-- also hands on keys whose holder was acknowledged without handing them on. A
-- subscription that is not ordered (any more) gets its held entries back into its
-- stream at its periodic work.
-- Reclaim is decided by the lease the holder took, not by the caller's: every consumer
-- records its visibility timeout in the leases hash at its periodic fetch, and an entry
-- is taken over only once idle for its holder's (the caller's for a holder that has
-- none recorded). Instances with different timeouts (a rolling deploy) never take each
-- other's running entries.
-- Expired entries and entries delivered more than max deliveries times go to the
-- dead-letter queue with the reason; entries of the own stream whose dedup key is done
-- are dropped (acknowledged).
-- Returns {entries, gone, duplicates, dead, ms until the next retry is due (-1: none),
-- cursor, log cursor, more, wake ids, types, skipped, pruned, ordered}; entry = {id,
-- fields, deliveries}; more = 1 when all it read was dropped or held (call again before
-- blocking); wake ids = the newest id of the own stream (and, ordered, of the log), to
-- block on (XREAD) when nothing was delivered; types = the subscription's stored types
-- (JSON) for the client's filter of new log entries; pruned = consumers removed;
-- ordered = 1 for an ordered subscription (the client then reads the log only here).
local own = {key = KEYS[1], group = ARGV[1], delete = true, prefix = ''}
local delayed, done, dlq, leases_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local consumer = ARGV[2]
local count = tonumber(ARGV[3])
local min_idle = tonumber(ARGV[4])
local qname = ARGV[5]
local max_deliveries = tonumber(ARGV[6])
local cursor = ARGV[7]
local screen = ARGV[8] == '1'
local periodic = ARGV[9] == '1'
local prune_ms = tonumber(ARGV[10]) or 0
local log, meta, ord = nil, nil, nil
if #KEYS >= 7 then
  log = {key = KEYS[6], group = ARGV[11], delete = false, prefix = ARGV[13]}
  meta = KEYS[7]
end
if #KEYS >= 9 then ord = {order = KEYS[8], held = KEYS[9], own = KEYS[1], meta = KEYS[7]} end
local log_cursor = ARGV[12] or '0-0'
local now = now_ms()

-- a candidate: {src, id, fields, deliveries, e, k, x, p} (e, k, x, p: its routing,
-- dedup, expiry and partition fields, read in one pass)
local cands = {}
local function add(src, id, f, deliveries)
  local e, k, x, l, p
  for i = 1, #f, 2 do
    local name = f[i]
    if name == 'e' then e = f[i + 1] elseif name == 'k' then k = f[i + 1]
    elseif name == 'x' then x = f[i + 1] elseif name == 'l' then l = f[i + 1]
    elseif name == 'p' then p = f[i + 1] end
  end
  if p and string.find(p, '\0', 1, true) then p = nil end  -- see lib.lua's partition_of
  cands[#cands + 1] = {src, id, f, deliveries, e, k, x or expiry_of(id, l), p}
end

local gone, skipped = 0, 0

-- every consumer's lease; uniform when all are the caller's (the common case: one
-- setting for all instances), and the caller's own recorded
local leases, uniform, shortest = {}, true, min_idle
if periodic then
  local flat = redis.call('HGETALL', leases_key)
  for i = 1, #flat, 2 do
    local ms = tonumber(flat[i + 1])
    leases[flat[i]] = ms
    if ms ~= min_idle then uniform = false end
    if ms < shortest then shortest = ms end
  end
  if leases[consumer] ~= min_idle then
    redis.call('HSET', leases_key, consumer, min_idle)
    leases[consumer] = min_idle
  end
end

-- the next id after stream id `id` (an inclusive start for the next scan)
local function after(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return ms .. '-' .. (tonumber(seq) + 1)
end

-- entries pending for longer than their holder's lease, taken over by this consumer
local function reclaim(src, from, limit)
  if limit <= 0 then return from end
  if not uniform then  -- like XAUTOCLAIM: look at up to ten times as many as it takes
    local scan = limit * 10
    local rows = redis.call('XPENDING', src.key, src.group, 'IDLE', shortest, from, '+', scan)
    local taken = 0
    for i, row in ipairs(rows) do
      local id, lease = row[1], leases[row[2]] or min_idle
      if tonumber(row[3]) >= lease then
        local got = redis.call('XCLAIM', src.key, src.group, consumer, lease, id)
        local e = got[1]
        if type(e) == 'table' and type(e[2]) == 'table' then
          add(src, e[1], e[2], tonumber(row[4]) + 1)
          taken = taken + 1
        else  -- deleted from the stream (Redis 7+ dropped it from the PEL, 6.2 did not)
          redis.call('XACK', src.key, src.group, id)
          gone = gone + 1
        end
        if taken >= limit then return (i < #rows or #rows == scan) and after(id) or '0-0' end
      end
    end
    if #rows < scan then return '0-0' end
    return after(rows[#rows][1])
  end
  local r = redis.call('XAUTOCLAIM', src.key, src.group, consumer, min_idle, from, 'COUNT', limit)
  local holes = false
  for _, e in ipairs(r[2]) do
    if type(e) == 'table' and type(e[2]) == 'table' then
      add(src, e[1], e[2], deliveries_of(src.key, src.group, e[1]))
    else
      holes = true
    end
  end
  if r[3] then gone = gone + #r[3] end  -- Redis 7+: already dropped from the PEL
  if holes and not r[3] then
    -- Redis 6.2: an entry pending but deleted from the stream comes back as nil, without
    -- its id, and stays pending; find the claimed ids with no entry and acknowledge them
    local to = r[1] == '0-0' and '+' or '(' .. r[1]
    local rows = redis.call('XPENDING', src.key, src.group, from, to, limit, consumer)
    for _, row in ipairs(rows) do
      if #redis.call('XRANGE', src.key, row[1], row[1]) == 0 then
        redis.call('XACK', src.key, src.group, row[1])
        gone = gone + 1
      end
    end
  end
  return r[1]
end

-- consumers that hold nothing and were not seen for prune_ms (and twice their lease):
-- dead or long gone instances, removed from the groups with their leases
local function prune(srcs)
  local names, keep = {}, {[consumer] = true}
  for _, src in ipairs(srcs) do
    local ok, rows = pcall(redis.call, 'XINFO', 'CONSUMERS', src.key, src.group)
    if ok then
      for _, row in ipairs(rows) do
        local name, pending, idle
        for i = 1, #row, 2 do
          local f = row[i]
          if f == 'name' then name = row[i + 1]
          elseif f == 'pending' then pending = tonumber(row[i + 1])
          elseif f == 'idle' then idle = tonumber(row[i + 1]) end
        end
        names[name] = true
        local lease = leases[name] or min_idle
        if pending > 0 or idle < prune_ms or idle < 2 * lease then keep[name] = true end
      end
    end
  end
  local pruned = 0
  for name in pairs(names) do
    if not keep[name] then
      for _, src in ipairs(srcs) do
        pcall(redis.call, 'XGROUP', 'DELCONSUMER', src.key, src.group, name)
      end
      redis.call('HDEL', leases_key, name)
      pruned = pruned + 1
    end
  end
  for name in pairs(leases) do  -- leases of consumers in no group any more
    if not names[name] and not keep[name] then redis.call('HDEL', leases_key, name) end
  end
  return pruned
end

-- the log is read only by a subscription that keeps some types (an unsubscribed one
-- reads nothing from it: its group there is gone)
local types_json, reads_log = '[]', false
local types, all = {}, false
local ordered = false
if log then
  local stored = redis.call('HMGET', meta, 'types', 'ordered')
  types_json = stored[1] or '[]'
  ordered = ord ~= nil and stored[2] == '1'
  local ok, decoded = pcall(cjson.decode, types_json)
  if ok and type(decoded) == 'table' then
    for _, t in ipairs(decoded) do
      reads_log = true
      if t == '*' then all = true else types[t] = true end
    end
  end
end

-- a log entry of a type the subscription does not keep (reclaimed from a consumer that
-- read it before the types changed, or that never screened it): acknowledged, skipped
local function kept_type(c)
  if all or c[1] ~= log then return true end
  local etype = c[5]
  if not etype then
    local okd, data = pcall(cjson.decode, field_of(c[3], 'd') or '')
    if okd and type(data) == 'table' and type(data['event_type']) == 'string' then
      etype = data['event_type']
    end
  end
  return etype == nil or types[etype] == true
end

-- log entries from cands[first] on that are of types the subscription does not keep:
-- acknowledged and dropped from the candidates
local function screen_types(first)
  local kept, skip = {}, {}
  for i = first, #cands do
    if kept_type(cands[i]) then kept[#kept + 1] = cands[i] else skip[#skip + 1] = cands[i][2] end
  end
  for i = #cands, first, -1 do cands[i] = nil end
  for _, c in ipairs(kept) do cands[#cands + 1] = c end
  if #skip > 0 then
    chunked('XACK', log.key, {log.group}, skip)
    skipped = skipped + #skip
  end
end

-- a candidate's dedup record as hex (lib.lua)
local function identity_hex(c)
  return identity_hex_of(c[3], c[5], c[6])
end

if periodic and ord then
  if ordered then
    -- keys whose holder was acknowledged (its done record exists) without handing the
    -- key on (settled by an instance that did not know the subscription was ordered),
    -- looked for among up to 100 held entries picked at random (every key in turn)
    local seen = {}
    for _, member in ipairs(redis.call('ZRANDMEMBER', ord.held, 100)) do
      local pk = held_key(member)
      if pk and not seen[pk] then
        seen[pk] = true
        local holder = redis.call('HGET', ord.order, pk)
        if not holder or redis.call('ZSCORE', done, from_hex(holder)) then
          if not holder then redis.call('HSET', ord.order, pk, '') end
          release(ord, pk, holder or '')
        end
      end
    end
  elseif redis.call('EXISTS', ord.held, ord.order) > 0 then
    -- not ordered (any more): what was held goes back into the stream, keys are freed
    local members = redis.call('ZRANGE', ord.held, 0, 999)
    for _, member in ipairs(members) do
      local _, _, fields = held_parts(member)
      redis.call('XADD', own.key, '*', unpack(fields))
      redis.call('ZREM', ord.held, member)
    end
    if #members < 1000 then redis.call('DEL', ord.order) end
  end
end

if periodic then
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(due) do
    local entry = cjson.decode(member)
    redis.call('XADD', own.key, '*', unpack(entry, 2))
    redis.call('ZREM', delayed, member)
  end
  cursor = reclaim(own, cursor, count)
  if reads_log then
    local first = #cands + 1
    log_cursor = reclaim(log, log_cursor, count - #cands)
    screen_types(first)
  end
end

local function read_new(src, limit)
  if limit <= 0 then return 0 end
  local r = redis.call('XREADGROUP', 'GROUP', src.group, consumer, 'COUNT', limit,
                      'STREAMS', src.key, '>')
  if not r then return 0 end
  for _, e in ipairs(r[1][2]) do add(src, e[1], e[2], 1) end
  return #r[1][2]
end
read_new(own, count - #cands)
if ordered and reads_log then  -- an ordered subscription's new log entries: read here
  local first = #cands + 1
  read_new(log, count - #cands)
  screen_types(first)
end

local more, dups = 0, 0

-- a candidate's dedup record (codec.dedup_record of codec.dedup_identity)
local function identity(c)
  return from_hex(identity_hex(c))
end

-- expired, over-delivered, and (own stream) already handled entries
local done_hit = {}
if screen then
  local keys, idx = {}, {}
  for i, c in ipairs(cands) do
    if c[1] == own and c[6] then keys[#keys + 1] = identity(c); idx[#idx + 1] = i end
  end
  for c = 1, #keys, 500 do
    local part = {}
    for j = c, math.min(c + 499, #keys) do part[#part + 1] = keys[j] end
    local scores = redis.call('ZMSCORE', done, unpack(part))
    for j = 1, #part do if scores[j] then done_hit[idx[c + j - 1]] = true end end
  end
end
local out, dead, held = {}, 0, 0
local drop_own, ack_log = {}, {}

-- whether candidate `c` (partition key pk, identity ident) may be delivered: it holds its
-- key, or takes it (free, or its holder done); else it is held back
local function takes_key(pk, ident)
  local holder = redis.call('HGET', ord.order, pk)
  if holder == ident then return true end
  if holder and redis.call('ZSCORE', done, from_hex(holder)) then
    release(ord, pk, holder)  -- acknowledged without handing the key on (see above)
    holder = redis.call('HGET', ord.order, pk)
  end
  if holder then return holder == ident end
  redis.call('HSET', ord.order, pk, ident)
  return true
end

for i, c in ipairs(cands) do
  local src, id, deliveries = c[1], c[2], c[4]
  local reason = nil
  if screen then
    local x = c[7] and tonumber(c[7])
    if deliveries > max_deliveries then
      reason = 'max deliveries exceeded: delivered ' .. deliveries ..
               ' times without acknowledgement'
    elseif x and x <= now then
      reason = 'expired'
    end
  end
  local pk = ordered and c[6] and c[8]
  local ident = pk and identity_hex(c)
  if reason then
    park(c[3], src.prefix .. id, deliveries, cjson.encode({reason = reason, queue = qname}),
         dlq, nil, now)
    if src == own then drop_own[#drop_own + 1] = id else
      redis.call('XACK', src.key, src.group, id) end
    dead = dead + 1
    if pk then release(ord, pk, ident) end
  elseif done_hit[i] then
    drop_own[#drop_own + 1] = id
    dups = dups + 1
    if pk then release(ord, pk, ident) end
  elseif pk and not takes_key(pk, ident) then
    hold(ord, pk, ident, c[3], id)
    if src == own then drop_own[#drop_own + 1] = id else ack_log[#ack_log + 1] = id end
    held = held + 1
  else
    out[#out + 1] = {src.prefix .. id, c[3], deliveries}
  end
end
if #ack_log > 0 then chunked('XACK', log.key, {log.group}, ack_log) end
if #drop_own > 0 then
  chunked('XACK', own.key, {own.group}, drop_own)
  chunked('XDEL', own.key, {}, drop_own)
end

local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local next_due = -1
if nxt[2] then next_due = math.max(0, tonumber(nxt[2]) - now) end
-- everything read was dropped: there may be more behind it
if #out == 0 and (dead > 0 or dups > 0 or gone > 0 or skipped > 0 or held > 0) then
  more = 1
end
local wake = {}
if #out == 0 and more == 0 then
  local last = redis.call('XREVRANGE', own.key, '+', '-', 'COUNT', 1)
  wake[1] = last[1] and last[1][1] or '0-0'
  if ordered and reads_log then
    last = redis.call('XREVRANGE', log.key, '+', '-', 'COUNT', 1)
    wake[2] = last[1] and last[1][1] or '0-0'
  end
end
local pruned = 0
if periodic and prune_ms > 0 then
  local srcs = {own}
  if log then srcs[2] = log end
  pruned = prune(srcs)
end
return {out, gone, dups, dead, next_due, cursor, log_cursor, more, wake, types_json, skipped,
        pruned, ordered and 1 or 0}
