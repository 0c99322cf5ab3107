
-- moderator_end {session}: a moderator ends the live session for both members, re-queuing
-- nobody. Reply: {ended: whether a live session had that id}.
OPS.moderator_end = function()
  local offerer, phase = unpack(redis.call('HMGET', session_key(A.session), 'offerer', 'phase'))
  if not offerer or phase ~= 'live' then return result({ ended = false }) end
  end_for_both(offerer, 'ended_by_moderator')
  return result({ ended = true })
end
