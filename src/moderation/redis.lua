-- Moderation state of one deployment (bans and reports), called by src/moderation/redis.rs
-- through EVALSHA. Every key carries the deployment's hash tag, so each call touches one slot
-- and the script runs unchanged on Redis Cluster. ARGV[1] names the operation.

local op = ARGV[1]

if op == 'check' then
  -- KEYS: the ban keys of every name of one client. Returns the bans found (or nils).
  return redis.call('MGET', unpack(KEYS))
elseif op == 'ban' then
  -- KEYS: the ban's key, the listing. ARGV: op, listing member, ban (JSON), until (unix ms),
  -- TTL (ms), broadcast channel, broadcast message, now (unix ms).
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
  -- What ran out leaves the listing here too, so that it does not grow while nobody lists it.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  -- Every instance closes the banned identity's connections it holds.
  redis.call('PUBLISH', ARGV[6], ARGV[7])
  return 1
elseif op == 'unban' then
  -- KEYS: the ban's key, the listing. ARGV: op, listing member.
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
elseif op == 'list' then
  -- KEYS: the listing. ARGV: op, now (unix ms), prefix of the ban keys.
  -- What ran out leaves the listing here; so does an entry whose key is gone.
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
  local bans = {}
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local ban = redis.call('GET', ARGV[3] .. member)
    if ban then
      bans[#bans + 1] = ban
    else
      redis.call('ZREM', KEYS[1], member)
    end
  end
  return bans
elseif op == 'report' then
  -- KEYS: the reported user's reporters, the report stream, the reported user's ban key.
  -- ARGV: op, now (unix ms), window (ms), reports kept, session id, reporter, reported user,
  -- reason, details.
  -- Returns {distinct reporters within the window, this one included (0: this reporter had
  -- already counted), whether the reported user is banned}.
  local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
    'session_id', ARGV[5], 'reporter', ARGV[6], 'reported', ARGV[7],
    'reason', ARGV[8], 'details', ARGV[9], 'at_ms', ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local added = redis.call('ZADD', KEYS[1], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[1], window)
  local distinct = 0
  if added == 1 then
    distinct = redis.call('ZCARD', KEYS[1])
  end
  return {distinct, redis.call('EXISTS', KEYS[3])}
end
return redis.error_reply('unknown moderation operation ' .. tostring(op))
