-- Hand back entries a consumer fetched but will not handle (a graceful stop), and
-- forget the consumer once it holds nothing.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms to set (at least the
-- visibility timeout, so any other consumer's next fetch reclaims them), ARGV[4..] ids.
-- Only entries this consumer still owns are touched; the delivery count is unchanged.
-- The consumer is deleted only when it has no pending entry left (deleting one with
-- pending entries would lose them). Returns {released, deleted (0/1)}.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local idle = ARGV[3]
local released = 0
for k = 4, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[k], ARGV[k], 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[k], 'IDLE', idle, 'JUSTID')
    released = released + 1
  end
end
local deleted = 0
if #redis.call('XPENDING', stream, group, '-', '+', 1, consumer) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
  deleted = 1
end
return {released, deleted}
