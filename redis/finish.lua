-- A request ended: its reservation becomes what it used (tokens = prompt + generated), its
-- in-flight entry goes, and its usage joins the tenant's counters for the metrics. A request
-- admitted without a reservation (Redis was unreachable, on_error=allow) is counted into the
-- window and the day here instead. Idempotent: a gateway that lost the answer may send it
-- again (it keeps it until Redis confirms), and it counts once.
--
-- KEYS: rpm, tpm, days, inflight, resv (as in reserve.lua), usage (hash of counters),
--       done (zset id -> ms: the ends already counted, kept an hour)
-- ARGV: id, used_tokens, model, code, prompt_tokens, completion_tokens,
--       ttft_bucket ('' when no token came), ttft_ms, duration_bucket, duration_ms,
--       how ('r': reserved, 'w': limited but not reserved, count it in the window,
--       '-': not limited), now_ms, started_second, day
local rpm_k, tpm_k, days_k, infl_k, resv_k, use_k, done_k =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, used = ARGV[1], tonumber(ARGV[2])
local model, code, how, now = ARGV[3], ARGV[4], ARGV[11], tonumber(ARGV[12])

if redis.call('ZSCORE', done_k, id) then return 0 end
redis.call('ZADD', done_k, now, id)
redis.call('ZREMRANGEBYSCORE', done_k, '-inf', now - 3600000)
redis.call('PEXPIRE', done_k, 3600000)

if how == 'r' then
    local r = redis.call('HGET', resv_k, id)
    if r then
        local s, day, tok = string.match(r, '^(%d+) (%d+) (%d+)$')
        local delta = used - tonumber(tok)
        if redis.call('HEXISTS', tpm_k, s) == 1 then redis.call('HINCRBY', tpm_k, s, delta) end
        if redis.call('HEXISTS', days_k, day) == 1 then redis.call('HINCRBY', days_k, day, delta) end
        redis.call('HDEL', resv_k, id)
    end
    redis.call('ZREM', infl_k, id)
elseif how == 'w' then
    local s = ARGV[13]
    if tonumber(s) > math.floor(now / 1000) - 60 then
        redis.call('HINCRBY', rpm_k, s, 1)
        redis.call('HINCRBY', tpm_k, s, used)
        redis.call('PEXPIRE', rpm_k, 120000)
        redis.call('PEXPIRE', tpm_k, 120000)
    end
    redis.call('HINCRBY', days_k, ARGV[14], used)
    redis.call('PEXPIRE', days_k, 3 * 86400000)
end

redis.call('HINCRBY', use_k, 'requests|' .. model .. '|' .. code, 1)
redis.call('HINCRBY', use_k, 'prompt_tokens|' .. model, tonumber(ARGV[5]))
redis.call('HINCRBY', use_k, 'completion_tokens|' .. model, tonumber(ARGV[6]))
if ARGV[7] ~= '' then
    redis.call('HINCRBY', use_k, 'ttft|' .. model .. '|' .. ARGV[7], 1)
    redis.call('HINCRBY', use_k, 'ttft_ms|' .. model, tonumber(ARGV[8]))
end
redis.call('HINCRBY', use_k, 'duration|' .. model .. '|' .. ARGV[9], 1)
redis.call('HINCRBY', use_k, 'duration_ms|' .. model, tonumber(ARGV[10]))
return 1
