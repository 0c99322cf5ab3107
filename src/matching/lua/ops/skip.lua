
-- skip {user, ref?, cooldown_message}: ends the user's session and queues them again (unless
-- the skip starts a cooldown: then `cooldown_message` says so).
OPS.skip = function()
  act_for_user()
  local left = cooldown_left(USER)
  if left > 0 then return fail('cooldown', 'too many quick skips: wait for the cooldown', left + 1) end
  local session, peer = session_of(USER)
  if not session then return fail('invalid_state', 'not in a session') end
  set_user(USER, 'avoid', peer)
  set_user(peer, 'avoid', USER)
  local live_at = tonumber(hash_of(session_key(session)).live_at) or NOW
  -- The skip that starts a cooldown still ends the session, but does not re-queue.
  local cooldown = count_skip(USER, NOW - live_at)
  end_session(USER, 'skip', cooldown == nil, 'peer_skipped', S.requeue_peer_on_skip)
  if cooldown then
    emit(USER, { type = 'error', code = 'cooldown', message = A.cooldown_message, retry_after_ms = cooldown })
  end
  return result()
end
