
-- tick {instance, period_ms, known_epoch?, budget, media_unavailable_message}: instance
-- heartbeat and shared clean-up, run by every instance periodically: users of dead instances
-- are treated as disconnected, held states past their grace expire, paired sessions past
-- their deadline are undone; `budget` bounds the users and expiries handled in one call.
-- Reply: {epoch, epoch_changed, rejoined, cleaned_users, expired, dead_instances}.
OPS.tick = function()
  local instance, period, known, budget = USER, A.period_ms, A.known_epoch, A.budget
  local epoch = redis.call('GET', P .. ':epoch')
  if not epoch then
    epoch = new_id('d_', 16)
    redis.call('SET', P .. ':epoch', epoch)
  end
  -- ZADD answers 1 when the instance was not listed: others took it for dead (or Redis lost
  -- everything), so its users were cleaned up and its connections must re-attach.
  local added = redis.call('ZADD', P .. ':instances', NOW, instance)
  -- An instance that ticks is alive, whatever others concluded while it was silent.
  redis.call('SREM', P .. ':dead_instances', instance)
  -- If nobody ticked for more than a period, Redis (or the network to it) was away for
  -- everyone: every score is stale. Give all instances two periods to check in again before
  -- anyone is judged.
  local last_tick = tonumber(redis.call('GET', P .. ':last_tick'))
  redis.call('SET', P .. ':last_tick', NOW)
  if last_tick and NOW - last_tick > period then
    redis.call('SET', P .. ':judge_after', NOW + 2 * period)
  end
  local dead = {}
  local judge_after = tonumber(redis.call('GET', P .. ':judge_after'))
  if not judge_after or NOW >= judge_after then
    -- Instances silent for two periods are dead; moving them to P:dead_instances makes
    -- exactly one caller claim each, and any instance may finish the clean-up later.
    dead = redis.call('ZRANGEBYSCORE', P .. ':instances', '-inf', NOW - 2 * period)
    for _, d in ipairs(dead) do
      redis.call('ZREM', P .. ':instances', d)
      redis.call('SADD', P .. ':dead_instances', d)
    end
  end
  local cleaned = 0
  for _, d in ipairs(redis.call('SMEMBERS', P .. ':dead_instances')) do
    local users = redis.call('SPOP', instance_users_key(d), budget)
    for _, u in ipairs(users) do
      local h = user(u)
      local connection, at = h.connection, h.instance
      if at == d and connection then detach(u, connection) end
      cleaned = cleaned + 1
    end
    budget = budget - #users
    if redis.call('SCARD', instance_users_key(d)) == 0 then redis.call('SREM', P .. ':dead_instances', d) end
    if budget <= 0 then break end
  end
  local due = redis.call('ZRANGEBYSCORE', P .. ':held_expiry', '-inf', NOW, 'LIMIT', 0, math.max(budget, 1))
  for _, member in ipairs(due) do
    local u, connection = string.match(member, '^(.*)\n(.*)$')
    expire(u, connection)
  end
  -- Paired sessions past their deadline: the instance setting up the room (or holding the
  -- proposal timer) died.
  local stuck = redis.call('ZRANGEBYSCORE', P .. ':pair_deadlines', '-inf', NOW, 'LIMIT', 0, 100)
  for _, session in ipairs(stuck) do
    redis.call('ZREM', P .. ':pair_deadlines', session)
    local phase = hash_of(session_key(session)).phase
    if phase == 'proposed' then
      proposal_expired(session)
    elseif phase == 'pending' then
      media_failed(session, A.media_unavailable_message)
    end
  end
  -- Pools not listed in for a minute leave P:pools once empty (a few per tick).
  local idle_pools = redis.call('ZRANGEBYSCORE', P .. ':pools', '-inf', NOW - 60000, 'LIMIT', 0, 20)
  for _, pool in ipairs(idle_pools) do
    if ahead(pool, nil) == 0 then
      redis.call('ZREM', P .. ':pools', pool)
    else
      redis.call('ZADD', P .. ':pools', NOW, pool)
    end
  end
  -- Held states from detaches above expire through P:held_expiry, not through a timer of
  -- the caller.
  out.held = false
  return result({ epoch = epoch, epoch_changed = known ~= nil and known ~= epoch,
    rejoined = known ~= nil and added == 1,
    cleaned_users = cleaned, expired = #due, dead_instances = #dead })
end
