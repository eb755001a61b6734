-- Append the scheduled events that are due (by the server's clock) to the log, with
-- publish.lua's dedup: an event published meanwhile is not appended twice.
-- KEYS[1] the log, KEYS[2] published zset, KEYS[3] published hash (as publish.lua),
-- KEYS[4] the scheduled zset, KEYS[5] the scheduled hash (as schedule.lua).
-- ARGV[1] dedup window ms, ARGV[2] most events to promote.
-- Each event is appended before it leaves the scheduled set, so a refused write
-- (out of memory) leaves it scheduled. Returns {events promoted, ms until the next
-- scheduled one is due (-1: none left)}.
local promoted, next_due = promote_due(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
                                       tonumber(ARGV[1]), tonumber(ARGV[2]))
return {promoted, next_due}
