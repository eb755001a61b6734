-- Acknowledge entries; delete them from the stream; record their dedup keys as done.
-- KEYS[1] stream, KEYS[2] done zset
-- ARGV[1] group, ARGV[2] '1' to XDEL, ARGV[3] now ms, ARGV[4] done window ms,
-- ARGV[5] number of ids N, then N ids, then dedup keys (any number)
local stream, done = KEYS[1], KEYS[2]
local group = ARGV[1]
local delete = ARGV[2] == '1'
local now = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local acked = 0
local i = 6
while i < 6 + n do
  local last = math.min(i + 499, 5 + n)
  acked = acked + redis.call('XACK', stream, group, unpack(ARGV, i, last))
  if delete then redis.call('XDEL', stream, unpack(ARGV, i, last)) end
  i = last + 1
end
if #ARGV >= 6 + n then
  for j = 6 + n, #ARGV do redis.call('ZADD', done, now, ARGV[j]) end
  redis.call('ZREMRANGEBYSCORE', done, '-inf', now - window)
end
return acked
