"""The Lua scripts of :class:`~safepool.RedisBudget` (each runs atomically in Redis).

Keys of a budget, all ``<prefix>:{<name>}:<part>`` (one hash tag, so a Redis Cluster keeps
them in one slot; scripts get the common part as ``KEYS[1]``):

* ``meta`` (hash): ``limit``, ``ttl`` (ms), ``fresh_until`` (ms: no grants before it),
  ``first`` (the first token drawn), ``timeouts``, ``reclaimed``.
* ``holders`` (sorted set): one member per permit, ``"<token> <nonce> <pid> <since> <host>"``,
  scored by its expiry (ms, Redis server clock). The nonce, chosen by the client before the
  call, finds a permit whose grant the client never heard of (an interrupted call).
* ``token`` (string): the fencing-token counter. Created at the server's clock in microseconds,
  then ``INCR``: tokens keep increasing even if Redis loses the counter (a restart without
  persistence), as long as fewer than a million are drawn per second.
* ``waiters`` (sorted set): waiter id -> how long it may stay (ms); ``queue`` (list): waiter
  ids, oldest first; ``wake:<waiter>`` (list): the waiter's wake-up, popped with ``BLPOP``.

The uncontended path is short: acquire reads ``meta``, counts holders, draws a token and adds
the member; release removes it and looks for waiters. With waiters queued, a release hands its
permit straight to the oldest (a reservation ``+<waiter>`` that only that waiter can claim, for
one ``ttl``) and wakes it: first come, first served, and nobody barges in between. The waiter
sends its ``BLPOP`` and its next acquire call together (one round trip): the call runs the
moment the wake-up (or the ``BLPOP`` timeout) comes, and claims the reservation. Expired
holders (and unclaimed reservations) are dropped, counted in ``reclaimed`` and handed on, when
an acquire finds the budget full, and by renew, stats and holders. If ``meta`` is gone (Redis
lost its data, or the budget was unlinked while in use), the acquire script recreates it and
grants nothing for one ``ttl``: by then every holder of a permit Redis forgot has seen it
expire, so none is counted twice.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "FORGET", "GIVE_UP", "HOLDERS", "OPEN", "RELEASE", "RENEW", "STATS"]

PRELUDE = """
local base = KEYS[1]
local meta, holders, tokenkey = base .. ':meta', base .. ':holders', base .. ':token'
local waiters, queue = base .. ':waiters', base .. ':queue'
local t, now, now_us  -- the server clock (TIME; now in ms), read by clock(): every script but
-- RELEASE starts there
local function clock()
    t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- Lua prints large numbers as 1.79e+15: integers go to Redis through int()
local function int(x) return string.format('%d', x) end

-- Give up to n freed permits straight to the oldest live waiters: each gets a reservation
-- ("+<waiter>", counted like a permit, expiring after one ttl) and a wake-up on its own list.
local function handoff(n, ttl)
    local given = 0
    while given < n do
        local w = redis.call('LPOP', queue)
        if not w then break end
        local stay = redis.call('ZSCORE', waiters, w)
        redis.call('ZREM', waiters, w)
        if stay and tonumber(stay) > now then
            redis.call('ZADD', holders, int(now + ttl), '+' .. w)
            local wake = base .. ':wake:' .. w
            redis.call('LPUSH', wake, 1)
            redis.call('PEXPIRE', wake, int(ttl))
            given = given + 1
        end
    end
end

local function purge(ttl)
    local dead = redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
    if dead > 0 then
        redis.call('HINCRBY', meta, 'reclaimed', dead)
        handoff(dead, ttl)
    end
end
"""

# ARGV: limit ttl_ms -> "ok" | {limit, ttl} of the existing budget
OPEN = (
    PRELUDE
    + """
clock()
local limit, ttl = ARGV[1], ARGV[2]
if redis.call('HSETNX', meta, 'limit', limit) == 1 then
    redis.call('HSET', meta, 'ttl', ttl, 'fresh_until', 0)
end
local found = redis.call('HMGET', meta, 'limit', 'ttl')
if found[1] ~= limit or found[2] ~= ttl then return found end
return 'ok'
"""
)

# ARGV: limit ttl_ms pid host (the process's constants first) nonce waiter_id ('' when not
# waiting) stay_ms last ('1': count a timeout) queued ('1': the waiter may be queued, or handed
# a permit, by an earlier call) since base (this Redis clock, µs, when the client's clock read
# `since`; '' when since is now)
# -> {1, token, member, µs since base} granted | {0, ms worth waiting, now_us} | {-1, limit, ttl}
ACQUIRE = (
    PRELUDE
    + """
clock()
local limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local waiter, queued = ARGV[6], ARGV[9] == '1'
local found = redis.call('HMGET', meta, 'limit', 'ttl', 'fresh_until')
if not found[1] then
    redis.call('HSET', meta, 'limit', limit, 'ttl', ttl, 'fresh_until', int(now + ttl))
    found = {limit, ttl, now + ttl}
elseif tonumber(found[1]) ~= limit or tonumber(found[2]) ~= ttl then
    return {-1, found[1], found[2]}
end

