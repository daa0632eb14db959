"""The Lua scripts of :class:`~safepool.RedisBudget` (each runs atomically in Redis).

Keys of a budget (one hash tag, so a Redis Cluster keeps them in one slot):

* ``meta`` (hash): ``limit``, ``ttl`` (ms), ``fresh_until`` (ms: no grants before it).
* ``holders`` (sorted set): permit id -> expiry (ms, Redis server clock).
* ``info`` (hash): permit id -> ``"<token> <pid> <since> <host>"``.
* ``token`` (string): the fencing-token counter. Created at the server's clock in microseconds,
  then ``INCR``: tokens keep increasing even if Redis loses the counter (a restart without
  persistence), as long as fewer than a million are drawn per second.
* ``stats`` (hash): ``acquired``, ``timeouts``, ``reclaimed``.
* ``waiters`` (sorted set): waiter id -> how long it may stay (ms); ``wake`` (list): one
  element per wake-up owed to a waiter, popped with ``BLPOP``.

Every script first drops expired holders (counting them in ``reclaimed``) and waiters, and
owes a wake-up per permit so freed. If ``meta`` is gone (Redis lost its data, or the budget was
unlinked while in use), the acquire script recreates it and grants nothing for one ``ttl``: by
then every holder of a permit Redis forgot has seen it expire, so none is counted twice.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "GIVE_UP", "HOLDERS", "OPEN", "RELEASE", "RENEW", "STATS"]

# KEYS: meta holders info token stats waiters wake
PRELUDE = """
local meta, holders, info, tokenkey, stats, waiters, wake =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Lua prints large numbers as 1.79e+15: integers go to Redis through int()
local function int(x) return string.format('%d', x) end

local function owe(n)
    redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
    local want = math.min(n, redis.call('ZCARD', waiters) - redis.call('LLEN', wake))
    for _ = 1, want do redis.call('LPUSH', wake, 1) end
    if want > 0 then redis.call('PEXPIRE', wake, 60000) end
end

local function trim()
    local keep = redis.call('ZCARD', waiters)
    while redis.call('LLEN', wake) > keep do redis.call('RPOP', wake) end
end

local function purge()
    local dead = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
    for _, id in ipairs(dead) do
        redis.call('ZREM', holders, id)
        redis.call('HDEL', info, id)
    end
    if #dead > 0 then
        redis.call('HINCRBY', stats, 'reclaimed', #dead)
        owe(#dead)
    end
end
"""

# ARGV: limit ttl_ms -> "ok" | {limit, ttl} of the existing budget
OPEN = (
    PRELUDE
    + """
local limit, ttl = ARGV[1], ARGV[2]
if redis.call('HSETNX', meta, 'limit', limit) == 1 then
    redis.call('HSET', meta, 'ttl', ttl, 'fresh_until', 0)
end
local found = redis.call('HMGET', meta, 'limit', 'ttl')
if found[1] ~= limit or found[2] ~= ttl then return found end
return 'ok'
"""
)

# ARGV: limit ttl_ms id info waiter_id ('' when not waiting) stay_ms last ('1': count a timeout)
# -> {1, token, expiry_ms} granted | {0, ms until worth looking again} | {-1, limit, ttl}
ACQUIRE = (
    PRELUDE
    + """
local limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local id, waiter = ARGV[3], ARGV[5]
local found = redis.call('HMGET', meta, 'limit', 'ttl', 'fresh_until')
if not found[1] then
    redis.call('HSET', meta, 'limit', limit, 'ttl', ttl, 'fresh_until', int(now + ttl))
    found = {limit, ttl, now + ttl}
elseif tonumber(found[1]) ~= limit or tonumber(found[2]) ~= ttl then
    return {-1, found[1], found[2]}
end
purge()
local again = nil
local known = redis.call('ZSCORE', holders, id)
if known then  -- a retried call that was granted already
    local token = string.match(redis.call('HGET', info, id), '^(%d+)')
    return {1, tonumber(token), tonumber(known)}
end
local fresh = tonumber(found[3])
if fresh > now then
    again = fresh - now
elseif redis.call('ZCARD', holders) < limit then
    redis.call('SET', tokenkey, t[1] .. string.format('%06d', tonumber(t[2])), 'NX')
    local token = redis.call('INCR', tokenkey)
    redis.call('ZADD', holders, int(now + ttl), id)
    redis.call('HSET', info, id, int(token) .. ' ' .. ARGV[4])
    redis.call('HINCRBY', stats, 'acquired', 1)
    if waiter ~= '' then
        redis.call('ZREM', waiters, waiter)
        trim()
    end
    return {1, token, now + ttl}
else
    local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
    again = tonumber(first[2]) - now
end
if waiter ~= '' then
    redis.call('ZADD', waiters, int(now + tonumber(ARGV[6])), waiter)
end
if ARGV[7] == '1' then redis.call('HINCRBY', stats, 'timeouts', 1) end
return {0, math.max(again, 1)}
"""
)

# ARGV: id -> 1 released | 0 it was not held (expired and reclaimed, or unknown)
RELEASE = (
    PRELUDE
    + """
purge()
local removed = redis.call('ZREM', holders, ARGV[1])
if removed == 1 then
    redis.call('HDEL', info, ARGV[1])
    owe(1)
end
return removed
"""
)

# ARGV: ttl_ms id... -> {expiry_ms, lost id...}: renews every id still held
RENEW = (
    PRELUDE
    + """
purge()
local ttl = tonumber(ARGV[1])
local out = {now + ttl}
for i = 2, #ARGV do
    if redis.call('ZADD', holders, 'XX', 'CH', int(now + ttl), ARGV[i]) == 0
            and not redis.call('ZSCORE', holders, ARGV[i]) then
        table.insert(out, ARGV[i])
    end
end
return out
"""
)

# ARGV: waiter_id timed_out ('1' or '0') -> 0: a waiter gave up (timed out or was interrupted)
GIVE_UP = (
    PRELUDE
    + """
redis.call('ZREM', waiters, ARGV[1])
if ARGV[2] == '1' then redis.call('HINCRBY', stats, 'timeouts', 1) end
trim()
return 0
"""
)

# -> {in_use, waiting, acquired, timeouts, reclaimed}
STATS = (
    PRELUDE
    + """
purge()
redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
local s = redis.call('HMGET', stats, 'acquired', 'timeouts', 'reclaimed')
return {redis.call('ZCARD', holders), redis.call('ZCARD', waiters),
        tonumber(s[1] or 0), tonumber(s[2] or 0), tonumber(s[3] or 0)}
"""
)

# -> {info...}: one "<token> <pid> <since> <host>" per permit held
HOLDERS = (
    PRELUDE
    + """
purge()
local ids = redis.call('ZRANGE', holders, 0, -1)
if #ids == 0 then return {} end
return redis.call('HMGET', info, unpack(ids))
"""
)
