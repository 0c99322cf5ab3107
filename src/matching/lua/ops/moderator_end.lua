
-- moderator_end {session}: a moderator ends the live session for both members, re-queuing
-- nobody. Reply: {ended: whether a live session had that id}.
OPS.moderator_end = function()
  local fields = hash_of(session_key(A.session))
  if not fields.offerer or fields.phase ~= 'live' then return result({ ended = false }) end
  end_for_both(fields.offerer, 'ended_by_moderator')
  return result({ ended = true })
end
