
-- decline {user, match_id}: accept phase; the match is undone, the peer goes back to its place.
OPS.decline = function()
  if not state_of_user() then return fail('invalid_state', 'no live connection for this user') end
  local match_id = A.match_id
  if not proposal_member(USER, match_id) then return fail('invalid_state', 'no such proposal open') end
  keep_apart(match_id)
  undo_match(match_id, function(m)
    if m == USER then return refused(match_id, 'declined') end
    return { 'back', { type = 'match_cancelled', match_id = match_id, reason = 'peer_declined', requeued = true } }
  end)
  return result()
end