local function grant()
    local token = redis.call('INCR', tokenkey)
    if token == 1 then  -- a new counter: start at the server clock, in microseconds
        token = t[1] .. string.format('%06d', tonumber(t[2]))
        redis.call('SET', tokenkey, token)
        redis.call('HSET', meta, 'first', token)
    end
    local since, waited = ARGV[10], 0
    if ARGV[11] ~= '' then  -- a waiter's call: the grant is later than its clock reading
        waited = math.max(0, now_us - tonumber(ARGV[11]))
        since = string.format('%.6f', tonumber(since) + waited / 1000000)
    end
    local member = int(token) .. ' ' .. ARGV[5] .. ' ' .. ARGV[3] .. ' ' .. since .. ' ' .. ARGV[4]
    redis.call('ZADD', holders, now + ttl, member)  -- (a number argument goes exactly)
    if queued and redis.call('ZREM', waiters, waiter) == 1 then
        redis.call('LREM', queue, 0, waiter)
        redis.call('DEL', base .. ':wake:' .. waiter)
    end
    return {1, tonumber(token), member, waited}
end

if queued and redis.call('ZREM', holders, '+' .. waiter) == 1 then
    return grant()  -- a permit handed to this waiter by a release
end
local again
if tonumber(found[3]) > now then
    again = tonumber(found[3]) - now
else
    local held = redis.call('ZCARD', holders)
    if held >= limit then
        purge(ttl)
        held = redis.call('ZCARD', holders)
    end
    if held < limit and (redis.call('LLEN', queue) == 0
            or (queued and redis.call('ZSCORE', waiters, waiter))) then
        return grant()  -- free, and nobody queued first
    end
    if held < limit then  -- free permits, but waiters came first: serve them
        handoff(limit - held, ttl)
        again = 1
    else
        local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
        again = tonumber(first[2]) - now
    end
end
if waiter ~= '' then
    if not redis.call('ZSCORE', waiters, waiter) then redis.call('RPUSH', queue, waiter) end
    redis.call('ZADD', waiters, int(now + tonumber(ARGV[7])), waiter)
end
if ARGV[8] == '1' then redis.call('HINCRBY', meta, 'timeouts', 1) end
return {0, math.max(again, 1), now_us}
"""
)

# ARGV: member ttl_ms -> 1 released | 0 it was not held (expired and reclaimed, or unknown)
RELEASE = (
    PRELUDE
    + """
local removed = redis.call('ZREM', holders, ARGV[1])
if removed == 1 and redis.call('LLEN', queue) > 0 then
    clock()
    handoff(1, tonumber(ARGV[2]))
end
return removed
"""
)

# ARGV: nonce ttl_ms -> how many permits granted to that nonce were given back (an interrupted
# call)
FORGET = (
    PRELUDE
    + """
clock()
local gone = 0
local cursor = '0'
repeat
    local page = redis.call('ZSCAN', holders, cursor, 'MATCH', '* ' .. ARGV[1] .. ' *')
    cursor = page[1]
    for i = 1, #page[2], 2 do
        gone = gone + redis.call('ZREM', holders, page[2][i])
    end
until cursor == '0'
if gone > 0 then handoff(gone, tonumber(ARGV[2])) end
return gone
"""
)

# ARGV: ttl_ms member... -> {lost member...}: renews every member still held
RENEW = (
    PRELUDE
    + """
clock()
local ttl = tonumber(ARGV[1])
purge(ttl)
local out = {}
for i = 2, #ARGV do
    if redis.call('ZADD', holders, 'XX', 'CH', int(now + ttl), ARGV[i]) == 0
            and not redis.call('ZSCORE', holders, ARGV[i]) then
        table.insert(out, ARGV[i])
    end
end
return out
"""
)

# ARGV: waiter_id timed_out ('1' or '0') ttl_ms -> 0: a waiter gave up (timed out or was
# interrupted); a permit handed to it meanwhile goes to the next waiter
GIVE_UP = (
    PRELUDE
    + """
clock()
local w = ARGV[1]
redis.call('ZREM', waiters, w)
redis.call('LREM', queue, 0, w)
redis.call('DEL', base .. ':wake:' .. w)
if ARGV[2] == '1' then redis.call('HINCRBY', meta, 'timeouts', 1) end
if redis.call('ZREM', holders, '+' .. w) == 1 then handoff(1, tonumber(ARGV[3])) end
return 0
"""
)

# -> {in_use, waiting, acquired, timeouts, reclaimed}
STATS = (
    PRELUDE
    + """
clock()
purge(tonumber(redis.call('HGET', meta, 'ttl') or 1000))
redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
local s = redis.call('HMGET', meta, 'first', 'timeouts', 'reclaimed')
local last = tonumber(redis.call('GET', tokenkey) or 0)
local acquired = 0
if s[1] then acquired = last - tonumber(s[1]) + 1 end
return {redis.call('ZCARD', holders), redis.call('ZCARD', waiters),
        acquired, tonumber(s[2] or 0), tonumber(s[3] or 0)}
"""
)

# -> {member...}: every permit held now
HOLDERS = (
    PRELUDE
    + """
clock()
purge(tonumber(redis.call('HGET', meta, 'ttl') or 1000))
return redis.call('ZRANGE', holders, 0, -1)
"""
)
