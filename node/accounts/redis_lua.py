"""The Lua scripts of RedisStore. Each runs atomically inside Redis.

Lua formats no number but whole ones, with %d (bucket indexes and starts, so exact);
scores travel as the strings Python wrote, so they stay exact.
"""

# KEYS: key hash, pending, hour zset, day counter, hour bucket hash.
# ARGV: ttl_lo, hour_lo, day_start, then the bucket hour_lo cuts: index, start, end, and 'in'
# | 'out' (sum its charges inside the window, or subtract those outside from its total).
# Hour buckets are 60 s (windows.BUCKET_S), field = bucket index, value = settled total.
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
local function zsum(min, max)
  local sum = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], min, max)) do
    sum = sum + tonumber(string.match(m, '|(%d+)$'))
  end
  return sum
end
-- The rolling hour's settled tokens by bucket: the cut bucket's part in the window, the
-- later buckets' indexes (unsorted) and totals. Deletes fields before `gc` if given.
local function hour_buckets(gc)
  if redis.call('EXISTS', KEYS[5]) == 0 then  -- a zset from before hourmin: total it, once
    local m = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')  -- else empty: see GC
    for i = 1, #m, 2 do
      local ts = tonumber(m[i + 1])
      local b = math.floor(ts / 60)  -- windows.bucket_of
      if b * 60 > ts then b = b - 1 elseif (b + 1) * 60 <= ts then b = b + 1 end
      redis.call('HINCRBY', KEYS[5], string.format('%d', b), string.match(m[i], '|(%d+)$'))
    end
  end
  local cut, cut_total, later, totals = tonumber(ARGV[4]), 0, {}, {}
  local h = redis.call('HGETALL', KEYS[5])
  for i = 1, #h, 2 do
    local b = tonumber(h[i])
    if b > cut then
      later[#later + 1] = b; totals[b] = tonumber(h[i + 1])
    elseif b == cut then
      cut_total = tonumber(h[i + 1])
    elseif gc and b < gc then
      redis.call('HDEL', KEYS[5], h[i])
    end
  end
  if ARGV[7] == 'in' then
    cut_total = zsum('(' .. ARGV[2], '(' .. ARGV[6])
  else
    cut_total = cut_total - zsum(ARGV[5], ARGV[2])
  end
  return {cut_total, later, totals}
end
-- used, pending items, and for an hour key its buckets
local function state(window, gc)
  local settled, buckets = 0, nil
  if window == 'hour' then
    buckets = hour_buckets(gc)
    settled = buckets[1]
    for _, b in ipairs(buckets[2]) do settled = settled + buckets[3][b] end
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
  return settled + pending, pending_items, buckets
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

# A refused hour reservation returns, for retry-after, the settled tokens that free before
# the first bucket by whose last free `need` tokens have freed (pending holds included), and
# that bucket's charges: windows._hour_settled, the same arithmetic on the same doubles.
RETRY = """
local function retry_settled(buckets, pending_items, need, ttl)
  local frees = {}
  for i = 1, #pending_items, 2 do
    local ts = tonumber(pending_items[i])
    frees[#frees + 1] = {math.min(ts + ttl, ts + 3600), pending_items[i + 1]}
  end
  table.sort(frees, function(a, b) return a[1] < b[1] end)
  local later, totals = buckets[2], buckets[3]
  table.sort(later)
  local spans = {{tonumber(ARGV[6]), buckets[1], '(' .. ARGV[2], '(' .. ARGV[6]}}
  for _, b in ipairs(later) do  -- end, total, min and max score of its charges
    spans[#spans + 1] = {(b + 1) * 60, totals[b], string.format('%d', b * 60),
      string.format('(%d', (b + 1) * 60)}
  end
  local before, pend, j = 0, 0, 1
  for _, s in ipairs(spans) do
    while j <= #frees and frees[j][1] <= s[1] + 3600 do
      pend = pend + frees[j][2]; j = j + 1
    end
    if before + s[2] + pend >= need then
      local _, items = parse(redis.call('ZRANGEBYSCORE', KEYS[3], s[3], s[4], 'WITHSCORES'))
      return before, items
    end
    before = before + s[2]
  end
  return before, {}
end
"""

# + KEYS[6] reservation hash. ARGV[8..]: res_id, tokens, now, day label, gc bucket, its start,
# gc_pending, retention, ttl
RESERVE = (
    STATE
    + RETRY
    + """
local h = redis.call('HMGET', KEYS[1], 'window', 'limit_tokens', 'revoked')
if not h[1] or h[3] == '1' then return {-1} end
local window, limit, tokens = h[1], tonumber(h[2]), tonumber(ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[13])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[14])
local used, pending_items, buckets = state(window, tonumber(ARGV[12]))
if used + tokens > limit then
  local before, settled_items = 0, {}
  if window == 'hour' then
    before, settled_items = retry_settled(buckets, pending_items, used + tokens - limit,
      tonumber(ARGV[16]))
  end
  return {0, used, limit, settled_items, pending_items, window, before}
end
redis.call('ZADD', KEYS[2], ARGV[10], ARGV[8] .. '|' .. ARGV[9])
redis.call('HSET', KEYS[6], 'key', redis.call('HGET', KEYS[1], 'id'), 'ts', ARGV[10],
  'reserved', ARGV[9], 'day', ARGV[11], 'state', 'pending')
redis.call('EXPIRE', KEYS[6], ARGV[15])
return {1, used + tokens, limit}
"""
)

# KEYS: res hash, key hash, pending, hour zset, day counter of the charge's day, hour bucket
# hash. ARGV: res_id, actual, now, day counter ttl, the charge's hour bucket
SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'state', 'ts', 'reserved')
if not r[1] then return -1 end
if r[1] == 'settled' then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1] .. '|' .. r[3])
local window = redis.call('HGET', KEYS[2], 'window')
if window == 'hour' then
  redis.call('ZADD', KEYS[4], r[2], ARGV[1] .. '|' .. ARGV[2])
  redis.call('HINCRBY', KEYS[6], ARGV[5], ARGV[2])
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
