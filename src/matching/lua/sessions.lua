
-- Sessions: a matched pair goes through up to three phases, proposed (accept phase: both must
-- accept), pending (LiveKit: the room is being made) and live (`matched` sent). Until live,
-- both keep their queue places, so that undoing the match puts them back where they were.

-- The fields of the two members in a session's hash; the offerer (who waited longer) first.
local MEMBERS = {
  { user = 'offerer', handle = 'offerer_handle', accepted = 'offerer_accepted' },
  { user = 'answerer', handle = 'answerer_handle', accepted = 'answerer_accepted' },
}

-- Sessions that went live in this call, by minute (unix ms / 60000), added to the minute's
-- counter (P:matches:<minute>, for the admin API's `overview`) once when the call ends: one
-- write per call rather than two per match.
local live_by_minute

local function start_counting()
  live_by_minute = {}
end

local function finish_counting()
  for minute, n in pairs(live_by_minute) do
    local key = P .. ':matches:' .. minute
    redis.call('INCRBY', key, n)
    redis.call('PEXPIRE', key, 180000)
  end
end

-- u's live session and peer, or nil.
local function session_of(u)
  local h = user(u)
  local session = h.session
  if h.state ~= 'session' then return nil end
  local fields = hash_of(session_key(session))
  local offerer, answerer = fields.offerer, fields.answerer
  if not offerer then return nil end
  if offerer == u then return session, answerer end
  return session, offerer
end

-- The peer of u in `session` (nil for the current live session, else the most recent one):
-- session id and peer, or nil.
local function peer_in(u, session)
  local current, peer = session_of(u)
  if current and (session == nil or session == current) then return current, peer end
  for _, m in ipairs(recent_sessions(u)) do
    if session == nil or session == m.session then return m.session, m.peer end
  end
  return nil
end

-- Which member (1 or 2, see MEMBERS) of the open proposal `match_id` u is, or nil.
local function proposal_member(u, match_id)
  local h = user(u)
  if h.state ~= 'pending' or h.session ~= match_id then return nil end
  local fields = hash_of(session_key(match_id))
  local offerer, answerer, phase = fields.offerer, fields.answerer, fields.phase
  if phase ~= 'proposed' then return nil end
  if offerer == u then return 1 end
  if answerer == u then return 2 end
  return nil
end

-- Byte order, as Rust sorts strings (Lua compares strings by the locale).
local function byte_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The interests both members named (their `interests` fields), sorted, each once, as a JSON
-- list: spliced into `matched` as it is, since cjson would write an empty list as {}.
local function common_interests(a, b)
  local theirs, common = {}, {}
  for _, tag in ipairs(split(b, '\n')) do theirs[tag] = true end
  for _, tag in ipairs(split(a, '\n')) do
    if theirs[tag] then
      table.insert(common, tag)
      theirs[tag] = nil
    end
  end
  if #common == 0 then return '[]' end
  table.sort(common, byte_less)
  return cjson.encode(common)
end

-- The session is live: both members learn it with `matched`, with the interests they share and
-- their media: the room's (offerer_media, answerer_media: JSON, LiveKit), or else the ICE
-- servers with credentials minted now (p2p). Members: { user, handle, queued_at, away, pool,
-- interests } each, offerer first.
local function announce(session, offerer, answerer, offerer_media, answerer_media)
  table.insert(out.started, { session_id = session, users = { offerer.user, answerer.user },
    pools = { offerer.pool, answerer.pool }, started_at_ms = NOW })
  local minute = math.floor(NOW / 60000)
  live_by_minute[minute] = (live_by_minute[minute] or 0) + 1
  for _, pair in ipairs({ { offerer, answerer }, { answerer, offerer } }) do
    table.insert(out.waits, math.max(NOW - pair[1].queued_at, 0))
    remember_partner(pair[1].user, session, pair[2].user)
  end
  if not offerer_media then
    offerer_media, answerer_media = p2p_media(offerer.handle), p2p_media(answerer.handle)
  end
  local common = '"common_interests":' .. common_interests(offerer.interests, answerer.interests)
  emit(offerer.user, { type = 'matched', session_id = session, peer = answerer.handle,
    role = 'offerer', started_at_ms = NOW }, common .. ',"media":' .. offerer_media)
  emit(answerer.user, { type = 'matched', session_id = session, peer = offerer.handle,
    role = 'answerer', started_at_ms = NOW }, common .. ',"media":' .. answerer_media)
  -- A member whose connection dropped before the match went live: the other one learns it
  -- right away, as in a running session.
  for _, pair in ipairs({ { offerer, answerer }, { answerer, offerer } }) do
    if pair[1].away then
      emit(pair[2].user, { type = 'peer_status', session_id = session, state = 'reconnecting' })
    end
  end
end

-- Turns a paired session (proposed, or waiting for its room) live.
local function go_live(session, offerer_media, answerer_media)
  local session_hash = session_key(session)
  -- offerer, answerer, offerer_handle, answerer_handle
  local fields = hash_of(session_hash)
  local users, handles = { fields.offerer, fields.answerer }, { fields.offerer_handle, fields.answerer_handle }
  set_fields(session_hash, 'phase', 'live', 'live_at', NOW)
  redis.call('ZREM', P .. ':pair_deadlines', session)
  local members = {}
  for i = 1, 2 do
    local u, handle = users[i], handles[i]
    local h = user(u)
    members[i] = { user = u, handle = handle, queued_at = tonumber(h.queued_at), away = h.away == '1',
      pool = h.pool, interests = h.interests }
    -- Met somebody: nobody is avoided any more (user ids are never empty).
    set_user(u, 'state', 'session', 'avoid', '')
  end
  announce(session, members[1], members[2], offerer_media, answerer_media)
end

-- Hands a paired session to the media side: its room is made outside this call.
local function await_room(session)
  local fields = hash_of(session_key(session))
  local offerer_handle, answerer_handle = fields.offerer_handle, fields.answerer_handle
  set_fields(session_key(session), 'phase', 'pending')
  redis.call('ZADD', P .. ':pair_deadlines', NOW + MEDIA_PENDING, session)
  table.insert(out.pending, { session_id = session, handles = { offerer_handle, answerer_handle } })
end

-- Pairs waiting users a and b: live at once, or proposed (accept phase), or waiting for the
-- room (LiveKit).
local function start_session(a, b)
  local waiting_a, waiting_b = take_waiting(a), take_waiting(b)
  -- The user who waited longer offers.
  local offerer, answerer, wo, wa = a, b, waiting_a, waiting_b
  if waiting_b.ticket < waiting_a.ticket then offerer, answerer, wo, wa = b, a, waiting_b, waiting_a end
  local session = new_id('s_', 16)
  local offerer_handle, answerer_handle = new_id('p_', 9), new_id('p_', 9)
  -- Smoothed waits, per pool and over all (one read and one write when both share a pool).
  local waits = P .. ':smoothed_waits'
  local pool_wait, all_wait = unpack(redis.call('HMGET', waits, wo.pool, '*'))
  local wait_o, wait_a = math.max(NOW - wo.queued_at, 0), math.max(NOW - wa.queued_at, 0)
  all_wait = ewma(ewma(all_wait, wait_o), wait_a)
  if wa.pool == wo.pool then
    redis.call('HSET', waits, wo.pool, ewma(ewma(pool_wait, wait_o), wait_a), '*', all_wait)
  else
    local other_wait = redis.call('HGET', waits, wa.pool)
    redis.call('HSET', waits, wo.pool, ewma(pool_wait, wait_o), wa.pool,
      ewma(other_wait, wait_a), '*', all_wait)
  end
  -- Only now: a pool the pair leaves empty goes, with its smoothed wait.
  pools_changed(wo, wa)
  increment_field(P .. ':counts', 'sessions', 1)
  local session_hash = session_key(session)
  if R.accept_timeout_ms == 0 and MEDIA_PENDING == 0 then
    -- Live at once (the common case, kept to the fewest calls).
    for _, u in ipairs({ offerer, answerer }) do
      -- Met somebody: nobody is avoided any more (user ids are never empty).
      set_user(u, 'state', 'session', 'session', session, 'avoid', '')
    end
    set_fields(session_hash, 'offerer', offerer, 'answerer', answerer, 'offerer_handle',
      offerer_handle, 'answerer_handle', answerer_handle, 'matched_at', NOW, 'phase', 'live',
      'live_at', NOW)
    -- Both were waiting and connected: try_match pairs only those.
    announce(session,
      { user = offerer, handle = offerer_handle, queued_at = wo.queued_at, away = false, pool = wo.pool,
        interests = wo.interests },
      { user = answerer, handle = answerer_handle, queued_at = wa.queued_at, away = false, pool = wa.pool,
        interests = wa.interests },
      nil, nil)
    return
  end
  for _, u in ipairs({ offerer, answerer }) do
    set_user(u, 'state', 'pending', 'session', session)
  end
  set_fields(session_hash, 'offerer', offerer, 'answerer', answerer, 'offerer_handle',
    offerer_handle, 'answerer_handle', answerer_handle, 'matched_at', NOW, 'phase', 'pending')
  if MEDIA_PENDING > 0 then redis.call('ZADD', P .. ':media_sessions', NOW, session) end
  if R.accept_timeout_ms > 0 then
    set_fields(session_hash, 'phase', 'proposed')
    -- The timer runs on the instance that made the match; the deadline here covers its death.
    redis.call('ZADD', P .. ':pair_deadlines', NOW + R.accept_timeout_ms + S.resume_grace_ms, session)
    local expires = NOW + R.accept_timeout_ms
    emit(offerer, { type = 'match_proposed', match_id = session, peer = answerer_handle, expires_at_ms = expires })
    emit(answerer, { type = 'match_proposed', match_id = session, peer = offerer_handle, expires_at_ms = expires })
    timer(R.accept_timeout_ms, offerer, 'proposal', session)
  else
    await_room(session)
  end
end
