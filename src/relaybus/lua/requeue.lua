-- Move entries from one stream (a DLQ) back to another, keeping their failure history.
-- KEYS[1] source stream, KEYS[2] destination stream
-- ARGV[1] source group, ARGV[2..] ids. The expiry ('x', 'l') and attempt counter 'n' are
-- dropped: a requeued message starts afresh. Returns the number moved.
local src, dst = KEYS[1], KEYS[2]
local group = ARGV[1]
local moved = 0
for k = 2, #ARGV do
  local id = ARGV[k]
  local r = redis.call('XRANGE', src, id, id)
  if r[1] then
    local f = r[1][2]
    local fields = {}
    for i = 1, #f, 2 do
      if f[i] ~= 'x' and f[i] ~= 'l' and f[i] ~= 'n' then
        fields[#fields + 1] = f[i]
        fields[#fields + 1] = f[i + 1]
      end
    end
    redis.call('XADD', dst, '*', unpack(fields))
    redis.call('XACK', src, group, id)
    redis.call('XDEL', src, id)
    moved = moved + 1
  end
end
return moved
