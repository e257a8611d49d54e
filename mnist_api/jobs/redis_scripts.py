"""The Lua scripts that hold and release uploads in Redis atomically (budget, holders,
expiry), for `RedisJobStore`.
"""

from __future__ import annotations

# KEYS: expiry zset, size hash, byte counter, then (upload, holders) per upload.
# ARGV: holder, ttl, budget, overhead, then (sha256, bytes) per upload. Returns 1, or 0 if
# over budget.
HOLD_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
local holder, ttl, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local overhead = tonumber(ARGV[4])
-- Uploads whose TTL ran out were deleted by Redis itself: forget their sizes.
for _, sha in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local size = redis.call('HGET', KEYS[2], sha)
  if size then
    redis.call('DECRBY', KEYS[3], size)
    redis.call('HDEL', KEYS[2], sha)
  end
  redis.call('ZREM', KEYS[1], sha)
end
local count = (#ARGV - 4) / 2
local adding = 0
for i = 1, count do
  if redis.call('HEXISTS', KEYS[2], ARGV[3 + 2 * i]) == 0 then
    adding = adding + #ARGV[4 + 2 * i] + overhead
  end
end
if tonumber(redis.call('GET', KEYS[3]) or '0') + adding > budget then
  return 0
end
for i = 1, count do
  local sha, data = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  if redis.call('HEXISTS', KEYS[2], sha) == 0 then
    redis.call('HSET', KEYS[2], sha, #data + overhead)
    redis.call('INCRBY', KEYS[3], #data + overhead)
  end
  redis.call('SET', KEYS[2 + 2 * i], data, 'EX', ttl)
  redis.call('SADD', KEYS[3 + 2 * i], holder)
  redis.call('EXPIRE', KEYS[3 + 2 * i], ttl)
  redis.call('ZADD', KEYS[1], now + ttl, sha)
end
-- The bookkeeping expires with the last upload if nobody releases anything.
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
return 1
"""

# KEYS: expiry zset, size hash, byte counter, then (upload, holders) per upload.
# ARGV: holder, then sha256 per upload.
RELEASE_SCRIPT = """
for i = 1, #ARGV - 1 do
  local sha = ARGV[1 + i]
  redis.call('SREM', KEYS[3 + 2 * i], ARGV[1])
  if redis.call('SCARD', KEYS[3 + 2 * i]) == 0 then
    redis.call('DEL', KEYS[2 + 2 * i], KEYS[3 + 2 * i])
    local size = redis.call('HGET', KEYS[2], sha)
    if size then
      redis.call('DECRBY', KEYS[3], size)
      redis.call('HDEL', KEYS[2], sha)
    end
    redis.call('ZREM', KEYS[1], sha)
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return 1
"""
