
-- peer {user, session?}: the peer of the user in `session` (absent: the current or most
-- recent one), for reports. Reply: {session_id, peer}.
OPS.peer = function()
  if not state_of_user() then return fail('invalid_state', 'no live connection for this user') end
  local session, peer = peer_in(USER, A.session)
  if not session then return fail('invalid_state', 'no such session') end
  return result({ session_id = session, peer = peer })
end
