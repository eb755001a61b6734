-- Settle a batch of messages of one consumer atomically: acknowledge, record as done,
-- schedule retries, dead-letter, extend leases, hand back; one round trip per batch.
-- KEYS[1] stream, KEYS[2] delayed zset, KEYS[3] done zset, KEYS[4] dead-letter stream,
-- KEYS[5] leases hash (see fetch.lua); a subscription adds KEYS[6] the event log,
-- KEYS[7] its order hash and KEYS[8] its held sorted set (lib.lua): acknowledging or
-- dead-lettering the holder of a partition key hands the key on.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] '1' to delete acknowledged entries,
-- ARGV[4] done window ms, ARGV[5] idle ms to give handed-back entries (at least the
-- visibility timeout, so any consumer's next fetch reclaims them), ARGV[6] the
-- subscription's group on the log, ARGV[7] the id prefix of log entries ('all/');
-- then six sections, each a count N and its items:
--   acknowledge: N ids | done: N dedup keys | retry: N x (id, delay ms, record JSON) |
--   dead-letter: N x (id, record JSON) | extend: N ids | hand back: N ids;
-- then '1' to remove the consumer from its group(s) once it holds nothing.
-- Log entries are acknowledged in the subscription's group and stay in the log; the
-- queue's own entries leave the stream. A retry or dead letter of an entry that is no
-- longer there (settled elsewhere) is skipped and its id returned as missing. Leases are
-- extended and entries handed back only where this consumer still owns them; a handed
-- back entry's delivery count goes back one, so its next delivery (which counts one)
-- is not an attempt more: it never started. A consumer with pending entries is never removed.
-- Returns {acknowledged, retried, dead-lettered, extended, handed back, removed, missing,
-- the dead letters' ids in the dead-letter stream}.
local own = {key = KEYS[1], group = ARGV[1], delete = ARGV[3] == '1', prefix = ''}
local delayed, done, dlq = KEYS[2], KEYS[3], KEYS[4]
local consumer = ARGV[2]
local window = tonumber(ARGV[4])
local idle = ARGV[5]
local log = nil
if #KEYS >= 6 then log = {key = KEYS[6], group = ARGV[6], delete = false, prefix = ARGV[7]} end
local ord = nil  -- an ordered subscription with keys in use
if #KEYS >= 8 and redis.call('EXISTS', KEYS[7]) == 1 then
  ord = {order = KEYS[7], held = KEYS[8], own = KEYS[1]}
end
local handed = {}  -- {partition key, holder} of what was settled, handed on at the end
local function settling(f)
  if ord then
    local pk, ident = key_of(f)
    if pk then handed[#handed + 1] = {pk, ident} end
  end
end
local now = now_ms()
local pos = 8

local function section()
  local n = tonumber(ARGV[pos])
  local first = pos + 1
  pos = pos + 1 + n
  return first, n
end

-- acknowledge
local acked = 0
local first, n = section()
local by_src = {}
local newest = 0  -- the newest acknowledged entry's time: the done records' score
for k = first, first + n - 1 do
  local src, id = locate(ARGV[k], own, log)
  by_src[src] = by_src[src] or {}
  table.insert(by_src[src], id)
  if ord then
    local r = redis.call('XRANGE', src.key, id, id)
    if r[1] then settling(r[1][2]) end
  end
  local ms = tonumber(string.match(id, '^(%d+)')) or 0
  if ms > newest then newest = ms end
end
for src, ids in pairs(by_src) do
  -- the group on the log may be gone (unsubscribed: its backlog was copied over)
  local ok, n_acked = pcall(chunked, 'XACK', src.key, {src.group}, ids)
  if ok then acked = acked + n_acked end
  if src.delete then chunked('XDEL', src.key, {}, ids) end
end

-- record dedup keys as done, scored by the stream time of what was acknowledged (so a
-- record lasts the window after its entry was written, by the server's clock)
first, n = section()
if n > 0 then
  if newest == 0 then newest = now end
  for c = first, first + n - 1, 500 do
    local args = {}
    for k = c, math.min(c + 499, first + n - 1) do
      args[#args + 1] = newest
      args[#args + 1] = ARGV[k]
    end
    redis.call('ZADD', done, unpack(args))
  end
  redis.call('ZREMRANGEBYSCORE', done, '-inf', newest - window)
end

local missing = {}
local parked = {}  -- the dead letters' new ids
local function move(wire_id, record_json, dst, due)
  local src, id = locate(wire_id, own, log)
  local r = redis.call('XRANGE', src.key, id, id)
  local okp, p = pcall(redis.call, 'XPENDING', src.key, src.group, id, id, 1)
  if not okp then p = {} end
  -- a log entry stays in the log once settled: only a pending one is ours to move
  if r[1] and (src.delete or p[1]) then
    local added = park(r[1][2], wire_id, p[1] and tonumber(p[1][4]) or 1, record_json,
                       dst, due, now)
    if added then parked[#parked + 1] = added end
    if due == nil then settling(r[1][2]) end  -- dead-lettered (a retry keeps its key)
  else
    missing[#missing + 1] = wire_id
  end
  pcall(redis.call, 'XACK', src.key, src.group, id)
  if src.delete then redis.call('XDEL', src.key, id) end
  return r[1] and 1 or 0
end

-- retries
local retried = 0
first, n = section()
pos = first + 3 * n
for k = first, first + 3 * n - 1, 3 do
  retried = retried + move(ARGV[k], ARGV[k + 2], delayed, now + tonumber(ARGV[k + 1]))
end
-- dead letters
local dead = 0
first = pos + 1
n = tonumber(ARGV[pos])
pos = first + 2 * n
for k = first, first + 2 * n - 1, 2 do
  dead = dead + move(ARGV[k], ARGV[k + 1], dlq, nil)
end

-- leases: reset the idle time of entries this consumer still owns; or hand them back
local function reclaim_own(first, n, extra, hand_back)
  local done_n = 0
  for k = first, first + n - 1 do
    local src, id = locate(ARGV[k], own, log)
    local okp, p = pcall(redis.call, 'XPENDING', src.key, src.group, id, id, 1)
    if okp and p[1] and p[1][2] == consumer then
      local args = {'XCLAIM', src.key, src.group, consumer, 0, id}
      for _, e in ipairs(extra) do args[#args + 1] = e end
      if hand_back then  -- never started: its next delivery is not one more attempt
        args[#args + 1] = 'RETRYCOUNT'
        args[#args + 1] = math.max(0, tonumber(p[1][4]) - 1)
      end
      args[#args + 1] = 'JUSTID'
      redis.call(unpack(args))
      done_n = done_n + 1
    end
  end
  return done_n
end
first, n = section()
local extended = reclaim_own(first, n, {}, false)
first, n = section()
local released = reclaim_own(first, n, {'IDLE', idle}, true)

-- forget the consumer once it holds nothing (never one with pending entries)
local removed = 0
if ARGV[pos] == '1' then
  local srcs = {own}
  if log then srcs[2] = log end
  local holds = false
  for _, src in ipairs(srcs) do
    local ok, p = pcall(redis.call, 'XPENDING', src.key, src.group, '-', '+', 1, consumer)
    if ok and #p > 0 then holds = true end
  end
  if not holds then
    for _, src in ipairs(srcs) do
      pcall(redis.call, 'XGROUP', 'DELCONSUMER', src.key, src.group, consumer)
    end
    redis.call('HDEL', KEYS[5], consumer)
    removed = 1
  end
end
for _, h in ipairs(handed) do release(ord, h[1], h[2]) end
return {acked, retried, dead, extended, released, removed, missing, parked}
