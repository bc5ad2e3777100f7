-- One gateway says which adapters it holds, in which tier: its entries replace its previous
-- ones, and a gateway whose heartbeat stopped loses its entries (here, or at the next
-- publisher's call).
--
-- KEYS: residency (hash "node|adapter" -> "tier|pinned|loads|hits|misses|load_ms|idle_s"),
--       nodes (zset node -> heartbeat expiry ms)
-- ARGV: now_ms, ttl_ms, node, then adapter, value pairs
local res_k, nodes_k = KEYS[1], KEYS[2]
local now, ttl, node = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZADD', nodes_k, now + ttl, node)
local gone = {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', nodes_k, '-inf', now)) do gone[n] = true end
redis.call('ZREMRANGEBYSCORE', nodes_k, '-inf', now)
for _, f in ipairs(redis.call('HKEYS', res_k)) do
    local n = string.match(f, '^(.*)|[^|]*$')
    if n == node or gone[n] then redis.call('HDEL', res_k, f) end
end
for i = 4, #ARGV, 2 do
    redis.call('HSET', res_k, node .. '|' .. ARGV[i], ARGV[i + 1])
end
return 1
