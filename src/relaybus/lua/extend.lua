-- Extend the lease of entries this consumer still owns (reset their idle time).
-- KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids.
-- An entry another consumer has taken over is left alone. Returns the number extended.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local extended = 0
for k = 3, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[k], ARGV[k], 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', stream, group, consumer, 0, ARGV[k], 'JUSTID')
    extended = extended + 1
  end
end
return extended
