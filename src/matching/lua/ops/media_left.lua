
-- media_left {session, left? (a member's handle; absent: everybody), event_id, dedupe_ms}:
-- the media server reports who left the session's room. Reply: {effect: ended, duplicate or
-- no_session}.
OPS.media_left = function()
  local session, left = A.session, A.left
  local seen = P .. ':seen_event:' .. A.event_id
  if not redis.call('SET', seen, '1', 'NX', 'PX', A.dedupe_ms) then
    return result({ effect = 'duplicate' })
  end
  local fields = hash_of(session_key(session))
  local offerer, answerer, offerer_handle, answerer_handle, phase = fields.offerer, fields.answerer,
    fields.offerer_handle, fields.answerer_handle, fields.phase
  if not offerer or phase ~= 'live' then return result({ effect = 'no_session' }) end
  if left == nil then
    end_for_both(offerer, 'media_disconnected')
  elseif left == offerer_handle or left == answerer_handle then
    local who = offerer
    if left == answerer_handle then who = answerer end
    note_quick_end(who, end_session(who, 'media_disconnected', false, 'media_disconnected',
      S.requeue_peer_on_skip))
  else
    return result({ effect = 'no_session' })
  end
  return result({ effect = 'ended' })
end
