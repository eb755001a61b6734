-- Count a stream's entries after an id, up to a cap: a group's lag on a server whose
-- XINFO GROUPS does not report it (Redis 6.2).
-- KEYS[1] stream; ARGV[1] the exclusive start ('(' id), ARGV[2] the cap.
-- Returns {count, id of the first of them (false when none)}.
local r = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
return {#r, r[1] and r[1][1] or false}
