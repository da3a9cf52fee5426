"""The Lua scripts of RedisStore. Each runs atomically inside Redis."""

# KEYS: key hash, pending, hour zset, day counter. ARGV: ttl_lo, hour_lo, day_start.
STATE = """
-- members come WITHSCORES: "<res_id>|<amount>", score, ...; returns sum, {score, amount, ...}
local function parse(members)
  local out, sum = {}, 0
  for i = 1, #members, 2 do
    local amount = tonumber(string.match(members[i], '|(%d+)$'))
    sum = sum + amount
    out[#out + 1] = members[i + 1]; out[#out + 1] = amount
  end
  return sum, out
end
local function state(window)
  local settled, settled_items = 0, {}
  if window == 'hour' then
    local m = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf', 'WITHSCORES')
    settled, settled_items = parse(m)
  elseif window == 'day' then
    settled = tonumber(redis.call('GET', KEYS[4]) or '0')
  else
    settled = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  end
  local lo = '(' .. ARGV[1]
  local m = redis.call('ZRANGEBYSCORE', KEYS[2], lo, '+inf', 'WITHSCORES')
  local live = {}
  for i = 1, #m, 2 do
    local ts = tonumber(m[i + 1])
    if window == 'balance' or (window == 'hour' and ts > tonumber(ARGV[2]))
        or (window == 'day' and ts >= tonumber(ARGV[3])) then
      live[#live + 1] = m[i]; live[#live + 1] = m[i + 1]
    end
  end
  local pending, pending_items = parse(live)
  return settled + pending, settled_items, pending_items
end
"""

USAGE = (
    STATE
    + """
local window = redis.call('HGET', KEYS[1], 'window')
if not window then return {-1} end
local used = state(window)
return {1, used, tonumber(redis.call('HGET', KEYS[1], 'limit_tokens'))}
"""
)

# + KEYS[5] reservation hash. ARGV[4..]: res_id, tokens, now, day label, gc_hour, gc_pending
RESERVE = (
    STATE
    + """
local h = redis.call('HMGET', KEYS[1], 'window', 'limit_tokens', 'revoked')
if not h[1] or h[3] == '1' then return {-1} end
local window, limit, tokens = h[1], tonumber(h[2]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[9])
local used, settled_items, pending_items = state(window)
if used + tokens > limit then
  return {0, used, limit, settled_items, pending_items, window}
end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[4] .. '|' .. ARGV[5])
redis.call('HSET', KEYS[5], 'key', redis.call('HGET', KEYS[1], 'id'), 'ts', ARGV[6],
  'reserved', ARGV[5], 'day', ARGV[7], 'state', 'pending')
redis.call('EXPIRE', KEYS[5], ARGV[10])
return {1, used + tokens, limit}
"""
)

# KEYS: res hash, key hash, pending, hour zset, day counter of the charge's day.
# ARGV: res_id, actual, now, day counter ttl
SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'state', 'ts', 'reserved')
if not r[1] then return -1 end
if r[1] == 'settled' then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1] .. '|' .. r[3])
local window = redis.call('HGET', KEYS[2], 'window')
if window == 'hour' then
  redis.call('ZADD', KEYS[4], r[2], ARGV[1] .. '|' .. ARGV[2])
elseif window == 'day' then
  redis.call('INCRBY', KEYS[5], ARGV[2]); redis.call('EXPIRE', KEYS[5], ARGV[4])
else
  redis.call('HINCRBY', KEYS[2], 'spent', ARGV[2])
end
redis.call('HSET', KEYS[1], 'state', 'settled', 'actual', ARGV[2], 'settled_at', ARGV[3])
return 1
"""

# KEYS: key hash, hash index, keys zset. ARGV: id, key_hash, plan, limit, window, created, name?
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'key_hash', ARGV[2], 'plan_slug', ARGV[3],
  'limit_tokens', ARGV[4], 'window', ARGV[5], 'created_at', ARGV[6], 'revoked', '0', 'spent', '0')
if ARGV[7] then redis.call('HSET', KEYS[1], 'name', ARGV[7]) end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""
