-- Move entries to a dead-letter stream (or schedule them as retries), atomically.
-- KEYS[1] source stream, KEYS[2] target: DLQ stream, or delayed zset when ARGV[3] ~= ''
-- ARGV[1] group, ARGV[2] failure record (JSON object), ARGV[3] due ms for a retry
-- ('' = dead-letter), ARGV[4..] entry ids.
-- The entry keeps its fields; its failure list 'f' gains the record (with the entry id).
-- An 'f' that is not a JSON list (an entry written by another tool) starts a new list,
-- the old value kept in the record as 'invalid_history'; a non-numeric 'n' counts as 0.
-- A retry also increments the attempt counter 'n' by the entry's deliveries.
-- Returns the number of entries moved.
local src, dst = KEYS[1], KEYS[2]
local group = ARGV[1]
local due = ARGV[3]
local moved = 0
local function decode_history(raw)
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' and (next(decoded) == nil or decoded[1] ~= nil) then
    return decoded, nil
  end
  return {}, raw
end
for k = 4, #ARGV do
  local id = ARGV[k]
  local r = redis.call('XRANGE', src, id, id)
  if r[1] then
    local f = r[1][2]
    local fields = {}
    local history = {}
    local invalid = nil
    local attempts = 0
    for i = 1, #f, 2 do
      if f[i] == 'f' then
        history, invalid = decode_history(f[i + 1])
      elseif f[i] == 'n' then
        attempts = tonumber(f[i + 1]) or 0
      else
        fields[#fields + 1] = f[i]
        fields[#fields + 1] = f[i + 1]
      end
    end
    local deliveries = 1
    local p = redis.call('XPENDING', src, group, id, id, 1)
    if p[1] then deliveries = p[1][4] end
    local record = cjson.decode(ARGV[2])
    record['message_id'] = id
    record['attempt'] = attempts + deliveries
    if invalid then record['invalid_history'] = invalid end
    history[#history + 1] = record
    fields[#fields + 1] = 'f'
    fields[#fields + 1] = cjson.encode(history)
    if due == '' then
      if attempts > 0 then
        fields[#fields + 1] = 'n'
        fields[#fields + 1] = tostring(attempts)
      end
      redis.call('XADD', dst, '*', unpack(fields))
    else
      fields[#fields + 1] = 'n'
      fields[#fields + 1] = tostring(attempts + deliveries)
      table.insert(fields, 1, id)
      redis.call('ZADD', dst, tonumber(due), cjson.encode(fields))
    end
    moved = moved + 1
  end
  redis.call('XACK', src, group, id)
  redis.call('XDEL', src, id)
end
return moved
