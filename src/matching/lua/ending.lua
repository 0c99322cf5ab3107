
-- Undoing a match that is not live yet (decline, proposal timeout, no room, a member left),
-- and ending a live session.

-- Removes a session's own keys.
local function drop_session(session)
  delete_hash(session_key(session))
  increment_field(P .. ':counts', 'sessions', -1)
  if MEDIA_PENDING > 0 then redis.call('ZREM', P .. ':media_sessions', session) end
  if MEDIA_PENDING > 0 or R.accept_timeout_ms > 0 then redis.call('ZREM', P .. ':pair_deadlines', session) end
  table.insert(out.ended_sessions, session)
end

-- Undoes a paired session that is not live yet. `verdict(u, accepted)` says what happens to
-- each member: { 'back', event or nil } (back to its old place, matched again), { 'out',
-- event } (idle) or { 'tail', event } (to the tail of the queue).
local function undo_match(session, verdict)
  local fields = hash_of(session_key(session))
  local users, phase = { fields.offerer, fields.answerer }, fields.phase
  if not users[1] then return end
  local accepted = { fields.offerer_accepted == '1', fields.answerer_accepted == '1' }
  drop_session(session)
  if phase ~= 'proposed' then accepted = { true, true } end
  local back = {}
  for i, u in ipairs(users) do
    if user(u).state == 'pending' then
      local v = verdict(u, accepted[i])
      if v[1] == 'back' then
        restore(u)
        if v[2] then emit(u, v[2]) end
        table.insert(back, u)
      else
        set_user(u, 'state', 'idle')
        emit(u, v[2])
        if v[1] == 'tail' then requeue(u) end
      end
    end
  end
  for _, u in ipairs(back) do try_match(u) end
end

-- What the member left behind learns when the other leaves a not-yet-live match.
local function left_behind(session)
  if R.accept_timeout_ms > 0 then
    return { 'back', { type = 'match_cancelled', match_id = session, reason = 'peer_left', requeued = true } }
  end
  return { 'back', nil }
end

-- A user who declined or let a proposal lapse: idle, or the tail of the queue.
local function refused(session, reason)
  local event = { type = 'match_cancelled', match_id = session, reason = reason, requeued = R.decline_to_tail }
  if R.decline_to_tail then return { 'tail', event } end
  return { 'out', event }
end

-- The member u leaves its not-yet-live match with `reason` (end, timeout).
local function leave_match(u, reason)
  local session = user(u).session
  undo_match(session, function(m)
    if m == u then return { 'out', { type = 'dequeued', reason = reason } } end
    return left_behind(session)
  end)
end

-- Sets `avoid` between the members of a paired session: like after a skip, they are not
-- paired again right away.
local function keep_apart(session)
  local fields = hash_of(session_key(session))
  local offerer, answerer = fields.offerer, fields.answerer
  if not offerer then return end
  set_user(offerer, 'avoid', answerer)
  set_user(answerer, 'avoid', offerer)
end

local function proposal_expired(session)
  keep_apart(session)
  undo_match(session, function(_, accepted)
    if accepted then
      return { 'back', { type = 'match_cancelled', match_id = session, reason = 'peer_timeout', requeued = true } }
    end
    return refused(session, 'timeout')
  end)
end

local function media_failed(session, message)
  if hash_of(session_key(session)).phase ~= 'pending' then return end
  undo_match(session, function()
    return { 'back', { type = 'error', code = 'media_unavailable', message = message } }
  end)
end

-- Ends u's session: tells both sides why, then re-queues whoever the rule says. Returns how
-- long it was live, in ms.
local function end_session(u, own_reason, own_requeue, peer_reason, peer_requeue)
  local session, peer = session_of(u)
  local fields = hash_of(session_key(session))
  local offerer, answerer, live_at = fields.offerer, fields.answerer, fields.live_at
  live_at = tonumber(live_at) or NOW
  local lived = NOW - live_at
  drop_session(session)
  table.insert(out.closed, { session_id = session, users = { offerer, answerer },
    started_at_ms = live_at, ended_at_ms = NOW, ended_by = u, reason = own_reason })
  forgive_skips(u, lived)
  forgive_skips(peer, lived)
  local again = {}
  for _, side in ipairs({ { u, own_reason, own_requeue }, { peer, peer_reason, peer_requeue } }) do
    local who, reason, requeued = side[1], side[2], side[3]
    if user(who).state == 'session' then
      set_user(who, 'state', 'idle')
      if requeued then table.insert(again, who) end
    end
    emit(who, { type = 'session_ended', session_id = session, reason = reason, requeued = requeued })
  end
  for _, who in ipairs(again) do requeue(who) end
  return lived
end

-- Ends the live session of `offerer` for both members on behalf of neither (the media server
-- closed the room, a moderator ended it): both get `reason`, nobody is re-queued, and the
-- record names nobody as the one who ended it.
local function end_for_both(offerer, reason)
  end_session(offerer, reason, false, reason, false)
  out.closed[#out.closed].ended_by = nil
end
