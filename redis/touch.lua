-- A running request's reservation lives on: its expiry moves to now + ttl (only if it is
-- still there; an entry already released stays released).
--
-- KEYS: inflight
-- ARGV: id, expiry_ms
return redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[1])
