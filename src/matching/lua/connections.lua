
-- Connections coming and going (the grace period of a dropped one), and what waiting users
-- are told about their place.

-- The connection `connection` of u went away: hold the state for the grace period.
local function detach(u, connection)
  local h = user(u)
  local instance = h.instance
  if h.connection ~= connection or h.away == '1' then return end
  set_user(u, 'away', '1')
  set_away(u, true)
  redis.call('SREM', instance_users_key(instance), u)
  redis.call('ZADD', P .. ':held_expiry', NOW + S.resume_grace_ms, u .. '\n' .. connection)
  if redis.call('PTTL', log_key(u)) < 2 * S.resume_grace_ms then
    redis.call('PEXPIRE', log_key(u), 2 * S.resume_grace_ms)
  end
  out.held = true
  local session, peer = session_of(u)
  if session then emit(peer, { type = 'peer_status', session_id = session, state = 'reconnecting' }) end
end

-- The grace period of (u, connection) ran out and u did not come back. Two phases, one grace
-- period apart: first the queue place or session goes (u's own `dequeued`/`session_ended`
-- with reason `timeout` stays in the log for a client that comes back a little later), then
-- the user.
local function expire(u, connection)
  local member = u .. '\n' .. connection
  -- Both the instance's own timer and any instance's sweep may call this: only a due entry
  -- counts, so the first call does the work and the second finds nothing (or the next phase,
  -- not yet due).
  local due = tonumber(redis.call('ZSCORE', P .. ':held_expiry', member))
  if not due or due > NOW then return end
  redis.call('ZREM', P .. ':held_expiry', member)
  local h = user(u)
  local state = h.state
  if h.connection ~= connection or h.away ~= '1' then return end
  if state == 'queued' then
    dequeue(u, 'timeout')
  elseif state == 'session' and session_of(u) then
    end_session(u, 'timeout', false, 'peer_disconnected', S.requeue_peer_on_skip)
  elseif state == 'pending' then
    leave_match(u, 'timeout')
  else
    delete_hash(user_key(u), log_key(u))
    forget_conduct_later(u)
    return
  end
  redis.call('ZADD', P .. ':held_expiry', NOW + S.resume_grace_ms, member)
  redis.call('PEXPIRE', log_key(u), 2 * S.resume_grace_ms)
  out.held = true
end

-- u's state as `status` reports it, or nil when u has no state.
local function status_of(u)
  local h = user(u)
  local state, pool, ticket, session = h.state, h.pool, h.ticket, h.session
  if not state then return nil end
  local status = { state = state_name(state) }
  if state == 'queued' then
    status.position = ahead(pool, ticket)
    status.estimated_wait_ms = estimate(pool, status.position)
  elseif state == 'pending' then
    status.position = 0
  elseif state == 'session' then
    status.session_id = session
    local fields = hash_of(session_key(session))
    local offerer, offerer_handle, answerer_handle = fields.offerer, fields.offerer_handle,
      fields.answerer_handle
    if offerer == u then
      status.role, status.peer = 'offerer', answerer_handle
    elseif offerer then
      status.role, status.peer = 'answerer', offerer_handle
    end
  end
  return status
end

-- Sends `queue_update` to the connected waiting users of `pool` whose position or estimate
-- moved since they were last told.
local function refresh_pool(pool)
  -- Every waiting user of the pool is read once, for a few fields: straight from Redis (this
  -- call's changes written first), not through the hash cache, which would load every field of
  -- every waiting user.
  flush_hashes()
  -- Everybody waiting, in ticket order: the open list and the others (P:held: the away ones,
  -- who count in positions but are not told, and the connected ones not open yet).
  local open = redis.call('ZRANGE', pool_key(pool), 0, -1, 'WITHSCORES')
  local others = redis.call('ZRANGE', held_key(pool), 0, -1, 'WITHSCORES')
  local i, j, position = 1, 1, 0
  while i <= #open or j <= #others do
    local u
    if j > #others or (i <= #open and tonumber(open[i + 1]) < tonumber(others[j + 1])) then
      u, i = open[i], i + 2
    else
      u, j = others[j], j + 2
    end
    local away, told_position, told_estimate, own_pool, instance = unpack(redis.call('HMGET',
      user_key(u), 'away', 'told_position', 'told_estimate', 'pool', 'instance'))
    -- Users listed here because their search widened are told about their own pool.
    if own_pool == pool and away == '0' then
      local estimated_wait = estimate(pool, position)
      local old = tonumber(told_estimate)
      local moved
      if old and estimated_wait then
        moved = math.abs(old - estimated_wait) * 5 > math.max(old, estimated_wait)
      else
        moved = (old == nil) ~= (estimated_wait == nil)
      end
      if tonumber(told_position) ~= position or moved then
        set_user(u, 'told_position', position, 'told_estimate', estimated_wait or '')
        -- Not logged (no seq) and for a connected user: straight to its instance, as `emit`
        -- would send it, without loading the user's hash.
        publish(instance, 'F' .. u .. '\n0\n' .. cjson.encode({ type = 'queue_update', position = position,
          estimated_wait_ms = null_or(estimated_wait) }))
      end
    end
    position = position + 1
  end
end

-- Operations that act for a user: the user, and its request's `ref` (nil: none; "" is a ref).
local function act_for_user()
  actor, ref = USER, A.ref
end

-- The user's state, or nil when the user has none (no live connection).
local function state_of_user()
  return user(USER).state
end
