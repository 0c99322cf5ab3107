
-- attach {user, connection, instance, resume_token?, last_seq?}: a connection for the user
-- came up; it takes over the user's state and, with a valid resume token, gets the events it
-- missed. Reply: {state, resume_token, last_seq, resumed, replay: [{seq, frame}]}.
OPS.attach = function()
  local connection, instance = A.connection, A.instance
  local was_away = false
  if next(user(USER)) == nil then
    set_user(USER, 'connection', connection, 'instance', instance, 'away', '0',
      'state', 'idle', 'resume_token', new_id('r_', 16), 'last_seq', 0,
      -- Blocks outlive the user's hash (for the block TTL).
      'has_blocks', redis.call('EXISTS', blocks_key(USER)))
    -- Back in time: conduct and blocks stay while the user is here.
    keep_conduct(USER)
  else
    local h = user(USER)
    local old_instance, old_connection, away = h.instance, h.connection, h.away
    was_away = away == '1'
    -- Connection ids of one instance grow (fixed-width hex): an older connection whose
    -- attach arrives after a newer one's must not take the user back.
    if not was_away and old_instance == instance and old_connection > connection then
      return fail('replaced', 'a newer connection of this user took over')
    end
    if old_instance ~= instance then
      -- A live connection on another instance is replaced: that instance closes it.
      if not was_away then publish(old_instance, 'K' .. USER .. '\n' .. old_connection) end
      redis.call('SREM', instance_users_key(old_instance), USER)
    end
    redis.call('ZREM', P .. ':held_expiry', USER .. '\n' .. old_connection)
    set_user(USER, 'connection', connection, 'instance', instance, 'away', '0')
  end
  redis.call('SADD', instance_users_key(instance), USER)
  local h = user(USER)
  local resume_token, last_seq, state = h.resume_token, h.last_seq, h.state
  last_seq = tonumber(last_seq)
  local resumed, replay = false, {}
  if A.resume_token and A.resume_token == resume_token then
    resumed, replay = events_since(USER, last_seq, A.last_seq or 0)
  end
  local attached = { state = state_name(state), resume_token = resume_token,
    last_seq = last_seq, resumed = resumed, replay = replay }
  if was_away then
    local session, peer = session_of(USER)
    if session then
      emit(peer, { type = 'peer_status', session_id = session, state = 'connected' })
    else
      set_away(USER, false)
      try_match(USER)
    end
  end
  return result(attached)
end
