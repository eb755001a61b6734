-- Move a subscription's backlog out of the event log into its own stream, so that its
-- group on the log can be removed (unsubscribe) without losing what was meant for it.
-- KEYS[1] the subscription's stream, KEYS[2] the event log
-- ARGV[1] its group on the log, ARGV[2] most entries to move in this call,
-- ARGV[3] the event types it kept (JSON list, '*' = all).
-- Entries the group delivered but nobody acknowledged yet are copied (their consumer's
-- later acknowledgement records the event as done, which drops the copy); entries not
-- yet delivered are copied when their type is one the subscription keeps. Each copy is
-- acknowledged in the group. Once the group holds nothing, it is destroyed.
-- Returns {entries copied, 1 when the group is gone}.
local stream, log = KEYS[1], KEYS[2]
local group = ARGV[1]
local limit = tonumber(ARGV[2])
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', log)
local exists = false
if ok then
  for _, g in ipairs(groups) do
    for i = 1, #g, 2 do
      if g[i] == 'name' and g[i + 1] == group then exists = true end
    end
  end
end
if not exists then return {0, 1} end

local copied = 0
local pending = redis.call('XPENDING', log, group, '-', '+', limit)
for _, p in ipairs(pending) do
  local r = redis.call('XRANGE', log, p[1], p[1])
  if r[1] then
    redis.call('XADD', stream, '*', unpack((writable(r[1][2]))))
    copied = copied + 1
  end
  redis.call('XACK', log, group, p[1])
end

local types, all = {}, false
local okt, decoded = pcall(cjson.decode, ARGV[3])
if okt and type(decoded) == 'table' then
  for _, t in ipairs(decoded) do
    if t == '*' then all = true else types[t] = true end
  end
end
local room = limit - #pending
local unread = 0
if room > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', group, 'relaybus-drain', 'COUNT', room,
                      'STREAMS', log, '>')
  if r then
    local ids = {}
    for _, e in ipairs(r[1][2]) do
      local etype = field_of(e[2], 'e')
      if not etype then  -- not written by publish: look in the payload
        local okd, data = pcall(cjson.decode, field_of(e[2], 'd') or '')
        if okd and type(data) == 'table' and type(data['event_type']) == 'string' then
          etype = data['event_type']
        end
      end
      if etype == nil or all or types[etype] then
        redis.call('XADD', stream, '*', unpack((writable(e[2]))))
        copied = copied + 1
      end
      ids[#ids + 1] = e[1]
    end
    unread = #ids
    if #ids > 0 then chunked('XACK', log, {group}, ids) end
  end
end
if #pending == 0 and unread == 0 then
  redis.call('XGROUP', 'DESTROY', log, group)
  return {copied, 1}
end
return {copied, 0}
