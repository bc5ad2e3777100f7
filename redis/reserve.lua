-- Admits one request of a tenant, exactly, or says which limit it would break.
-- Counts are per second over a sliding 60-second window (rpm, tpm), per UTC day (tokens), and
-- in flight (max_concurrent). The request's token bound (prompt + max tokens) is reserved now;
-- finish.lua replaces it by what the request used. Reservations carry an expiry the gateway
-- renews while the request runs (touch.lua), so one left by a dead gateway is released by time.
--
-- KEYS: rpm (hash second -> requests), tpm (hash second -> tokens), days (hash YYYYMMDD ->
--       tokens), inflight (zset id -> expiry ms), resv (hash id -> "second day tokens")
-- ARGV: now_ms, id, bound, rpm_limit, tpm_limit, day_limit, concurrent_limit (0: none),
--       ttl_ms, today, ms_to_midnight, yesterday (older days are dropped)
-- Returns {verdict, rpm_remaining, rpm_reset_ms, tpm_remaining, tpm_reset_ms, day_remaining,
--          retry_ms, used, limit}: verdict 0 admitted, 1 rpm, 2 tpm, 3 tokens per day,
--          4 max_concurrent, 5 the bound alone exceeds tpm or the day's budget.
local rpm_k, tpm_k, days_k, infl_k, resv_k = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = tonumber(ARGV[1])
local id = ARGV[2]
local bound = tonumber(ARGV[3])
local rpm, tpm, tpd, conc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, today, to_midnight, keep = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10]), ARGV[11]
local sec = math.floor(now / 1000)

-- reservations whose gateway stopped renewing them: give back what they held
local dead = redis.call('ZRANGEBYSCORE', infl_k, '-inf', now)
for _, d in ipairs(dead) do
    local r = redis.call('HGET', resv_k, d)
    if r then
        local s, day, tok = string.match(r, '^(%d+) (%d+) (%d+)$')
        if s and tonumber(s) > sec - 60 and redis.call('HEXISTS', tpm_k, s) == 1 then
            redis.call('HINCRBY', tpm_k, s, -tonumber(tok))
        end
        if day and redis.call('HEXISTS', days_k, day) == 1 then
            redis.call('HINCRBY', days_k, day, -tonumber(tok))
        end
        redis.call('HDEL', resv_k, d)
    end
    redis.call('ZREM', infl_k, d)
end

-- the window: drop seconds that left it, sum the rest (oldest first, for the reset times)
local function window(k)
    local all = redis.call('HGETALL', k)
    local secs, total = {}, 0
    for i = 1, #all, 2 do
        local s, v = tonumber(all[i]), tonumber(all[i + 1])
        if s <= sec - 60 then
            redis.call('HDEL', k, all[i])
        else
            secs[#secs + 1] = {s, v}
            total = total + v
        end
    end
    table.sort(secs, function(a, b) return a[1] < b[1] end)
    return secs, total
end

-- ms until `need` more fits under `limit`, as the oldest seconds leave the window
local function wait_for(secs, total, need, limit)
    local t = total
    for _, e in ipairs(secs) do
        if t + need <= limit then break end
        t = t - e[2]
        if t + need <= limit then return (e[1] + 60) * 1000 - now end
    end
    if t + need <= limit then return 0 end
    return 60000
end

local rsecs, rused = window(rpm_k)
local tsecs, tused = window(tpm_k)
for _, d in ipairs(redis.call('HKEYS', days_k)) do
    if d < keep then redis.call('HDEL', days_k, d) end
end
local dused = tonumber(redis.call('HGET', days_k, today) or '0')
local inflight = redis.call('ZCARD', infl_k)

local function reset(secs) return #secs > 0 and (secs[1][1] + 60) * 1000 - now or 0 end
local function reply(verdict, retry, used, limit)
    return {verdict,
            rpm > 0 and rpm - rused or -1, reset(rsecs),
            tpm > 0 and tpm - tused or -1, reset(tsecs),
            tpd > 0 and tpd - dused or -1,
            retry, used, limit}
end

if (tpm > 0 and bound > tpm) then return reply(5, 0, bound, tpm) end
if (tpd > 0 and bound > tpd) then return reply(5, 0, bound, tpd) end
if conc > 0 and inflight + 1 > conc then return reply(4, 1000, inflight, conc) end
if rpm > 0 and rused + 1 > rpm then return reply(1, wait_for(rsecs, rused, 1, rpm), rused, rpm) end
if tpm > 0 and tused + bound > tpm then
    return reply(2, wait_for(tsecs, tused, bound, tpm), tused, tpm)
end
if tpd > 0 and dused + bound > tpd then return reply(3, to_midnight, dused, tpd) end

redis.call('HINCRBY', rpm_k, sec, 1)
redis.call('HINCRBY', tpm_k, sec, bound)
redis.call('HINCRBY', days_k, today, bound)
redis.call('ZADD', infl_k, now + ttl, id)
redis.call('HSET', resv_k, id, sec .. ' ' .. today .. ' ' .. bound)
redis.call('PEXPIRE', rpm_k, 120000)
redis.call('PEXPIRE', tpm_k, 120000)
redis.call('PEXPIRE', days_k, 3 * 86400000)
rused, tused, dused = rused + 1, tused + bound, dused + bound
if #rsecs == 0 then rsecs = {{sec, 1}} end
if #tsecs == 0 then tsecs = {{sec, bound}} end
return reply(0, 0, 0, 0)
