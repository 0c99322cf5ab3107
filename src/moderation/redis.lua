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
  -- KEYS: the reported user's reporters, the report stream, the reported user's ban key, the
  -- reporter's hourly count, the sessions the reporter reported lately (a list of
  -- "<session>\t<ms>\t<stream id>", newest first).
  -- ARGV: op, now (unix ms), window (ms), reports kept, session id, reporter, reported user,
  -- reason, details, reports per hour, hour (ms), sessions remembered per reporter.
  -- Returns {distinct reporters within the window, this one included (0: this reporter had
  -- already counted), whether the reported user is banned, ms to wait (0: stored), the
  -- report's stream id ("" when refused)}.
  local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
  -- A report about a session this reporter already reported replaces the earlier one.
  local earlier
  for _, e in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do
    local sid, at, id = string.match(e, '^(.*)\t(%d+)\t(.*)$')
    if sid == ARGV[5] and now - tonumber(at) < window then
      earlier = id
      redis.call('LREM', KEYS[5], 1, e)
      break
    end
  end
  if earlier then
    redis.call('XDEL', KEYS[2], earlier)
  else
    local n = redis.call('INCR', KEYS[4])
    if n == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[11]) end
    if n > tonumber(ARGV[10]) then
      redis.call('DECR', KEYS[4])
      return {0, 0, math.max(redis.call('PTTL', KEYS[4]), 1), ''}
    end
  end
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
    'session_id', ARGV[5], 'reporter', ARGV[6], 'reported', ARGV[7],
    'reason', ARGV[8], 'details', ARGV[9], 'at_ms', ARGV[2])
  redis.call('LPUSH', KEYS[5], ARGV[5] .. '\t' .. ARGV[2] .. '\t' .. id)
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[12]) - 1)
  redis.call('PEXPIRE', KEYS[5], window)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local added = redis.call('ZADD', KEYS[1], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[1], window)
  local distinct = 0
  if added == 1 then
    distinct = redis.call('ZCARD', KEYS[1])
  end
  return {distinct, redis.call('EXISTS', KEYS[3]), 0, id}
elseif op == 'reports' then
  -- KEYS: the report stream, the review decisions (a hash: stream id -> "<state> <ms>").
  -- ARGV: op, upper bound (XREVRANGE syntax, e.g. "+" or "(<id>"), lower bound, how many to
  -- look at. Returns {1 when the range has no more, {{id, fields, decision or ""}...}}.
  local budget = tonumber(ARGV[4])
  local entries = redis.call('XREVRANGE', KEYS[1], ARGV[2], ARGV[3], 'COUNT', budget + 1)
  local walked = {}
  for i = 1, math.min(#entries, budget) do
    local id = entries[i][1]
    walked[i] = {id, entries[i][2], redis.call('HGET', KEYS[2], id) or ''}
  end
  return {#entries <= budget and 1 or 0, walked}
elseif op == 'review' then
  -- KEYS: the report stream, the review decisions. ARGV: op, stream id, state, now (ms),
  -- reports kept. Returns nil when there is no such report, else {id, fields, decision}.
  local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])[1]
  if not entry then return false end
  local decision = redis.call('HGET', KEYS[2], ARGV[2])
  if not decision or string.match(decision, '^%S+') ~= ARGV[3] then
    decision = ARGV[3] .. ' ' .. ARGV[4]
    redis.call('HSET', KEYS[2], ARGV[2], decision)
  end
  -- Decisions on reports the stream trimmed go once there are twice as many as reports kept:
  -- each one costs O(1) sweeping on average.
  if redis.call('HLEN', KEYS[2]) > 2 * tonumber(ARGV[5]) then
    for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
      if #redis.call('XRANGE', KEYS[1], id, id) == 0 then redis.call('HDEL', KEYS[2], id) end
    end
  end
  return {entry[1], entry[2], decision}
end
return redis.error_reply('unknown moderation operation ' .. tostring(op))
