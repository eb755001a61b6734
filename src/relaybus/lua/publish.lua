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
local state = new_appends()
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local id, repeated = append_event(log, zset, hash, window, now, state, ARGV[i],
                                    unpack(ARGV, i + 2, i + 1 + n))
  if repeated then repeats[#repeats + 1] = #out + 1 end
  out[#out + 1] = id
  i = i + 2 + n
end
finish_appends(zset, hash, window, now, state)
return {out, repeats}
