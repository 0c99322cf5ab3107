
-- block {user, session?}: blocks the peer of `session` (absent: the current or most recent
-- one) for good, both ways; a live session with them ends.
OPS.block = function()
  if not state_of_user() then return fail('invalid_state', 'no live connection for this user') end
  local session, peer = peer_in(USER, A.session)
  if not session then return fail('invalid_state', 'no such session to block a peer from') end
  -- A dropped block may leave the blocker, if it waits, free to meet somebody who waits too.
  if add_block(USER, peer) then try_match(USER) end
  if session_of(USER) == session then
    note_quick_end(USER, end_session(USER, 'end', false, 'peer_ended', false))
  end
  return result()
end
